"""Block-by-block calibration: what each linear layer sees when the model reads sample text.

The model is never loaded whole. transformers builds its skeleton on the meta device (no memory);
then, for each decoder block in turn, that block's weights are read from the safetensors source
(rows by pread, as everywhere in qwqq), the activations of every calibration token are pushed
through it, the inputs of its linear layers are summarised by observers, and the block is freed.

    peak memory ~ 4 B x (params of one block            the block, in float32
                         + n_tokens x hidden             the residual stream, updated in place
                         + batch x seqlen x max(ffn, 3 x hidden))   one batch's intermediates
                  + what the observers keep (imatrix: 8 B x in_features per linear;
                    GPTQ: 4 B x in_features^2 per distinct input of the block)

The embedding is read only for the token ids the sample uses. Observers are plain callables
``observe(names, x)``: ``names`` lists the weights (Hugging Face names) that read the activation
matrix ``x`` [tokens, in_features] (q/k/v share one input, gate/up another; each expert of a
Qwen3-MoE block sees only the tokens routed to it).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from qwqq.archs import arch_of, check_config
from qwqq.archs.tensors import EMBEDDING, FINAL_NORM
from qwqq.archs.experts import FUSED_ON_DISK, FUSED_PARAMS, PROJ, expert_weight, mlx_stacked
from qwqq.errors import QwqqError, SourceError, UnsupportedError
from qwqq.source import Checkpoint, RowReader

Observer = Callable[[list[str], "torch.Tensor"], None]  # noqa: F821


def pick_device(name: str | None = None):
    """CUDA, then Apple's MPS, then the CPU, unless --device names one."""
    import torch

    if name:
        try:
            dev = torch.device(name)
            torch.empty(1, device=dev)
        except (RuntimeError, AssertionError) as e:
            raise QwqqError(f"device {name!r} is not usable here: {str(e).splitlines()[0]}") from e
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# --------------------------------------------------------------------------- the model, one block at a time
@dataclass
class BlockModel:
    """A transformers skeleton on the meta device, whose blocks are materialised one at a time."""

    ckpt: Checkpoint
    device: object
    skeleton: object  # the *ForCausalLM on the meta device
    reader: RowReader = field(default_factory=RowReader)
    # A quantized source's weights (an MLX or GPTQ folder, for eval): (HF weight name, rows or None) -> float32
    # array, or None where the weight is stored unquantized. Given by the caller, which knows the formats.
    dequantize: Callable[[str, np.ndarray | None], np.ndarray | None] | None = None

    @property
    def config(self):
        return self.skeleton.config

    @property
    def n_layer(self) -> int:
        return len(self.skeleton.model.layers)

    def close(self) -> None:
        self.reader.close()

    def tensor(self, hf_name: str):
        """One source tensor as float32 on the device."""
        import torch

        ref = self.ckpt.tensors.get(hf_name)
        if self.dequantize is not None and (w := self.dequantize(hf_name, None)) is not None:
            return torch.from_numpy(w).to(self.device)
        if ref is None:
            raise SourceError(f"tensor {hf_name} is missing", self.ckpt.root)
        arr = self.reader.read_f32(ref, 0, ref.rows).reshape(ref.shape)
        return torch.from_numpy(arr).to(self.device)

    def embed(self, tokens: np.ndarray):
        """Embedding rows for the sample's tokens only: float32 [n_seq, seqlen, hidden]."""
        import torch

        ref = self.ckpt.tensors[EMBEDDING]
        uniq, inverse = np.unique(tokens, return_inverse=True)
        rows = self.dequantize(EMBEDDING, uniq) if self.dequantize is not None else None  # MLX quantizes it
        if rows is None:
            rows = np.empty((uniq.size, ref.cols), np.float32)
            for k, t in enumerate(uniq):
                self.reader.read_f32(ref, int(t), int(t) + 1, out=rows[k])
        x = torch.from_numpy(rows[inverse.reshape(-1)]).reshape(*tokens.shape, rows.shape[1])
        return x.to(self.device)

    def block(self, i: int):
        """Block i with its weights read from the source, in float32 on the device."""
        import torch

        layer = self.skeleton.model.layers[i]
        layer.to_empty(device=self.device)
        prefix = f"model.layers.{i}."
        with torch.no_grad():
            for name, param in layer.named_parameters():
                param.copy_(self._param(prefix, name, tuple(param.shape)))
        layer.eval()
        return layer

    def free(self, i: int) -> None:
        self.skeleton.model.layers[i].to("meta")

    def _param(self, prefix: str, name: str, shape: tuple[int, ...]):
        import torch

        layer_no = prefix.split(".")[2]
        fused = name in FUSED_PARAMS
        if fused and mlx_stacked(layer_no, "down") in self.ckpt.tensors:  # an MLX folder: experts stacked
            t = self.tensor(mlx_stacked(layer_no, "down")) if name.endswith("down_proj") else \
                torch.cat([self.tensor(mlx_stacked(layer_no, "gate")), self.tensor(mlx_stacked(layer_no, "up"))], dim=1)
        elif fused and prefix + name not in self.ckpt.tensors:
            n_expert = shape[0]
            if name.endswith("down_proj"):
                parts = [self.tensor(expert_weight(layer_no, e, "down")) for e in range(n_expert)]
            else:  # transformers 5 fuses gate and up: rows [gate; up]
                parts = [torch.cat([self.tensor(expert_weight(layer_no, e, "gate")),
                                    self.tensor(expert_weight(layer_no, e, "up"))]) for e in range(n_expert)]
            t = torch.stack(parts)
        else:
            t = self.tensor(prefix + name)
        if tuple(t.shape) != shape:
            raise SourceError(f"tensor {prefix + name} is {list(t.shape)}, the config implies {list(shape)}",
                              self.ckpt.root)
        return t

    def rotary(self, seqlen: int):
        """(cos, sin) for positions 0..seqlen-1, as the decoder blocks take them."""
        import torch

        with torch.device(self.device):
            rope = type(self.skeleton.model.rotary_emb)(config=self.config)
        pos = torch.arange(seqlen, device=self.device)[None]
        return rope(torch.zeros(1, seqlen, 1, device=self.device), pos)

    def final_norm(self):
        import torch

        norm = self.skeleton.model.norm
        norm.to_empty(device=self.device)
        with torch.no_grad():
            norm.weight.copy_(self.tensor(FINAL_NORM))
        return norm


MMAP_THRESHOLD = 1 << 20  # bytes: larger allocations get their own mapping, returned to the OS when freed


def heap_returns_to_os() -> None:
    """Make glibc give large freed buffers back to the OS at once (Linux only; elsewhere nothing happens).

    A block pass allocates and frees the same few large buffers (activations, Hessians, GPTQ's copies) block
    after block. glibc raises its mmap threshold each time such a buffer is freed (up to 32 MiB), after which
    those buffers come from the heap, which fragments and never shrinks: SmolLM2's GPTQ at 8192 tokens grew
    to 1872 MB peak RSS with 89 MB of live tensors. A fixed 1 MiB threshold keeps it at 646 MB."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD (fixing it also stops glibc's raising it)
    except (OSError, AttributeError):  # not glibc (musl): nothing to tune
        pass


def open_block_model(ckpt: Checkpoint, device=None) -> BlockModel:
    """The skeleton of ckpt's model (no weights), for block-by-block passes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    heap_returns_to_os()

    arch = arch_of(ckpt.config, ckpt.root / "config.json", "calibrate")
    check_config(ckpt.config, arch, ckpt.root / "config.json")
    if any(FUSED_ON_DISK.search(n) for n in ckpt.tensors):
        raise UnsupportedError("calibration reads per-expert tensors (the hub's layout); this checkpoint fuses them",
                               ckpt.root)
    try:
        config = AutoConfig.from_pretrained(str(ckpt.root), trust_remote_code=False)
    except (ValueError, OSError, TypeError, KeyError) as e:
        raise SourceError(f"transformers cannot read config.json: {str(e).splitlines()[0]}", ckpt.root) from e
    config._attn_implementation = "sdpa"
    config.use_cache = False
    if hasattr(config, "quantization_config"):  # a GPTQ folder: its linears are dequantized as they are read
        del config.quantization_config
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    return BlockModel(ckpt, device if device is not None else pick_device(), skeleton)


def peak_memory(config: dict, n_tokens: int, seqlen: int, method: str) -> dict[str, int]:
    """What one block-at-a-time pass holds at its peak, in bytes, by part (docs/calibration.md's formula), for
    an HF config dict; `method` "imatrix" or "gptq". The runtime itself (Python, torch, transformers) is not
    in it. Nothing here depends on the number of blocks: a deeper model of the same width needs the same."""
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    kv = int(config.get("num_key_value_heads") or heads)
    experts = int(config.get("num_experts") or 0)
    ffn = int(config.get("moe_intermediate_size") or 0) if experts else int(config["intermediate_size"])
    attn_params = hidden * head_dim * (2 * heads + 2 * kv)
    mlp_params = experts * (3 * hidden * ffn + hidden) if experts else 3 * hidden * ffn
    parts = {
        "block": 4 * (attn_params + mlp_params),
        "stream": 4 * n_tokens * hidden,
        "batch": 4 * batch_size(seqlen, hidden, ffn) * seqlen * (3 * max(ffn, hidden) + seqlen),
        "embedding rows": 4 * min(n_tokens, int(config.get("vocab_size") or n_tokens)) * hidden,
    }
    inputs = [hidden, heads * head_dim] + ([hidden, ffn] * experts if experts else [hidden, ffn])
    if method == "gptq":
        parts["hessians"] = 4 * sum(i * i for i in inputs)
        parts["solving the widest"] = 8 * max(inputs) ** 2
    else:
        parts["square sums"] = 8 * sum(inputs)
    return parts


# --------------------------------------------------------------------------- observing linear inputs


@contextlib.contextmanager
def observing(layer, prefix: str, observe: Observer) -> Iterator[None]:
    """Calls observe(names, x) with the input of every linear of a block while it runs.

    Linears that read the same tensor (q/k/v, gate/up) are reported once with all their names.
    A Qwen3-MoE expert set is observed per expert: the tokens routed to expert e, then the input
    of its down_proj (act(gate x) * up x), recomputed from the block's current weights.
    """
    import torch

    handles = []
    last: dict = {"x": None, "names": None}
    layer_no = prefix.split(".")[2]

    def linear_hook(name: str):
        def hook(module, args):
            x = args[0]
            if x is last["x"]:  # same tensor as the previous linear: one observation, more names
                last["names"].append(name)
                return
            flush()
            last["x"], last["names"] = x, [name]
        return hook

    def flush():
        if last["x"] is not None:
            observe(last["names"], last["x"].reshape(-1, last["x"].shape[-1]))
            last["x"], last["names"] = None, None

    def experts_hook(module, args):
        flush()
        hidden, top_k_index = args[0], args[1]
        with torch.no_grad():
            for e in range(module.gate_up_proj.shape[0]):
                tokens = (top_k_index == e).any(dim=-1).nonzero().squeeze(-1)
                names = [expert_weight(layer_no, e, p) for p in PROJ]
                x = hidden[tokens]
                observe(names[:2], x)
                gate, up = torch.nn.functional.linear(x, module.gate_up_proj[e]).chunk(2, dim=-1)
                observe(names[2:], module.act_fn(gate) * up)

    for name, module in layer.named_modules():
        if isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_pre_hook(linear_hook(f"{prefix}{name}.weight")))
        elif hasattr(module, "gate_up_proj") and hasattr(module, "down_proj") and name.endswith("experts"):
            handles.append(module.register_forward_pre_hook(experts_hook))
    try:
        yield flush
    finally:
        for h in handles:
            h.remove()
        last["x"], last["names"] = None, None


def run_block(layer, x, position_embeddings, batch: int, flush: Callable[[], None] | None = None,
              update: bool = True) -> None:
    """x <- layer(x), in place, `batch` sequences at a time (update=False: run for the observers only)."""
    import torch

    with torch.no_grad():
        for b0 in range(0, x.shape[0], batch):
            out = layer(x[b0: b0 + batch], attention_mask=None, position_embeddings=position_embeddings)
            if flush is not None:
                flush()
            if update:
                x[b0: b0 + batch] = out[0] if isinstance(out, tuple) else out


def batch_size(seqlen: int, hidden: int, ffn: int, budget_bytes: int = 256 << 20) -> int:
    """Sequences per forward call so that one batch's intermediates stay near budget_bytes."""
    per_seq = 4 * seqlen * (max(ffn, hidden) * 3 + seqlen)
    return max(1, budget_bytes // max(1, per_seq))


def ffn_size(config) -> int:
    return int(max(getattr(config, "intermediate_size", 0) or 0, getattr(config, "moe_intermediate_size", 0) or 0))


def blocks(model: BlockModel, tokens: np.ndarray) -> Iterator[tuple[int, object, object, object]]:
    """Yield (i, block i, the residual stream x entering it, rotary) for each block; x is updated by the caller."""
    x = model.embed(tokens)
    rope = model.rotary(tokens.shape[1])
    for i in range(model.n_layer):
        layer = model.block(i)
        try:
            yield i, layer, x, rope
        finally:
            model.free(i)


def ensure_torch(what: str) -> None:
    """One line, not an ImportError, when torch or transformers is missing."""
    import importlib.util

    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise UnsupportedError(f"{what} needs {' and '.join(missing)}: pip install \"qwqq[calib]\"")


def threads_for_torch(threads: int) -> None:
    import torch

    torch.set_num_threads(threads if threads > 0 else (os.cpu_count() or 1))

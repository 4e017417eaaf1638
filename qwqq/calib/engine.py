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

The skeleton is transformers' text *ForCausalLM of the config's text part, so a multimodal release
(Qwen3.5: model.language_model.*) is read through its family's rename, and its vision tower and MTP block
are never built. The hybrids' Gated DeltaNet layers run without a cache: each window starts from a zero
recurrent and conv state, as every window starts from position 0 for attention.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from qwqq.archs import arch_of, check_config, hparams
from qwqq.archs.tensors import EMBEDDING, FINAL_NORM
from qwqq.archs.experts import FUSED_PARAMS, PROJ, expert_weight, mlx_stacked
from qwqq.calib import latent as latent_stats
from qwqq.errors import QwqqError, SourceError, UnsupportedError
from qwqq.source import Checkpoint, RowReader

if TYPE_CHECKING:
    import torch

Observer = Callable[[list[str], "torch.Tensor"], None]


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
    # The text model's weight name (what the skeleton calls it) -> the checkpoint's, where they differ (a
    # multimodal release's model.language_model.*: the family's Arch.rename); absent: the same name.
    names: dict[str, str] = field(default_factory=dict)
    latent: tuple[str, ...] = ()  # the family's latent-attention statistics (Arch.absorbed_inputs; calib/latent.py)

    @property
    def config(self):
        return self.skeleton.config

    @property
    def n_layer(self) -> int:
        return len(self.skeleton.model.layers)

    def close(self) -> None:
        self.reader.close()

    def source_name(self, hf_name: str) -> str:
        """The checkpoint's name of a text-model weight."""
        return self.names.get(hf_name, hf_name)

    def has(self, hf_name: str) -> bool:
        return self.source_name(hf_name) in self.ckpt.tensors

    def tensor(self, hf_name: str):
        """One source tensor (named as the text model names it) as float32 on the device."""
        import torch

        hf_name = self.source_name(hf_name)
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

        ref = self.ckpt.tensors[self.source_name(EMBEDDING)]
        uniq, inverse = np.unique(tokens, return_inverse=True)
        rows = self.dequantize(ref.name, uniq) if self.dequantize is not None else None  # MLX quantizes it
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
            for name, buf in layer.named_buffers():  # stored buffers (DeepSeek's router correction bias)
                if self.has(prefix + name):
                    buf.copy_(self.tensor(prefix + name).reshape(buf.shape))
        layer.eval()
        return layer

    def free(self, i: int) -> None:
        self.skeleton.model.layers[i].to("meta")

    def _param(self, prefix: str, name: str, shape: tuple[int, ...]):
        import torch

        layer_no = prefix.split(".")[2]
        fused = name in FUSED_PARAMS
        if fused and self.has(mlx_stacked(layer_no, "down")):  # an MLX folder: experts stacked
            t = self.tensor(mlx_stacked(layer_no, "down")) if name.endswith("down_proj") else \
                torch.cat([self.tensor(mlx_stacked(layer_no, "gate")), self.tensor(mlx_stacked(layer_no, "up"))], dim=1)
        elif fused and not self.has(prefix + name):  # the hub's layout: one tensor per expert
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
            raise SourceError(f"tensor {self.source_name(prefix + name)} is {list(t.shape)}, the config implies "
                              f"{list(shape)}", self.ckpt.root)
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


def quiet_kernel_fallbacks() -> None:
    """transformers says once per kernel that a Gated DeltaNet layer runs its reference PyTorch code (no
    causal-conv1d / flash-linear-attention for the device): exact, as the tests hold it, so not a user's
    concern, and a stray stderr line would break qwqq's one-line errors."""
    import logging

    logging.getLogger("transformers.integrations.hub_kernels").setLevel(logging.ERROR)


def text_names(ckpt: Checkpoint, arch) -> dict[str, str]:
    """The text model's weight names -> the checkpoint's, where a family renames them (a multimodal release's
    language tower); its vision tower and multi-token-prediction block are not the text model's (not run)."""
    if arch.rename is None:
        return {}
    n_layer = int(hparams(ckpt.config)["num_hidden_layers"])
    out = {}
    for name in ckpt.tensors:
        new = arch.rename(name, n_layer)
        if new is not None and new != name:
            out[new] = name
            if name.endswith(".qweight"):  # a GPTQ folder's linear: its weight is read through `dequantize`
                out[new.removesuffix(".qweight") + ".weight"] = name.removesuffix(".qweight") + ".weight"
    return out


def open_block_model(ckpt: Checkpoint, device=None) -> BlockModel:
    """The skeleton of ckpt's text model (no weights), for block-by-block passes: transformers' *ForCausalLM
    of the config's text part (a multimodal release's text_config), whatever the checkpoint's own class."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    heap_returns_to_os()
    quiet_kernel_fallbacks()

    arch = arch_of(ckpt.config, ckpt.root / "config.json", "calibrate")
    check_config(ckpt.config, arch, ckpt.root / "config.json")
    try:
        config = AutoConfig.from_pretrained(str(ckpt.root), trust_remote_code=False)
        text = config.get_text_config()
    except (ValueError, OSError, TypeError, KeyError) as e:
        raise SourceError(f"transformers cannot read config.json: {str(e).splitlines()[0]}", ckpt.root) from e
    text._attn_implementation = latent_stats.register() if arch.absorbed_inputs else "sdpa"
    text.use_cache = False
    for c in {id(config): config, id(text): text}.values():
        if hasattr(c, "quantization_config"):  # a GPTQ folder: its linears are dequantized as they are read
            del c.quantization_config
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(text, dtype=torch.float32, trust_remote_code=False)
    return BlockModel(ckpt, device if device is not None else pick_device(), skeleton, names=text_names(ckpt, arch),
                      latent=tuple(stat for _, stat in arch.absorbed_inputs))


def peak_memory(config: dict, n_tokens: int, seqlen: int, method: str) -> dict[str, int]:
    """What one block-at-a-time pass holds at its peak, in bytes, by part (docs/calibration.md's formula), for
    an HF config dict; `method` "imatrix" or "gptq". The runtime itself (Python, torch, transformers) is not
    in it. Nothing here depends on the number of blocks: a deeper model of the same width needs the same."""
    config = hparams(config)  # a multimodal release's text_config
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
def observing(layer, prefix: str, observe: Observer, latent: tuple[str, ...] = ()) -> Iterator[None]:
    """Calls observe(names, x) with the input of every linear of a block while it runs.

    Linears that read the same tensor (q/k/v, gate/up) are reported once with all their names.
    A Qwen3-MoE expert set is observed per expert: the tokens routed to expert e, then the input
    of its down_proj (act(gate x) * up x), recomputed from the block's current weights. `latent`: the
    statistics of a latent attention's absorbed matrices (calib/latent.py), e.g. "self_attn.q_nope".
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
    undo = latent_stats.observe_latent(layer, prefix, latent, observe) if latent else []
    try:
        yield flush
    finally:
        for h in handles:
            h.remove()
        for u in undo:
            u()
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

"""Where the transformers backend's weights come from (qwqq.run.backends.transformers loads through these):

- a GPTQ folder on GPTQModel's kernels (GPTQModel and optimum installed): loaded by transformers'
  from_pretrained, or by GPTQModel.load where transformers would leave weights unloaded (transformers 5.23 +
  optimum 2.3 skip Qwen3-MoE's per-expert GPTQ linears): load_gptq_kernels;
- a GPTQ folder without them: its packed weights dequantized into float (qwqq.gptq.packing.dequantize:
  scale[g] * (q - zero[g]), as the kernels compute them) in a plain transformers model built from the config
  without its quantization_config: the same weights, more memory, slower (dequantized_note says so). That model
  is built on the meta device and its parameters filled one tensor at a time (read from the validated
  safetensors by qwqq.source), so memory is the model's float weights plus one tensor: load_dequantized. It is
  the text model (transformers' *ForCausalLM of the config's text part), whose parameters are found under the
  checkpoint's own names through the family's rename (a Qwen3.5 release's `model.language_model.*`; its vision
  tower and MTP block are not loaded);
- an unquantized folder, with AutoModelForCausalLM.from_pretrained (a parameter it finds no weights for is an
  error, never a silently random weight), optionally quantized while it loads by bitsandbytes (NF4 with
  double-quantized scales, blocks of 64, as QLoRA; the embedding and lm_head stay in the checkpoint's dtype, as
  bitsandbytes leaves them): load_unquantized, nf4_config.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np

from qwqq.archs import arch_of, check_config
from qwqq.archs.experts import FUSED_PARAMS, PER_EXPERT, expert_weight
from qwqq.errors import SourceError, UnsupportedError
from qwqq.gptq.linears import text_names
from qwqq.gptq.packing import GPTQ_BITS, default_g_idx, dequantize
from qwqq.source import Checkpoint, RowReader

KERNEL_PACKAGES = ("gptqmodel", "optimum")  # transformers loads GPTQ checkpoints through both
GPTQ_FORMATS = ("gptq", "gptq_v2")  # checkpoint formats qwqq can dequantize (not marlin, bitblas, ...)
LAYER_PARAM = re.compile(r"^(model\.layers\.\d+\.)(.+)$")


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def missing_kernels() -> list[str]:
    """The packages transformers needs for GPTQ kernels that are not installed here."""
    return [m for m in KERNEL_PACKAGES if importlib.util.find_spec(m) is None]


def dequantized_note(missing: list[str]) -> str:
    who = " and ".join("GPTQModel" if m == "gptqmodel" else m for m in missing)
    return (f"note: {who} {'is' if len(missing) == 1 else 'are'} not installed: running the GPTQ weights dequantized "
            f"to float (same weights, more memory, slower); pip install {' '.join(missing)} for its kernels")


def _unloaded(info: dict, config: dict) -> list[str]:
    """Parameters from_pretrained left without weights (a tied lm_head is not one)."""
    tied = bool(config.get("tie_word_embeddings"))
    return sorted(k for k in info.get("missing_keys", ()) if not (tied and k == "lm_head.weight"))


# ---------------------------------------------------------------- GPTQ weights dequantized
class DequantizedLoader:
    """Fills a meta-device transformers model with a GPTQ checkpoint's weights, dequantized, one tensor at a time."""

    def __init__(self, ckpt: Checkpoint, qcfg: dict):
        self.ckpt, self.reader = ckpt, RowReader()
        names = text_names(ckpt.config)  # the text model's name of each checkpoint tensor
        self.hub = {text: name for name in ckpt.tensors if (text := names.text(name)) is not None}
        try:
            self.bits = int(qcfg.get("bits", 4))
            self.group_size = int(qcfg.get("group_size", 128))
        except (TypeError, ValueError):
            raise SourceError("quantization_config bits / group_size are not numbers", ckpt.root / "config.json") from None
        self.fmt = str(qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq").lower()
        if self.bits not in GPTQ_BITS:
            raise UnsupportedError(f"{self.bits}-bit GPTQ is not a width qwqq can dequantize "
                                   f"({', '.join(map(str, GPTQ_BITS))}); pip install gptqmodel", ckpt.root)
        if self.fmt not in GPTQ_FORMATS:
            raise UnsupportedError(f"GPTQ checkpoint format {self.fmt!r} cannot be dequantized by qwqq "
                                   f"(it reads {', '.join(GPTQ_FORMATS)}); pip install gptqmodel optimum for its kernels",
                                   ckpt.root)

    def close(self) -> None:
        self.reader.close()

    def _raw(self, name: str, dtype) -> np.ndarray:
        ref = self.ckpt.tensors[name]
        want = {"I32": np.int32, "F16": np.float16}
        if want.get(ref.dtype) != dtype:
            raise SourceError(f"tensor {name}: dtype {ref.dtype}, a GPTQ checkpoint stores "
                              f"{'I32' if dtype == np.int32 else 'F16'}", ref.file)
        return self.reader.read_raw(ref, 0, ref.rows).view(dtype).reshape(ref.shape)

    def linear(self, module: str) -> np.ndarray:
        """float32 [out, in]: scale[g_idx] * (q - zero[g_idx])."""
        qweight = self._raw(f"{module}.qweight", np.int32)
        packed = {"qweight": qweight, "qzeros": self._raw(f"{module}.qzeros", np.int32),
                  "scales": self._raw(f"{module}.scales", np.float16)}
        in_features = qweight.shape[0] * 32 // self.bits
        if f"{module}.g_idx" in self.ckpt.tensors:
            packed["g_idx"] = self._raw(f"{module}.g_idx", np.int32)
        else:  # older checkpoints without act-order leave it out
            packed["g_idx"] = default_g_idx(in_features, self.group_size)
        try:
            return dequantize(packed, self.bits, self.fmt)
        except (ValueError, IndexError) as e:
            raise SourceError(f"GPTQ tensors of {module} do not fit together ({one_line(e)})", self.ckpt.root) from None

    def tensor(self, name: str) -> np.ndarray:
        """One weight (the text model's name) as float32: stored as is, or a GPTQ linear dequantized."""
        ref = self.ckpt.tensors.get(self.hub.get(name, ""))
        if ref is not None:
            return self.reader.read_f32(ref, 0, ref.rows).reshape(ref.shape)
        qweight = self.hub.get(name.removesuffix(".weight") + ".qweight")
        if name.endswith(".weight") and qweight is not None:
            return self.linear(qweight.removesuffix(".qweight"))
        raise SourceError(f"tensor {name} is missing", self.ckpt.root)

    def param(self, name: str) -> np.ndarray:
        """A parameter of the transformers model by its own name (fused experts built from per-expert tensors)."""
        m = LAYER_PARAM.match(name)
        if m and m.group(2) in FUSED_PARAMS and name not in self.hub:
            prefix, which = m.group(1), m.group(2)
            layer = prefix.split(".")[2]
            experts = sorted({int(k.group(2)) for t in self.hub if (k := PER_EXPERT.match(t)) and k.group(1) == layer})
            if which.endswith("down_proj"):
                parts = [self.tensor(expert_weight(layer, e, "down")) for e in experts]
            else:  # transformers 5 fuses gate and up: rows [gate; up]
                parts = [np.concatenate([self.tensor(expert_weight(layer, e, "gate")),
                                         self.tensor(expert_weight(layer, e, "up"))]) for e in experts]
            return np.stack(parts) if parts else np.zeros((0,), np.float32)
        return self.tensor(name)


def _rebuild_buffers(model, device) -> None:
    """Modules built on the meta device have meta buffers (rotary inv_freq): build those modules again for real."""
    import torch

    for name, module in list(model.named_modules()):
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        try:
            with torch.device(device):
                fresh = type(module)(config=model.config)
        except TypeError as e:
            raise UnsupportedError(f"cannot rebuild {type(module).__name__} ({one_line(e)})") from None
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, fresh)


def load_dequantized(ckpt: Checkpoint, path: Path, device, dtype):
    """A GPTQ folder as a plain transformers model whose weights are the dequantized GPTQ weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = arch_of(ckpt.config, path / "config.json", "gptq")
    check_config(ckpt.config, arch, path / "config.json")
    loader = DequantizedLoader(ckpt, ckpt.config.get("quantization_config") or {})
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False).get_text_config()
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False,
                                                     attn_implementation="sdpa")
        real: dict[int, torch.nn.Parameter] = {}  # meta parameter -> its real one (tied weights share one)
        for name, meta in list(model.named_parameters(remove_duplicate=False)):
            param = real.get(id(meta))
            if param is None:
                if name == "lm_head.weight" and name not in loader.hub and getattr(config, "tie_word_embeddings", False):
                    arr = loader.param("model.embed_tokens.weight")
                else:
                    arr = loader.param(name)
                if tuple(arr.shape) != tuple(meta.shape):
                    raise SourceError(f"tensor {name} is {list(arr.shape)}, the config implies {list(meta.shape)}", path)
                param = torch.nn.Parameter(torch.from_numpy(arr).to(device=device, dtype=dtype), requires_grad=False)
                real[id(meta)] = param
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._parameters[leaf] = param
        _rebuild_buffers(model, device)
    finally:
        loader.close()
    return model.eval()


# ---------------------------------------------------------------- GPTQ with GPTQModel's kernels
_KEEP: dict[int, object] = {}  # id(model) -> GPTQModel's wrapper of it


def release(model) -> None:
    """Let go of what was kept alive alongside `model` (GPTQModel's wrapper), when the model is closed."""
    _KEEP.pop(id(model), None)


def load_gptq_kernels(ckpt: Checkpoint, path: Path, device, dtype):
    """A GPTQ folder on GPTQModel's kernels: through transformers' own GPTQ loader (optimum), or, where that
    leaves weights unloaded, through GPTQModel's loader. transformers 5.23 + optimum 2.3 do not load Qwen3-MoE
    experts (the model fuses them, the checkpoint has a GPTQ linear per expert), which GPTQModel.load does."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.float16 if dtype == torch.float32 else dtype  # the kernels compute in float16 / bfloat16
    if not any(PER_EXPERT.match(name) for name in ckpt.tensors):
        model, info = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, device_map=str(device), trust_remote_code=False, use_safetensors=True,
            attn_implementation="sdpa", output_loading_info=True)
        if not _unloaded(info, ckpt.config) and not info.get("unexpected_keys"):
            return model.eval(), "gptq kernels (GPTQModel via transformers)"
        del model
    from gptqmodel import GPTQModel

    loaded = GPTQModel.load(str(path), device=str(device), dtype=dtype, trust_remote_code=False)
    model = loaded.model
    _KEEP[id(model)] = loaded  # GPTQModel's wrapper (a Module holding the model) lives as long as the model
    return model.eval(), "gptq kernels (GPTQModel)"


# ---------------------------------------------------------------- unquantized, or bitsandbytes NF4 on load
def nf4_config(dtype):
    """NF4 4-bit weights, their per-64 scales themselves quantized (double quant: about 4.13 bits a weight),
    computing in the model's dtype (bf16 on the CPU for a bf16 checkpoint)."""
    import torch
    from transformers import BitsAndBytesConfig

    compute = dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def load_unquantized(ckpt: Checkpoint, path: Path, device, dtype, nf4: bool):
    """An unquantized folder with from_pretrained (quantized to NF4 on load when `nf4`); every parameter must
    find its weights."""
    from transformers import AutoModelForCausalLM

    extra = {"quantization_config": nf4_config(dtype)} if nf4 else {}
    model, info = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, device_map=str(device), trust_remote_code=False, use_safetensors=True,
        attn_implementation="sdpa", output_loading_info=True, **extra)
    unloaded = _unloaded(info, ckpt.config)
    if unloaded:
        raise SourceError(f"transformers found no weights for {len(unloaded)} parameters "
                          f"(first: {unloaded[0]})", path)
    return model.eval(), "bitsandbytes nf4" if nf4 else "unquantized"

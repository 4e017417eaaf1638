"""The architectures qwqq knows, one module per family, found by config.json's model_type (or class name).

Each module (qwen2.py, qwen3.py, qwen3_moe.py, llama.py, deepseek_v3.py) builds one `Arch`: the names it
answers to, its GGUF architecture and metadata, the tensor shapes a config implies, what a runtime keeps
per token, its sampling recommendation. The generic machinery every family shares lives beside them:
base.py (the Arch record, config checks, the llama-style decoder's shapes and dims), tensors.py (a
checkpoint under GGUF names, through gguf-py's TensorNameMap), experts.py (how experts are stored and
the one splitter of fused expert tensors). Adding a family: docs/architecture.md.
"""

from __future__ import annotations

from qwqq.archs import deepseek_v3, llama, qwen2, qwen3, qwen3_5, qwen3_5_moe, qwen3_moe, qwen3_next
from qwqq.archs.base import (COMMON, MOE, Arch, Dims, Meta, Sampling, cfg, check_config, head_dim, hparams, name_key,
                              rope_params, short)
from qwqq.archs.experts import EXPERT, FUSED_EXPERT
from qwqq.archs.refused import refusal
from qwqq.archs.tensors import (LAYER, LINEAR, SKIPPED, GGUFTensor, Part, block_count, gguf_tensors, hub_shapes, left_out,
                               mlx_name, release_shapes)
from qwqq.errors import SourceError, UnsupportedError

FAMILIES = (qwen2, qwen3, qwen3_moe, qwen3_5, qwen3_5_moe, qwen3_next, llama, deepseek_v3)  # sampling patterns are tried in this order
KNOWN: dict[str, Arch] = {c: m.ARCH for m in FAMILIES for c in (m.ARCH.hf_class, *m.ARCH.also_classes)}
ARCHS: dict[str, Arch] = {m.ARCH.hf_class: m.ARCH for m in FAMILIES if m.ARCH.quantizable}  # what quantize accepts
BY_MODEL_TYPE: dict[str, Arch] = {t: m.ARCH for m in FAMILIES for t in m.ARCH.model_types}


def model_type_of(config: dict) -> str | None:
    """config.json's model_type, or its text_config's (the language tower of a multimodal release)."""
    text = config.get("text_config")
    for value in (config.get("model_type"), text.get("model_type") if isinstance(text, dict) else None):
        if isinstance(value, str) and value in BY_MODEL_TYPE:
            return value
    return None


def find_arch(config: dict, where=None) -> Arch:
    """The family of a config.json (fit-only families included), found by its model_type (or a nested
    text_config's) as mlx-lm finds its model modules, else by its class; architectures[0] must be a class
    of that family. Unknown, missing or contradictory: one line naming what qwqq supports."""
    names = config.get("architectures")
    if (why := refusal(config)) is not None:
        raise UnsupportedError(why, where)
    if not names:
        raise UnsupportedError(f"config.json names no architecture; supported: {', '.join(ARCHS)}", where)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise SourceError(f"malformed architectures {short(names)}: expected a list of class names", where)
    model_type = model_type_of(config)
    family = BY_MODEL_TYPE[model_type] if model_type else KNOWN.get(names[0])
    if family is not None and names[0] in (family.hf_class, *family.also_classes):
        return family
    if family is not None and names[0] in KNOWN:
        raise SourceError(f"architecture {names[0]} is not a {model_type} class: config.json contradicts itself", where)
    raise UnsupportedError(f"architecture {short(names[0])} is not supported; supported: {', '.join(ARCHS)}", where)


JOBS = {"gguf": "a GGUF", "mlx": "an MLX folder", "gptq": "a GPTQ checkpoint",
        "calibrate": "an importance matrix (calibrated through transformers)"}


def arch_of(config: dict, where=None, job: str = "gguf") -> Arch:
    """The family quantize, calibration and the runtimes work with for `job` (gguf, mlx, gptq, calibrate):
    a supported one, else one line."""
    arch = find_arch(config, where)
    if not arch.quantizable:
        raise UnsupportedError(f"architecture {arch.hf_class} is not supported; supported: {', '.join(ARCHS)}", where)
    if job not in arch.jobs:
        names = [JOBS[j] for j in arch.jobs]
        can = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]
        raise UnsupportedError(f"{arch.hf_class}: qwqq makes {can} of it so far, not {JOBS[job]}", where)
    return arch


def check_gguf_arch(name: str | None, where=None) -> None:
    """A GGUF of a family qwqq refuses (archs/refused.py): one line naming it, before anything reads on."""
    if (why := refusal(gguf_arch=name)) is not None:
        raise UnsupportedError(why, where)


def sampling_table() -> tuple[Sampling, ...]:
    """Every family's sampling recommendations, in the order they are tried."""
    return tuple(s for m in FAMILIES for s in m.ARCH.sampling)


__all__ = ["ARCHS", "BY_MODEL_TYPE", "block_count", "left_out", "COMMON", "EXPERT", "FAMILIES", "FUSED_EXPERT", "KNOWN", "LAYER", "LINEAR", "MOE", "SKIPPED", "Arch",
           "Dims", "GGUFTensor", "Meta", "Part", "Sampling", "arch_of", "cfg", "check_config", "check_gguf_arch", "find_arch",
           "gguf_tensors", "head_dim", "hparams", "hub_shapes", "mlx_name", "model_type_of", "name_key", "refusal", "release_shapes", "rope_params", "sampling_table", "short"]

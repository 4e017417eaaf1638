"""Families qwqq knows by name but does not handle yet, as data: each is refused in one line that names its
architecture and says why, wherever a model of it arrives (quantize, imatrix, fit, run, eval), by its
config.json (class, model_type, a nested text_config's model_type) or by a GGUF's general.architecture.
Without an entry here such a model would meet a generic "not supported" (a config) or half-way failures
(a GGUF llama.cpp may know: fit's memory model, a load)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Refused:
    models: str  # the models, as people know them
    classes: tuple[str, ...]  # config.json architectures[0]
    model_types: tuple[str, ...]  # config.json model_type (or text_config's)
    gguf_archs: tuple[str, ...]  # llama.cpp's general.architecture
    why: str


REFUSED = (
    Refused("Qwen3.8-Flash-Next", classes=("Qwen4ExpForConditionalGeneration", "Qwen4ExpForCausalLM"),
            model_types=("qwen4_exp", "qwen4_exp_text", "qwen4exp"), gguf_archs=("qwen4exp",),
            why="its decoder (Gated DeltaNet with a sparse-attention indexer, 512 experts, hyper-connections, a "
                "51B-parameter n-gram embedding) has no tensor plan, memory model or calibration in qwqq yet"),
    Refused("DeepSeek-V3.2", classes=("DeepseekV32ForCausalLM",), model_types=("deepseek_v32",),
            gguf_archs=("deepseek32",),
            why="its sparse attention (a lightning indexer choosing each token's keys) has no tensor plan, memory "
                "model or calibration in qwqq yet; DeepSeek-V3 / R1 / V3.1 are supported"),
    Refused("DeepSeek-V4", classes=("DeepseekV4ForCausalLM",), model_types=("deepseek_v4",), gguf_archs=(),
            why="neither transformers 5.25, mlx-lm 0.32.2 nor llama-cpp-python 0.3.36's llama.cpp has a DeepSeek-V4 "
                "model, so there is no reference to hold a tensor plan against; DeepSeek-V3 / R1 / V3.1 are supported"),
)


def refusal(config: dict | None = None, gguf_arch: str | None = None) -> str | None:
    """The one-line reason a config.json or a GGUF architecture is refused, or None."""
    names = (config or {}).get("architectures")
    first = names[0] if isinstance(names, list) and names and isinstance(names[0], str) else None
    text = (config or {}).get("text_config")
    types = {t for t in ((config or {}).get("model_type"), text.get("model_type") if isinstance(text, dict) else None)
             if isinstance(t, str)}  # a damaged config's model_type may be anything: its refusal comes later
    for r in REFUSED:
        if first in r.classes:
            named = f"architecture {first}"
        elif types & set(r.model_types):
            named = f"model_type {next(t for t in types if t in r.model_types)}"
        elif gguf_arch is not None and gguf_arch in r.gguf_archs:
            named = f"GGUF architecture {gguf_arch}"
        else:
            continue
        return f"{named} ({r.models}) is not supported: {r.why}"
    return None

"""Inference backends: what a backend is, which ones exist, and which one runs a path.

A backend is a module-level object with

    name: str                          "llama.cpp"
    formats: tuple[str, ...]           ("gguf",)
    auto_formats: tuple[str, ...]      optional: the formats `--backend auto` picks it for (default: formats)
    unavailable_reason() -> str | None None when usable here, else one line saying what to do
    load(path, options) -> ChatModel

and a ChatModel has

    metadata: dict[str, str]           the model's key/values (GGUF metadata for llama.cpp)
    render(messages) -> str            the prompt the model's chat template makes, generation prompt added
    stream_chat(messages, sampling, max_tokens) -> Iterator[str]   text pieces as they come
    finish_reason: str | None          "stop" or "length" after a stream ran out, else None
    close()

Backends are found through the entry-point group "qwqq.backends"; the built-ins are
also listed here directly so a plain source checkout works without installing.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Iterator, Protocol, runtime_checkable

from qwqq.archs import check_gguf_arch, refusal
from qwqq.errors import UnsupportedError
from qwqq.formats import detect_format
from qwqq.gguf.reader import read_gguf
from qwqq.run.folder import read_json
from qwqq.run.sampling import Sampling
from qwqq.run.template import ChatTemplate


ENTRY_POINT_GROUP = "qwqq.backends"
BUILTIN = {"llama.cpp": "qwqq.run.backends.llamacpp:backend", "mlx": "qwqq.run.backends.mlx:backend",
           "transformers": "qwqq.run.backends.transformers:backend"}
ALIASES = {"llamacpp": "llama.cpp", "llama": "llama.cpp", "llama-cpp": "llama.cpp", "llama_cpp": "llama.cpp",
           "mlx-lm": "mlx", "mlx_lm": "mlx", "mlxlm": "mlx",
           "hf": "transformers", "torch": "transformers", "pytorch": "transformers"}

# What to tell a user who has a file of this format but no backend that loads it.
FORMAT_HINT = {
    "gguf": 'install llama.cpp support with: pip install "qwqq[llama]"',
    "mlx": 'install MLX support with: pip install "qwqq[mlx]"',
    "gptq": 'install GPTQ support with: pip install "qwqq[gptq]"',
    "safetensors": "this is an unquantized model: quantize it first with `qwqq quantize PATH` "
                   "(or run it as it is with --backend transformers)",
}


@dataclass
class LoadOptions:
    ctx: int = 4096
    n_gpu_layers: int = -1  # -1: all layers (harmless on a CPU-only build)
    n_cpu_moe: int = 0  # llama.cpp: MoE experts of the first N layers kept in system RAM (-1: every layer)
    tensor_split: list[float] | None = None  # llama.cpp: layers over several GPUs in these proportions (qwqq.run.split)
    threads: int = 0  # 0: all usable cores
    seed: int | None = None  # None: random
    debug: bool = False  # let the backend's own logging through
    flash_attn: bool = True  # llama.cpp: needed for a quantized KV cache
    kv_type: str = "f16"  # KV cache element type: f16, q8_0, q4_0
    load_in_4bit: bool = False  # transformers: quantize an unquantized folder to bitsandbytes NF4 while loading


@runtime_checkable
class ChatModel(Protocol):
    metadata: dict[str, str]
    finish_reason: str | None
    template: ChatTemplate  # the model's own chat template (its switches set by the user)

    def render(self, messages: list[dict]) -> str: ...

    def stream_chat(self, messages: list[dict], sampling: Sampling, max_tokens: int) -> Iterator[str]: ...

    def close(self) -> None: ...


@runtime_checkable
class Backend(Protocol):
    name: str
    formats: tuple[str, ...]

    def unavailable_reason(self) -> str | None: ...

    def load(self, path: Path, options: LoadOptions) -> ChatModel: ...


# ---------------------------------------------------------------- registry
def _load_ref(ref: str):
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def backends() -> dict[str, Backend]:
    """All backends this install knows, by name: built-ins first, then entry points."""
    found: dict[str, Backend] = {}
    for name, ref in BUILTIN.items():
        found[name] = _load_ref(ref)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found:
            continue
        try:
            found[ep.name] = ep.load()
        except Exception:  # a broken third-party plugin must not break qwqq
            continue
    return found


def canonical_name(name: str) -> str:
    key = name.strip().lower()
    return ALIASES.get(key, key)


# ---------------------------------------------------------------- choosing
def refuse_family(path: str | Path, fmt: str) -> None:
    """A model of a family qwqq refuses (archs/refused.py, by its GGUF architecture or config.json): one line
    before anything fits or loads it (llama.cpp may know the architecture; qwqq's fit and chat do not)."""
    path = Path(path)
    if fmt == "gguf":
        check_gguf_arch(read_gguf(path).architecture, path)
    elif path.is_dir() and (why := refusal(read_json(path / "config.json"))) is not None:
        raise UnsupportedError(why, path)


def pick_backend(name: str, path: str | Path) -> Backend:
    """The backend that runs `path`: by format for "auto", else the named one, checked."""
    fmt = detect_format(path)
    refuse_family(path, fmt)
    known = backends()
    if canonical_name(name) == "auto":
        candidates = [b for b in known.values() if fmt in getattr(b, "auto_formats", b.formats)]
        for b in candidates:
            if b.unavailable_reason() is None:
                return b
        if candidates:
            raise UnsupportedError(f"{fmt} needs the {candidates[0].name} backend, which is not usable here: {candidates[0].unavailable_reason()}")
        raise UnsupportedError(f"no backend runs {fmt} models here; {FORMAT_HINT.get(fmt, '')}".rstrip("; "), path)
    backend = known.get(canonical_name(name))
    if backend is None:
        raise UnsupportedError(f"unknown backend {name!r}; choose one of: auto, {', '.join(known)}")
    if fmt not in backend.formats:
        others = [b.name for b in known.values() if fmt in b.formats]
        auto = any(fmt in getattr(b, "auto_formats", b.formats) for b in known.values())
        hint = f"use --backend {others[0]}{' or auto' if auto else ''}" if others else FORMAT_HINT.get(fmt, "")
        raise UnsupportedError(f"the {backend.name} backend cannot load {fmt} models; {hint}", path)
    reason = backend.unavailable_reason()
    if reason:
        raise UnsupportedError(f"the {backend.name} backend is not usable here: {reason}")
    return backend

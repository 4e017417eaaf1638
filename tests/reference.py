"""The references qwqq is held against: llama.cpp's own quantizer and reader (via llama-cpp-python)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf

from qwqq.gguf.reader import read_gguf


def llamacpp_quantize(src: Path, dst: Path, mixture: str, threads: int = 2) -> None:
    """Run llama.cpp's llama_model_quantize (what llama-quantize does) on a GGUF."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(gguf.LlamaFileType[f"MOSTLY_{mixture}" if mixture != "F32" else "ALL_F32"])
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src}, {mixture}) returned {rc}")


def tensor_table(path: Path, with_hash: bool = True) -> dict[str, tuple[str, tuple[int, ...], int, str]]:
    """name -> (type name, shape in GGUF ne order, bytes, sha256 of the data)."""
    g = read_gguf(path)
    return {t.name: (t.type.name, t.shape, t.nbytes, g.tensor_sha256(t) if with_hash else "") for t in g.tensors}

"""ctypes binding to ggml's own quantization kernels.

llama-cpp-python installs libggml-base beside libllama; ggml_quantize_chunk there is the very
function llama-quantize calls, so a tensor quantized here is byte-identical to llama.cpp's.
Rows are independent, so callers may run several chunks at once: ctypes drops the GIL for the call.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np

from qwqq.errors import QwqqError

_LIB_NAMES = {
    "linux": ["libggml-base.so"],
    "darwin": ["libggml-base.dylib"],
    "win32": ["ggml-base.dll"],
}


def _candidates() -> list[Path]:
    out = []
    if env := os.environ.get("QWQQ_GGML_LIB"):
        out.append(Path(env))
    spec = importlib.util.find_spec("llama_cpp")
    if spec and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            for sub in ("lib", ""):
                for name in _LIB_NAMES.get(sys.platform, _LIB_NAMES["linux"]):
                    out.append(Path(loc) / sub / name)
    return out


@lru_cache(maxsize=1)
def lib() -> ctypes.CDLL:
    """Load libggml-base (from llama-cpp-python, or QWQQ_GGML_LIB) and declare the calls we use."""
    for path in _candidates():
        if path.is_file():
            break
    else:
        raise QwqqError(
            "ggml's quantization kernels were not found: install llama-cpp-python "
            '(pip install "qwqq[llama]") or point QWQQ_GGML_LIB at libggml-base'
        )
    so = ctypes.CDLL(str(path))
    so.ggml_quantize_chunk.restype = ctypes.c_size_t
    so.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
    ]
    so.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    so.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    so.ggml_quantize_init.restype = None
    so.ggml_quantize_init.argtypes = [ctypes.c_int]
    so.ggml_row_size.restype = ctypes.c_size_t
    so.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    for name in ("ggml_bf16_to_fp32_row", "ggml_fp16_to_fp32_row"):
        getattr(so, name).restype = None
        getattr(so, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    so.ggml_validate_row_data.restype = ctypes.c_bool
    so.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    return so


def row_size(ggml_type: int, n_per_row: int) -> int:
    return lib().ggml_row_size(int(ggml_type), n_per_row)


def requires_imatrix(ggml_type: int) -> bool:
    return bool(lib().ggml_quantize_requires_imatrix(int(ggml_type)))


def init(ggml_type: int) -> None:
    """Build the type's lookup grids once (IQ types) before several threads quantize with it."""
    lib().ggml_quantize_init(int(ggml_type))


def quantize_rows(ggml_type: int, rows: np.ndarray, out: memoryview | np.ndarray, imatrix: np.ndarray | None = None) -> int:
    """Quantize a C-contiguous float32 [nrows, n_per_row] block into `out` (a writable uint8 buffer).

    Returns the bytes written. `imatrix` is float32 [n_per_row] or None.
    """
    if rows.dtype != np.float32 or not rows.flags.c_contiguous or rows.ndim != 2:
        raise ValueError("rows must be a C-contiguous float32 matrix")
    dst = np.frombuffer(out, dtype=np.uint8) if not isinstance(out, np.ndarray) else out
    nrows, n_per_row = rows.shape
    need = nrows * row_size(ggml_type, n_per_row)
    if dst.nbytes < need:
        raise ValueError(f"output buffer holds {dst.nbytes} bytes, needs {need}")
    im = None
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        im = imatrix.ctypes.data
    return lib().ggml_quantize_chunk(int(ggml_type), rows.ctypes.data, dst.ctypes.data, 0, nrows, n_per_row, im)


def to_f32(dtype: str, raw: np.ndarray, out: np.ndarray) -> None:
    """bf16 / f16 bytes -> float32 with ggml's own SIMD row converters (one pass, GIL released)."""
    n = raw.nbytes // 2
    if out.size < n or not out.flags.c_contiguous:
        raise ValueError("output too small or not contiguous")
    fn = {"BF16": lib().ggml_bf16_to_fp32_row, "F16": lib().ggml_fp16_to_fp32_row}[dtype]
    fn(raw.ctypes.data, out.ctypes.data, n)


def validate(ggml_type: int, data: np.ndarray) -> bool:
    return bool(lib().ggml_validate_row_data(int(ggml_type), data.ctypes.data, data.nbytes))


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class _TypeTraits(ctypes.Structure):  # struct ggml_type_traits (ggml.h)
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
                ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


@lru_cache(maxsize=None)
def _to_float(ggml_type: int):
    so = lib()
    so.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    so.ggml_get_type_traits.argtypes = [ctypes.c_int]
    traits = so.ggml_get_type_traits(int(ggml_type)).contents
    if not traits.to_float:
        raise ValueError(f"ggml type {ggml_type} has no dequantizer")
    return _TO_FLOAT(traits.to_float)


def dequantize_rows(ggml_type: int, data: np.ndarray, nrows: int, n_per_row: int) -> np.ndarray:
    """ggml's own dequantizer (the type's to_float): quantized bytes -> float32 [nrows, n_per_row]."""
    out = np.empty((nrows, n_per_row), np.float32)
    src = np.ascontiguousarray(data)
    if src.nbytes < nrows * row_size(ggml_type, n_per_row):
        raise ValueError("not enough quantized data for the rows asked")
    _to_float(ggml_type)(src.ctypes.data, out.ctypes.data, nrows * n_per_row)
    return out

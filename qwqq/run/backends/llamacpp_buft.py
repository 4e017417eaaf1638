"""llama.cpp's tensor buffer-type overrides (`-ot`, `--n-cpu-moe`, `--cpu-moe`) through ctypes.

llama-cpp-python 0.3.36 declares `llama_model_params.tensor_buft_overrides` as an unused `c_void_p` and has no
Llama() argument for it (unknown keyword arguments are silently ignored). llama.cpp reads it while the model
loads: a NULL-terminated array of {const char *pattern; ggml_backend_buffer_type_t buft}, each pattern a
regex searched in every tensor name, the first match winning. Llama() builds its params from
`llama_model_default_params()` and loads the model in the same call, so `overridden_load` hands it params
that already point at the array, for the length of that call (under a lock). The array and its strings are
returned to the caller, who keeps them as long as the model: llama.cpp keeps the pointer in its params.
"""

from __future__ import annotations

import ctypes
import threading
from contextlib import contextmanager

from qwqq.errors import QwqqError

_DEVICE_TYPE_CPU = 0  # GGML_BACKEND_DEVICE_TYPE_CPU (ggml-backend.h)
_lock = threading.Lock()


class TensorBuftOverride(ctypes.Structure):  # struct llama_model_tensor_buft_override (llama.h)
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def cpu_buffer_type() -> int:
    """The CPU buffer type of the ggml llama.cpp runs on: the CPU device's (ggml_backend_dev_buffer_type), which
    is the very pointer llama.cpp compares with ggml_backend_cpu_buffer_type() when it places an override."""
    from llama_cpp import _ggml

    so = _ggml.libggml  # libggml: the backend registry; libggml-base below it
    try:
        so.ggml_backend_dev_by_type.restype = ctypes.c_void_p
        so.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
        so.ggml_backend_dev_buffer_type.restype = ctypes.c_void_p
        so.ggml_backend_dev_buffer_type.argtypes = [ctypes.c_void_p]
        dev = so.ggml_backend_dev_by_type(_DEVICE_TYPE_CPU)
        buft = so.ggml_backend_dev_buffer_type(dev) if dev else None
    except AttributeError:
        buft = None
    if not buft:
        try:
            so.ggml_backend_cpu_buffer_type.restype = ctypes.c_void_p
            so.ggml_backend_cpu_buffer_type.argtypes = []
            buft = so.ggml_backend_cpu_buffer_type()
        except AttributeError:
            buft = None
    if not buft:
        raise QwqqError("this llama.cpp build has no CPU buffer type to keep experts in RAM")
    return buft


def override_array(patterns: list[str], buft: int) -> ctypes.Array:
    """The NULL-terminated array llama.cpp reads (the pattern strings stay alive with it)."""
    import llama_cpp

    if len(patterns) + 1 > llama_cpp.llama_max_tensor_buft_overrides():
        raise QwqqError(f"{len(patterns)} tensor overrides are more than llama.cpp takes "
                        f"({llama_cpp.llama_max_tensor_buft_overrides() - 1})")
    raw = [p.encode("utf-8") for p in patterns]
    arr = (TensorBuftOverride * (len(raw) + 1))()
    for slot, p in zip(arr, raw):
        slot.pattern, slot.buft = p, buft
    arr[len(raw)].pattern, arr[len(raw)].buft = None, None
    arr._keep = raw  # the bytes objects the pointers point into
    return arr


@contextmanager
def overridden_load(patterns: list[str]):
    """Within the block, every Llama() loads its model with these tensors on the CPU buffer type.
    Yields the array (None without patterns); keep it as long as the model."""
    if not patterns:
        yield None
        return
    from llama_cpp import llama_cpp as lib

    arr = override_array(patterns, cpu_buffer_type())
    default = lib.llama_model_default_params

    def with_overrides():
        params = default()
        params.tensor_buft_overrides = ctypes.cast(arr, ctypes.c_void_p).value
        return params

    with _lock:
        lib.llama_model_default_params = with_overrides
        try:
            yield arr
        finally:
            lib.llama_model_default_params = default

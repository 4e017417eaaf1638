"""Reading a GPTQ checkpoint's weights back: a linear dequantized as the kernels compute it (for eval's block
engine)."""

from __future__ import annotations

import numpy as np

from qwqq.errors import SourceError
from qwqq.gptq.packing import PACKED, dequantize, packed_shapes
from qwqq.source import Checkpoint, RowReader


def dequantized(ckpt: Checkpoint, reader: RowReader, module: str, qcfg: dict) -> np.ndarray:
    """A GPTQ linear's weight, dequantized as the kernels do (scale[g] * (q - zero[g]))."""
    refs = {}
    for k in PACKED:
        ref = ckpt.tensors.get(f"{module}.{k}")
        if ref is None:
            raise SourceError(f"GPTQ tensor {module}.{k} is missing", ckpt.root)
        refs[k] = ref
    bits, gs = qcfg.get("bits", 4), qcfg.get("group_size", 128)
    if not isinstance(bits, int) or bits not in (2, 3, 4, 8) or not isinstance(gs, int):
        raise SourceError(f"config.json quantization_config has bits {bits!r}, group_size {gs!r}", ckpt.root)
    in_f, out_f = refs["g_idx"].shape[-1], refs["scales"].shape[-1]
    try:
        want = packed_shapes(out_f, in_f, bits, gs)
    except ValueError as e:
        raise SourceError(f"GPTQ module {module}: {e}", ckpt.root) from None
    for k, ref in refs.items():
        if tuple(ref.shape) != tuple(want[k][1]):
            raise SourceError(f"GPTQ tensor {ref.name} is {list(ref.shape)} but config.json (bits {bits}, group_size "
                              f"{gs}) implies {list(want[k][1])}", ref.file)
    packed = {}
    for k, ref in refs.items():
        dtype = {"I32": np.int32, "F16": np.float16}.get(ref.dtype)
        if dtype is None:
            raise SourceError(f"tensor {ref.name}: dtype {ref.dtype} is not a GPTQ {k} dtype", ref.file)
        packed[k] = reader.read_raw(ref, 0, ref.rows).view(dtype).reshape(ref.shape)
    return dequantize(packed, bits, qcfg.get("checkpoint_format", "gptq"))

"""Reading an MLX folder's weights back: a quantized module dequantized by mlx itself (for eval's block engine)."""

from __future__ import annotations

import numpy as np

from qwqq.errors import SourceError
from qwqq.source import Checkpoint, RowReader


def dequantized(ckpt: Checkpoint, reader: RowReader, module: str, rows: np.ndarray | None = None) -> np.ndarray:
    """An MLX-quantized module's weight (or some of its rows), dequantized by mlx itself: scale * q + bias
    per group, in float32 from the stored scales and biases (as mlx's kernels apply them)."""
    import mlx.core as mx

    quant = ckpt.config.get("quantization")
    per = quant.get(module) if isinstance(quant, dict) else None
    params = per if isinstance(per, dict) else quant
    try:
        bits, group, mode = int(params["bits"]), int(params["group_size"]), params.get("mode", "affine")
    except (KeyError, TypeError, ValueError):
        raise SourceError(f"config.json's quantization block gives no bits / group_size for {module}",
                          ckpt.root) from None
    parts = {}
    for k, dtype in (("weight", np.uint32), ("scales", None), ("biases", None)):
        ref = ckpt.tensors.get(f"{module}.{k}")
        if ref is None:
            if k == "biases" and mode != "affine":
                continue
            raise SourceError(f"MLX tensor {module}.{k} is missing", ckpt.root)
        take = range(ref.rows) if rows is None else rows
        if dtype is None:
            arr = np.stack([reader.read_f32(ref, int(r), int(r) + 1)[0] for r in take]) if rows is not None \
                else reader.read_f32(ref, 0, ref.rows)
        else:
            arr = np.stack([reader.read_raw(ref, int(r), int(r) + 1).view(dtype) for r in take]) \
                if rows is not None else reader.read_raw(ref, 0, ref.rows).view(dtype).reshape(ref.rows, -1)
        shape = ref.shape if rows is None else (len(rows), *ref.shape[1:])
        parts[k] = mx.array(arr.reshape(shape))
    try:
        w = mx.dequantize(parts["weight"], parts["scales"], parts.get("biases"), group_size=group, bits=bits,
                          mode=mode)
    except ValueError as e:
        raise SourceError(f"MLX module {module}: {e}", ckpt.root) from None
    return np.array(w.astype(mx.float32))

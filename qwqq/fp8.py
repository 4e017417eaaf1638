"""Block-scaled FP8 sources (DeepSeek-V3 / R1's release): float8_e4m3fn weights, each with a float32
`<name>_scale_inv` of ceil(rows/128) x ceil(cols/128) scales; W[i, j] = float(q[i, j]) x scale[i // 128,
j // 128] (edge blocks partial). Dequantized here row chunk by row chunk while streaming, in float32, as
llama.cpp's converter does (`dequant_simple`: `weight.float() * scale`), so no tensor is ever whole in memory.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from qwqq.errors import SourceError

FP8_DTYPE = "F8_E4M3"
SCALE_SUFFIX = "_scale_inv"


def _e4m3_table() -> np.ndarray:
    """The 256 float8_e4m3fn values (1 sign, 4 exponent bits biased by 7, 3 mantissa bits; no infinities,
    S.1111.111 is NaN; the largest finite value is 448)."""
    b = np.arange(256, dtype=np.int64)
    exp, man = (b >> 3) & 0xF, (b & 0x7).astype(np.float64)
    val = np.where(exp == 0, man / 8 * 2.0 ** -6, (1 + man / 8) * 2.0 ** (exp - 7))
    val = np.where(b & 0x80, -val, val)
    val[(b & 0x7F) == 0x7F] = np.nan
    return val.astype(np.float32)


E4M3 = _e4m3_table()


def block_size(config: dict) -> tuple[int, int] | None:
    """The (rows, cols) scale block of an FP8 checkpoint (quantization_config), else None."""
    q = config.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != "fp8":
        return None
    bs = q.get("weight_block_size") or [128, 128]
    if not (isinstance(bs, list) and len(bs) == 2 and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in bs)):
        raise SourceError(f"quantization_config weight_block_size is {bs!r}, expected two positive integers")
    return bs[0], bs[1]


def attach_scales(tensors: dict, config: dict, where: Path) -> dict:
    """Each FP8 weight with its block scales attached (TensorRef.scale), the scale tensors (and unused
    activation scales) taken out of the listing, as the converter removes them."""
    block = block_size(config)
    if block is None:
        return tensors
    out = dict(tensors)
    for name, ref in tensors.items():
        if name.endswith(".activation_scale"):
            del out[name]
        if not name.endswith(SCALE_SUFFIX):
            continue
        weight = out.get(name[: -len(SCALE_SUFFIX)])
        if weight is None or weight.dtype != FP8_DTYPE or len(weight.shape) != 2:
            raise SourceError(f"tensor {name} scales no 2-D {FP8_DTYPE} weight", where)
        want = tuple(-(-n // b) for n, b in zip(weight.shape, block))
        if ref.dtype not in ("F32", "BF16") or ref.shape != want:
            raise SourceError(f"tensor {name} is {ref.dtype} {list(ref.shape)}, expected float32 {list(want)} scales "
                              f"for {weight.name} {list(weight.shape)} in {block[0]}x{block[1]} blocks", ref.file)
        out[weight.name] = dataclasses.replace(weight, scale=ref, block=block)
        del out[name]
    return out


def dequantize(raw: np.ndarray, ref, r0: int, r1: int, out: np.ndarray, scale_rows) -> np.ndarray:
    """Rows [r0, r1) of an FP8 weight from its raw bytes: the value table, times each element's block
    scale (`scale_rows(s0, s1)`: float32 rows [s0, s1) of the scale tensor), in float32."""
    rows, cols = r1 - r0, ref.cols
    b0, b1 = ref.block
    np.take(E4M3, raw[: rows * cols], out=out.reshape(-1))
    s0 = r0 // b0
    scale = scale_rows(s0, (r1 - 1) // b0 + 1)
    per_row = np.repeat(scale, b0, axis=0)[r0 - s0 * b0: r1 - s0 * b0]
    out *= np.repeat(per_row, b1, axis=1)[:, :cols]
    return out

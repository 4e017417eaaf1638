"""How much each tensor suffers at each GGUF type: the measurement pass behind budget quantization.

For every quantizable tensor and every type of a ladder, a sample of its rows is quantized with
ggml's own kernels (with the importance matrix where there is one, as the real run will) and
dequantized again, and the relative error of the tensor's output is taken:

    nsr(t, T) = sum_rows sum_c imp[c] (w - w_T)^2  /  sum_rows sum_c imp[c] w^2

imp being the imatrix's mean squared activation of input column c (1 without an imatrix), capped at
IMPORTANCE_CAP times the matrix's median column: the error energy of x @ w.T over the signal energy, for
the calibration inputs. The cap is there because a few columns can carry massive activations (SmolLM2's
blk.11.ffn_down: one column 677,721 x the median, five columns 99.8 % of the importance, from the
attention-sink token); uncapped, the measure sees only those columns and calls 2-bit better than 3-bit.
Capped at 100, the budget file at Q3_K_M's size went from KLD 0.0226 to 0.0155 (docs/bench-pareto.md).
The quantizer itself still gets the whole imatrix. Rows are independent in
every GGUF type, so a strided sample of rows estimates the whole. The sum of nsr over tensors is the
allocator's predicted loss (held against measured KLD in docs/bench-pareto.md). Measured once per
(checkpoint, imatrix, ladder) and cached on disk as JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T

from qwqq.archs import GGUFTensor
from qwqq.gguf import kernels as ggml
from qwqq.gguf.plan import Plan
from qwqq.gguf.quantize import imatrix_rows
from qwqq.gguf.types import FLOAT_TYPES, block_size
from qwqq.gguf.writer import gguf_rows
from qwqq.cache import cache_path, identity, read_cached, write_cached
from qwqq.source import Checkpoint, RowReader

LADDER = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0)  # every step a better type at more bytes
SMALL_ROW_LADDER = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)  # rows not a multiple of 256 (the fallbacks llama.cpp uses)
SAMPLE_ROWS = 256
VERSION = 2
IMPORTANCE_CAP = 100.0  # a column weighs at most this many times its matrix's median column (module docstring)


@dataclass
class Sensitivity:
    """Per tensor (GGUF name): {type name: nsr} over the types its rows allow."""

    errors: dict[str, dict[str, float]]
    imatrix: bool

    def candidates(self, name: str) -> list[tuple[T, float]]:
        return [(T[k], v) for k, v in self.errors[name].items()]


def ladder_for(cols: int) -> tuple[T, ...]:
    types = tuple(t for t in LADDER if cols % block_size(t) == 0)
    return types if len(types) > 1 else tuple(t for t in SMALL_ROW_LADDER if cols % block_size(t) == 0)


def sample_rows_of(src: GGUFTensor, reader: RowReader, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to n rows spread over the tensor (each read from the part that holds it), and each row's expert."""
    pick = np.unique(np.linspace(0, src.rows - 1, min(n, src.rows)).astype(np.int64))
    out = np.empty((pick.size, src.cols), np.float32)
    for k, r in enumerate(pick):
        out[k] = gguf_rows(src, reader, int(r), int(r) + 1)[0]
    rows_per_expert = src.rows // src.shape[0] if len(src.shape) == 3 else src.rows
    return out, pick // rows_per_expert


def capped(imp: np.ndarray, cap: float | None) -> np.ndarray:
    """Each matrix's column importances limited to cap x their median (None: as they are)."""
    if cap is None:
        return imp
    med = np.median(imp, axis=1, keepdims=True)
    return np.minimum(imp, cap * np.where(med > 0, med, imp.mean(axis=1, keepdims=True)))


def tensor_errors(rows: np.ndarray, experts: np.ndarray, imp: np.ndarray | None, types,
                  cap: float | None = IMPORTANCE_CAP) -> dict[str, float]:
    """nsr for each type on these rows; imp is [n_mat, cols] or None (the quantizer gets it uncapped)."""
    w_imp = None if imp is None else capped(imp, cap)
    weights = np.ones((1, rows.shape[1]), np.float32) if imp is None else w_imp[experts] if imp.shape[0] > 1 \
        else np.broadcast_to(w_imp, rows.shape)
    signal = float((weights * rows.astype(np.float64) ** 2).sum()) or 1e-30
    out = {}
    for t in types:
        buf = np.empty(rows.shape[0] * ggml.row_size(t, rows.shape[1]), np.uint8)
        if imp is None or imp.shape[0] == 1:
            ggml.quantize_rows(t, rows, buf, None if imp is None else imp[0])
        else:  # each row with its expert's importance
            rb = ggml.row_size(t, rows.shape[1])
            for k in range(rows.shape[0]):
                ggml.quantize_rows(t, rows[k: k + 1], buf[k * rb: (k + 1) * rb], imp[experts[k]])
        back = ggml.dequantize_rows(t, buf, rows.shape[0], rows.shape[1])
        out[t.name] = float((weights * (rows - back).astype(np.float64) ** 2).sum()) / signal
    return out


def _cache_file(ckpt: Checkpoint, imatrix, sample_rows: int) -> Path:
    return cache_path({"v": VERSION, "cap": IMPORTANCE_CAP, "model": identity(ckpt.root), "rows": sample_rows,
                       "ladder": [t.name for t in LADDER + SMALL_ROW_LADDER],
                       "imatrix": imatrix.digest() if imatrix is not None else None})


def measure(ckpt: Checkpoint, sources: dict[str, GGUFTensor], plan: Plan, imatrix=None, *,
            sample_rows: int = SAMPLE_ROWS, use_cache: bool = True, tick=None) -> Sensitivity:
    """nsr for every tensor the plan quantizes, at every type of its ladder (cached)."""
    cache = _cache_file(ckpt, imatrix, sample_rows)
    data = read_cached(cache) if use_cache else None
    if isinstance(data, dict) and "errors" in data and "imatrix" in data:
        return Sensitivity(data["errors"], data["imatrix"])
    imps = imatrix_rows(plan, imatrix)[0] if imatrix is not None else {}
    errors = {}
    with RowReader() as reader:
        for tp in plan.tensors:
            if not tp.quantized or tp.type in FLOAT_TYPES:
                continue
            rows, experts = sample_rows_of(sources[tp.name], reader, sample_rows)
            errors[tp.name] = tensor_errors(rows, experts, imps.get(tp.name), ladder_for(tp.shape[-1]))
            if tick:
                tick()
    sens = Sensitivity(errors, imatrix is not None)
    if use_cache:
        write_cached(cache, {"errors": errors, "imatrix": sens.imatrix})
    return sens

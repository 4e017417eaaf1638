"""GPTQ's packed layout: codes, zero points and scales of one linear, packed and unpacked as every
GPTQ loader (transformers through GPTQModel, vLLM, SGLang, llama.cpp's converter) reads them.

Per quantized Linear (in_features `in`, out_features `out`, G = ceil(in / group_size) groups, one
when group_size is -1), four tensors beside the module name::

    qweight  int32 [in * bits / 32, out]   codes q[out, in], packed along `in`
    qzeros   int32 [G, out * bits / 32]    zero points, packed along `out`; format v1 ("gptq") stores zero - 1
    scales   fp16  [G, out]
    g_idx    int32 [in]                    the group of each input column (act-order permutes it)

    w[o, i] = scales[g_idx[i], o] * (q[o, i] - zero[g_idx[i], o])

Packing, for every width: the codes of one packed row are a little-endian bit stream, code k at bit
k * bits, cut into 32-bit words. For 2, 4 and 8 bits a word holds 32 / bits whole codes (code j of a
word at bit j * bits); for 3 bits, 32 codes fill 3 words and codes 10 and 21 straddle word
boundaries (GPTQModel's `pack_block`/`dequantize_weight` and auto-gptq's pack spell the same stream
out word by word: 10 codes + 2 bits | 1 bit + 10 codes + 1 bit | 2 bits + 10 codes).

Format v1 and zero points: v1 writes zero - 1. Readers undo it two ways: per code (llama.cpp, vLLM's
exllama kernels: unpack, then + 1) or per packed word (GPTQModel: add 0x11111111 for 4 bits, carries
included). Both agree exactly when every zero point is in 1 .. 2^bits - 1, so `pack` refuses a zero
point of 0 in v1 (symmetric quantization always has 2^(bits-1); an asymmetric solver must clamp its
zero points to >= 1). Format "gptq_v2" stores zeros as they are (GPTQModel and transformers read it;
vLLM does not).
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

GPTQ_BITS = (2, 3, 4, 8)
FORMATS = ("gptq", "gptq_v2")  # checkpoint_format: v1 (zero - 1 stored; what everyone loads), v2
PACKED = ("qweight", "qzeros", "scales", "g_idx")


def _unit(bits: int) -> tuple[int, int]:
    """(codes, words): the smallest whole number of codes that fills whole 32-bit words."""
    if bits not in GPTQ_BITS:
        raise ValueError(f"GPTQ bits must be one of {GPTQ_BITS}, not {bits}")
    g = math.gcd(32, bits)
    return 32 // g, bits // g


def to_numpy(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach"):  # torch
        return x.detach().cpu().numpy()
    return np.asarray(x)


def pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack along the last axis: [..., n] codes in 0 .. 2^bits - 1 -> int32 [..., n * bits / 32]."""
    codes = to_numpy(codes)
    n_codes, n_words = _unit(bits)
    n = codes.shape[-1]
    if n % n_codes:
        raise ValueError(f"{bits}-bit packing needs a multiple of {n_codes} values per row, got {n}")
    lead = codes.shape[:-1]
    if bits == 3:
        v = codes.reshape(*lead, n // 32, 32).astype(np.uint64)
        lo = np.zeros(v.shape[:-1], np.uint64)  # codes 0..20 and bit 0 of code 21: stream bits 0..63
        for k in range(21):
            lo |= v[..., k] << np.uint64(3 * k)
        v21 = v[..., 21]
        lo |= (v21 & np.uint64(1)) << np.uint64(63)
        hi = v21 >> np.uint64(1)  # stream bits 64..95
        for k in range(22, 32):
            hi |= v[..., k] << np.uint64(3 * k - 64)
        words = np.stack([lo & np.uint64(0xFFFFFFFF), lo >> np.uint64(32), hi], axis=-1).astype(np.uint32)
    else:
        per = 32 // bits
        v = codes.reshape(*lead, n // per, per).astype(np.uint32)
        words = v[..., 0].copy()
        for j in range(1, per):
            words |= v[..., j] << np.uint32(j * bits)
    return words.reshape(*lead, n * bits // 32).view(np.int32)


def unpack_rows(words: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of pack_rows: int32 [..., w] -> uint8 codes [..., w * 32 / bits]."""
    words = to_numpy(words)
    n_codes, n_words = _unit(bits)
    w = words.shape[-1]
    if w % n_words:
        raise ValueError(f"{bits}-bit unpacking needs a multiple of {n_words} words per row, got {w}")
    lead = words.shape[:-1]
    u = words.astype(np.int32, copy=False).view(np.uint32)
    mask = (1 << bits) - 1
    if bits == 3:
        u = u.reshape(*lead, w // 3, 3).astype(np.uint64)
        lo = u[..., 0] | (u[..., 1] << np.uint64(32))
        hi = u[..., 2]
        out = np.empty((*lead, w // 3, 32), np.uint8)
        for k in range(21):
            out[..., k] = (lo >> np.uint64(3 * k)) & np.uint64(7)
        out[..., 21] = (lo >> np.uint64(63)) | ((hi & np.uint64(3)) << np.uint64(1))
        for k in range(22, 32):
            out[..., k] = (hi >> np.uint64(3 * k - 64)) & np.uint64(7)
    else:
        per = 32 // bits
        out = np.empty((*lead, w, per), np.uint8)
        for j in range(per):
            out[..., j] = (u >> np.uint32(j * bits)) & np.uint32(mask)
    return out.reshape(*lead, w * 32 // bits)


def n_groups(in_features: int, group_size: int) -> int:
    if group_size == -1:
        return 1
    if group_size <= 0:
        raise ValueError(f"group_size must be positive or -1, not {group_size}")
    return -(-in_features // group_size)


def default_g_idx(in_features: int, group_size: int) -> np.ndarray:
    """g_idx without act-order: column i is in group i // group_size (all in group 0 per channel)."""
    if group_size == -1:
        return np.zeros(in_features, np.int32)
    return (np.arange(in_features, dtype=np.int32) // group_size).astype(np.int32)


def packed_shapes(out_features: int, in_features: int, bits: int, group_size: int) -> dict[str, tuple[str, tuple]]:
    """{suffix: (safetensors dtype, shape)} of one quantized linear."""
    n_codes, _ = _unit(bits)
    for what, n in (("in_features", in_features), ("out_features", out_features)):
        if n % n_codes:
            raise ValueError(f"{bits}-bit GPTQ needs {what} to be a multiple of {n_codes}, got {n}")
    g = n_groups(in_features, group_size)
    return {
        "qweight": ("I32", (in_features * bits // 32, out_features)),
        "qzeros": ("I32", (g, out_features * bits // 32)),
        "scales": ("F16", (g, out_features)),
        "g_idx": ("I32", (in_features,)),
    }


def linear_bytes(out_features: int, in_features: int, bits: int, group_size: int) -> int:
    sizes = {"I32": 4, "F16": 2}
    return sum(math.prod(s) * sizes[d] for d, s in packed_shapes(out_features, in_features, bits, group_size).values())


def _check_codes(x: np.ndarray, maxq: int, lo: int, what: str) -> None:
    if x.size and (int(x.min()) < lo or int(x.max()) > maxq):
        raise ValueError(f"{what} must lie in {lo} .. {maxq}, found {int(x.min())} .. {int(x.max())}")


def pack(q, scales, zeros, g_idx, bits: int, checkpoint_format: str = "gptq", group_size: int | None = None) -> dict:
    """Pack one linear: q [out, in] codes, scales [out, G], zeros [out, G] codes, g_idx [in] (None:
    column i // group_size, a short last group allowed; without group_size, in / G columns a group).
    Returns {qweight, qzeros, scales, g_idx}: torch tensors when q is one, else numpy arrays."""
    as_torch = hasattr(q, "detach")
    q, scales, zeros = to_numpy(q), to_numpy(scales), to_numpy(zeros)
    if checkpoint_format not in FORMATS:
        raise ValueError(f"checkpoint_format must be one of {FORMATS}, not {checkpoint_format!r}")
    maxq = (1 << bits) - 1
    _unit(bits)
    if q.ndim != 2:
        raise ValueError(f"q must be 2-D [out, in], is {q.shape}")
    out_f, in_f = q.shape
    if scales.ndim != 2 or scales.shape[0] != out_f or zeros.shape != scales.shape:
        raise ValueError(f"scales {scales.shape} and zeros {zeros.shape} must both be [out={out_f}, groups]")
    g = scales.shape[1]
    if g_idx is None and group_size is not None:
        if n_groups(in_f, group_size) != g:
            raise ValueError(f"{in_f} columns in groups of {group_size} make {n_groups(in_f, group_size)} groups, "
                             f"scales have {g}")
        g_idx = default_g_idx(in_f, group_size)
    if g_idx is None:
        if in_f % g:
            raise ValueError(f"give g_idx: {in_f} columns do not split evenly into {g} groups")
        g_idx = np.arange(in_f, dtype=np.int32) // (in_f // g)
    g_idx = to_numpy(g_idx)
    if g_idx.shape != (in_f,):
        raise ValueError(f"g_idx must be [{in_f}], is {g_idx.shape}")
    _check_codes(g_idx, g - 1, 0, "g_idx")
    _check_codes(q, maxq, 0, "q")
    v1 = checkpoint_format == "gptq"
    if v1 and zeros.size and int(zeros.min()) == 0:
        raise ValueError("GPTQ format v1 ('gptq') stores zero - 1 and cannot hold a zero point of 0 "
                         "(readers disagree on it): clamp zero points to >= 1, or write 'gptq_v2'")
    _check_codes(zeros, maxq, 1 if v1 else 0, "zero points")
    scales16 = np.ascontiguousarray(scales.T, dtype=np.float16)
    if not np.isfinite(scales16).all():
        raise ValueError("scales overflow float16")
    stored = zeros.T.astype(np.int64) - (1 if v1 else 0)  # [G, out]
    packed = {
        "qweight": np.ascontiguousarray(pack_rows(q, bits).T),  # packed along `in`, stored [in * bits / 32, out]
        "qzeros": pack_rows(stored, bits),
        "scales": scales16,
        "g_idx": np.ascontiguousarray(g_idx, dtype=np.int32),
    }
    if as_torch:
        import torch

        return {k: torch.from_numpy(v) for k, v in packed.items()}
    return packed


def unpack(packed: Mapping, bits: int, checkpoint_format: str = "gptq") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The inverse of pack: (q [out, in] uint8, scales [out, G] float32 (the stored fp16 values),
    zeros [out, G] int16, g_idx [in] int32)."""
    qweight, qzeros = to_numpy(packed["qweight"]), to_numpy(packed["qzeros"])
    scales, g_idx = to_numpy(packed["scales"]), to_numpy(packed["g_idx"])
    q = np.ascontiguousarray(unpack_rows(qweight.T, bits))
    zeros = unpack_rows(qzeros, bits).astype(np.int16) + (1 if checkpoint_format == "gptq" else 0)
    out_f = scales.shape[1]
    return q, np.ascontiguousarray(scales.T.astype(np.float32)), np.ascontiguousarray(zeros[:, :out_f].T), \
        g_idx.astype(np.int32)


def dequantize(packed: Mapping, bits: int, checkpoint_format: str = "gptq") -> np.ndarray:
    """float32 weight [out, in] = scale[g_idx] * (q - zero[g_idx]), computed as the readers do (fp16
    scale widened to float32, times the integer difference)."""
    q, scales, zeros, g_idx = unpack(packed, bits, checkpoint_format)
    g = g_idx.astype(np.int64)
    return scales[:, g] * (q.astype(np.float32) - zeros[:, g].astype(np.float32))

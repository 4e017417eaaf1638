"""GPTQ: quantize one linear layer's weights so that its outputs on the calibration inputs move least.

Frantar et al. 2022, re-derived: with H = 2/N sum x x^T over the layer's calibration inputs, columns
are quantized one at a time and each column's rounding error is spread over the columns not yet
quantized, weighted by the inverse Hessian (taken from its upper Cholesky factor). Columns go in
blocks of 128 with the error of a whole block applied lazily to the rest.

Grid: per output row and group of `group_size` input columns, `bits`-bit integers q in
[0, 2^bits - 1], w = scale * (q - zero). Symmetric (default): zero = 2^(bits-1), scale from the
group's largest magnitude; asymmetric: zero and scale from the group's min and max. Scales are
rounded to float16 before use, because the checkpoint stores them in float16: the weights the
solver reports are exactly the weights a loader reconstructs.

Column order (which columns GPTQ fixes first; the later ones absorb their errors):
- natural: 0, 1, 2, ...
- act-order (`desc_act`): by decreasing diag(H) over the whole row; groups are then formed in that order,
  so g_idx is a permutation and a loader must honour it (desc_act: true in the config).
- group-aware (`group_aware`, GPTQModel's act_group_aware): groups stay the static runs of `group_size`
  columns (g_idx the identity, desc_act: false, every loader and kernel reads it), but the groups are
  processed in decreasing order of their largest diag(H), and within a group the columns by decreasing
  diag(H). Most of act-order's gain, none of its loading cost (measured in docs/bench-gptq.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwqq.gptq.options import DEFAULT_DAMP

BLOCK = 128


@dataclass
class SolvedLinear:
    q: torch.Tensor  # int32 [out, in], 0 .. 2^bits - 1, in the original column order
    scales: torch.Tensor  # float16 [out, n_groups]
    zeros: torch.Tensor  # int32 [out, n_groups]
    g_idx: torch.Tensor  # int32 [in]: the group of each input column
    weight: torch.Tensor  # float32 [out, in]: scales[:, g_idx] * (q - zeros[:, g_idx])
    damp: float  # the damping that made H positive definite (fraction of the mean diagonal)
    method: str = "gptq"  # or "rtn" (no calibration data for this weight)


def grid(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale f16-exact as float32, zero as float32) for the columns of w [rows, cols]."""
    maxq = 2**bits - 1
    lo = torch.clamp(w.min(dim=1).values, max=0)
    hi = torch.clamp(w.max(dim=1).values, min=0)
    if sym:  # the grid spans [-absmax, absmax] (the reference GPTQ leaves an all-positive group's lo at 0,
        hi = torch.maximum(-lo, hi)  # so q above zero + maxq/2 clips; qwqq does not)
        lo = -hi
    flat = (lo == 0) & (hi == 0)
    lo = torch.where(flat, -torch.ones_like(lo), lo)
    hi = torch.where(flat, torch.ones_like(hi), hi)
    scale = ((hi - lo) / maxq).half().float()
    scale = torch.where(scale == 0, torch.full_like(scale, 2.0**-24), scale)  # a subnormal-flushed group
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:  # zero >= 1: the v1 checkpoint format stores zero - 1 (an all-positive group loses its lowest code)
        zero = torch.round(-lo / scale).clamp(1, maxq)
    return scale, zero


def _quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1; damping raised until H is positive definite.

    H is damped in place (the caller's copy); at most three in x in matrices live at once."""
    mean_diag = torch.mean(torch.diag(h)).item()
    diag = h.diagonal()
    while True:
        diag.add_(damp * mean_diag)
        chol, info = torch.linalg.cholesky_ex(h)
        if info.item() == 0:
            hinv = torch.cholesky_inverse(chol)
            del chol
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            del hinv
            if info.item() == 0:
                return upper, damp
        else:
            del chol
        diag.sub_(damp * mean_diag)
        if damp >= 1.0:
            raise ValueError("the Hessian is not positive definite even with damping 1.0")
        damp = min(1.0, damp * 2 if damp >= 0.01 else 0.01)


def column_order(diag: torch.Tensor, group_size: int, *, desc_act: bool, group_aware: bool
                 ) -> tuple[torch.Tensor | None, list[int]]:
    """(perm, group of each processed position): the order GPTQ quantizes the columns in (None: natural),
    and, position by position in that order, the group the column belongs to (group ids index the
    scales; a group's positions are always contiguous)."""
    cols = diag.numel()
    if desc_act:  # groups formed in the new order
        perm = torch.argsort(diag, descending=True, stable=True)
        return perm, [i // group_size for i in range(cols)]
    if group_aware and group_size < cols:
        groups = torch.arange(cols, device=diag.device) // group_size
        n_groups = int(groups[-1]) + 1
        peak = torch.full((n_groups,), float("-inf"), device=diag.device).scatter_reduce(0, groups, diag, "amax")
        rank = torch.argsort(torch.argsort(peak, descending=True, stable=True))  # the position of each group
        # sort by (group rank, -diag): one stable sort on -diag, then a stable sort on the group rank
        by_diag = torch.argsort(diag, descending=True, stable=True)
        perm = by_diag[torch.argsort(rank[groups[by_diag]], stable=True)]
        return perm, (perm // group_size).tolist()
    return None, [i // group_size for i in range(cols)]


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, *, bits: int = 4, group_size: int = 128,
                  sym: bool = True, desc_act: bool = False, group_aware: bool = False,
                  damp: float = DEFAULT_DAMP, overwrite_hessian: bool = False) -> SolvedLinear:
    """GPTQ of one weight matrix [out, in] given H [in, in] (any positive scale; 2/N sum x x^T).

    overwrite_hessian: `hessian` is the caller's to give away; it is damped, permuted and freed here
    instead of copied (in x in matrices are what bound GPTQ's memory: at most three live at once then)."""
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(device=w.device, dtype=torch.float32)
    if not overwrite_hessian and h is hessian:
        h = h.clone()
    rows, cols = w.shape
    gs = cols if group_size in (-1, 0) or group_size >= cols else group_size
    maxq = 2**bits - 1

    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm, group_of = column_order(torch.diag(h), gs, desc_act=desc_act, group_aware=group_aware)
    if perm is not None:
        w = w[:, perm]
        rows_first = h.index_select(0, perm)
        h.set_()  # freed now, even though the caller still names it (overwrite_hessian), or our own copy
        h = rows_first.index_select(1, perm)
        del rows_first
    group_len = [0] * (max(group_of) + 1)
    for g in group_of:
        group_len[g] += 1
    hinv, used_damp = _inverse_hessian_factor(h, damp)
    h.set_()  # (a plain del would leave the caller's reference holding it)
    del h

    q = torch.zeros_like(w)
    n_groups = -(-cols // gs)  # the last group may be shorter (576 columns in groups of 128)
    scales = torch.zeros(rows, n_groups, dtype=torch.float32, device=w.device)
    zeros = torch.zeros_like(scales)
    scale = zero = None
    for i1 in range(0, cols, BLOCK):
        i2 = min(i1 + BLOCK, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col == 0 or group_of[col] != group_of[col - 1]:  # a new group: its grid from its columns as updated so far
                g = group_of[col]
                group = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :group_len[g]]
                scale, zero = grid(group, bits, sym)
                scales[:, g], zeros[:, g] = scale, zero
            x = w1[:, i]
            qi = _quant(x, scale, zero, maxq)
            q[:, col] = qi
            e = (x - scale * (qi - zero)) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    g_idx = torch.tensor(group_of, device=w.device, dtype=torch.int32)
    if perm is not None:  # back to the original column order; each column keeps the group it was quantized in
        inv = torch.argsort(perm)
        q, g_idx = q[:, inv], g_idx[inv]
    return _result(q, scales, zeros, g_idx, used_damp, "gptq")


def rtn_quantize(weight: torch.Tensor, *, bits: int = 4, group_size: int = 128, sym: bool = True) -> SolvedLinear:
    """Plain round-to-nearest on the same grid (the baseline, and the fallback for unseen experts)."""
    w = weight.detach().to(torch.float32)
    rows, cols = w.shape
    gs = cols if group_size in (-1, 0) or group_size >= cols else group_size
    maxq = 2**bits - 1
    scales, zeros, qs = [], [], []
    for c0 in range(0, cols, gs):  # the last group may be shorter
        scale, zero = grid(w[:, c0: c0 + gs], bits, sym)
        qs.append(_quant(w[:, c0: c0 + gs], scale[:, None], zero[:, None], maxq))
        scales.append(scale)
        zeros.append(zero)
    g_idx = torch.arange(cols, device=w.device, dtype=torch.int32) // gs
    return _result(torch.cat(qs, 1), torch.stack(scales, 1), torch.stack(zeros, 1), g_idx, 0.0, "rtn")


def _result(q, scales, zeros, g_idx, damp: float, method: str) -> SolvedLinear:
    gi = g_idx.long()
    weight = scales[:, gi] * (q - zeros[:, gi])
    return SolvedLinear(q.to(torch.int32), scales.half(), zeros.to(torch.int32), g_idx.to(torch.int32), weight,
                      damp, method)

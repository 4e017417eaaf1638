"""The GPTQ solver: exact identities, the error it must beat, damping, act-order, starved experts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwqq.gptq.solver import gptq_quantize, grid, rtn_quantize
from tests.fixtures import TINY_BPE_TOKENS


def _problem(out=256, inn=512, n=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g) * 0.05
    mix = torch.randn(inn, inn, generator=g) * 0.05 + torch.eye(inn)
    x = torch.randn(n, inn, generator=g) @ mix  # correlated inputs, as real activations are
    x[:, :5] *= 10  # a few outlier channels
    return w, x, 2 * x.T @ x / n


def _out_err(x, w, wq):
    return ((x @ (w - wq).T) ** 2).mean().item()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_result_is_self_consistent(bits, sym):
    w, _, h = _problem(64, 256, 512)
    r = gptq_quantize(w, h, bits=bits, group_size=64, sym=sym)
    assert r.q.dtype == torch.int32 and int(r.q.min()) >= 0 and int(r.q.max()) <= 2**bits - 1
    assert r.scales.dtype == torch.float16 and r.scales.shape == (64, 4) and r.zeros.shape == (64, 4)
    gi = r.g_idx.long()
    assert torch.equal(r.weight, r.scales.float()[:, gi] * (r.q - r.zeros[:, gi]))  # what a loader rebuilds
    if sym:
        assert torch.all(r.zeros == 2 ** (bits - 1))


@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_identity_hessian_is_round_to_nearest(group_size):
    """With uncorrelated, equal-energy inputs there is no error to feed back: GPTQ is plain rounding."""
    w, _, _ = _problem(64, 256)
    r = gptq_quantize(w, torch.eye(256), bits=4, group_size=group_size)
    n = rtn_quantize(w, bits=4, group_size=group_size)
    assert torch.equal(r.q, n.q) and torch.equal(r.scales, n.scales) and torch.equal(r.zeros, n.zeros)


@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("bits", [3, 4])
def test_output_error_well_below_round_to_nearest(desc_act, bits):
    w, x, h = _problem()
    r = gptq_quantize(w, h, bits=bits, group_size=128, desc_act=desc_act)
    n = rtn_quantize(w, bits=bits, group_size=128)
    assert _out_err(x, w, r.weight) < 0.6 * _out_err(x, w, n.weight)


def test_act_order_groups_follow_the_hessian():
    w, x, h = _problem(64, 256, 1024)
    r = gptq_quantize(w, h, bits=4, group_size=64, desc_act=True)
    order = torch.argsort(torch.diag(h), descending=True)
    assert torch.equal(r.g_idx[order], torch.arange(256, dtype=torch.int32) // 64)  # the loudest columns: group 0
    assert sorted(torch.bincount(r.g_idx).tolist()) == [64] * 4


def test_damping_rises_until_the_hessian_factors():
    w, _, _ = _problem(32, 128)
    x = torch.randn(16, 128)  # 16 tokens for 128 columns: H is singular
    h = 2 * x.T @ x / 16
    r = gptq_quantize(w, h, bits=4, group_size=128, damp=0.0)
    assert r.damp > 0
    assert torch.isfinite(r.weight).all()


def test_dead_columns_are_zeroed():
    w, x, h = _problem(32, 128, 512)
    h[:, 7] = 0
    h[7, :] = 0
    r = gptq_quantize(w, h, bits=4, group_size=128)
    assert torch.all(r.weight[:, 7] == 0)


def test_grid_symmetric_and_asymmetric():
    w = torch.tensor([[-1.0, 0.5, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0], [0.2, 0.4, 0.6, 0.8]])
    scale, zero = grid(w, 4, sym=True)
    assert torch.allclose(scale, torch.tensor([2 / 15, 2 / 15, 1.6 / 15]).half().float())
    assert torch.all(zero == 8)
    scale, zero = grid(w, 4, sym=False)
    assert zero[2] == 1 and zero[0] == round(1 / (1.5 / 15))  # v1 stores zero - 1: never 0


@pytest.mark.slow
def test_gptq_model_on_moe_reports_starved_experts():
    from qwqq.calib.engine import open_block_model
    from qwqq.gptq.quantize import SolverSettings, gptq_model
    from qwqq.source import open_checkpoint
    from tests.fixtures import tiny_model_dir

    ckpt = open_checkpoint(tiny_model_dir("qwen3_moe"))
    tokens = np.random.default_rng(0).integers(0, TINY_BPE_TOKENS, size=(2, 64))
    got = {}
    model = open_block_model(ckpt, torch.device("cpu"))
    reports = gptq_model(model, tokens, SolverSettings(min_expert_tokens=40),
                         lambda i, q, u: got.update({k: v.method for k, v in q.items()}))
    n_weights = 2 * (4 + 8 * 3)
    assert len(got) == n_weights
    rtn = [r for rep in reports for r in rep.rtn_experts]
    assert rtn and all(".experts." in r for r in rtn)
    assert sum(m == "rtn" for m in got.values()) == len(rtn)
    assert all(m == "gptq" for k, m in got.items() if ".self_attn." in k)


def test_a_short_last_group():
    """576 columns (SmolLM2's hidden size) in groups of 128: four full groups and one of 64."""
    w, x, h = _problem(32, 576, 1024)
    for r in (gptq_quantize(w, h, bits=4, group_size=128), rtn_quantize(w, bits=4, group_size=128)):
        assert r.scales.shape == (32, 5)
        assert torch.bincount(r.g_idx).tolist() == [128, 128, 128, 128, 64]
    assert torch.equal(gptq_quantize(w, torch.eye(576), bits=4, group_size=128).q, rtn_quantize(w, bits=4, group_size=128).q)


def test_group_aware_order():
    """Groups by decreasing peak diag(H), columns within a group by decreasing diag(H); a group's positions
    are contiguous, so every group keeps its static columns."""
    from qwqq.gptq.solver import column_order

    diag = torch.rand(576, generator=torch.Generator().manual_seed(1))
    perm, group_of = column_order(diag, 128, desc_act=False, group_aware=True)
    assert sorted(perm.tolist()) == list(range(576))
    assert group_of == (perm // 128).tolist()
    runs = [g for i, g in enumerate(group_of) if i == 0 or g != group_of[i - 1]]
    assert sorted(runs) == list(range(5))  # each group one contiguous run
    peaks = [float(diag[g * 128:(g + 1) * 128].max()) for g in runs]
    assert peaks == sorted(peaks, reverse=True)
    assert all(diag[perm[i]] >= diag[perm[i + 1]] for i in range(575) if group_of[i] == group_of[i + 1])


@pytest.mark.parametrize("cols", [512, 576])
def test_group_aware_is_plain_gptq_on_the_reordered_columns(cols):
    """The identity that defines it: GAR on (W, H) equals natural-order GPTQ on the columns in GAR's order, put
    back; g_idx stays the identity (static groups: desc_act false, every loader reads it)."""
    from qwqq.gptq.solver import column_order

    w, x, h = _problem(64, cols, 2048)
    perm, _ = column_order(torch.diag(h), 128, desc_act=False, group_aware=True)
    a = gptq_quantize(w, h, bits=4, group_size=128, group_aware=True)
    b = gptq_quantize(w[:, perm], h[perm][:, perm], bits=4, group_size=128)
    inv = torch.argsort(perm)
    assert not torch.equal(perm, torch.arange(cols))
    if cols % 128 == 0:  # (with a short group not processed last, natural order would group other columns)
        assert torch.equal(a.q, b.q[:, inv]) and torch.equal(a.weight, b.weight[:, inv])
    assert torch.equal(a.g_idx, torch.arange(cols, dtype=torch.int32) // 128)
    gi = a.g_idx.long()
    assert torch.equal(a.weight, a.scales.float()[:, gi] * (a.q - a.zeros[:, gi]))
    assert _out_err(x, w, a.weight) < 0.6 * _out_err(x, w, rtn_quantize(w, bits=4, group_size=128).weight)


def test_group_aware_with_an_identity_hessian_is_round_to_nearest():
    w, _, _ = _problem(64, 512)
    r = gptq_quantize(w, torch.eye(512), bits=4, group_size=128, group_aware=True)
    assert torch.equal(r.q, rtn_quantize(w, bits=4, group_size=128).q)

"""qwqq eval: metrics against direct computations, a model against itself, the reference cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qwqq.eval import metrics
from qwqq.eval.harness import evaluate, windows_of
from tests.fixtures import TINY_BPE_TOKENS, TINY_VOCAB_SIZE, tiny_model_dir


def _exact_kld(ref_logits, test_logits):
    lp = torch.log_softmax(torch.from_numpy(ref_logits).double(), -1)
    lq = torch.log_softmax(torch.from_numpy(test_logits).double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).numpy()


def _peaked(n, vocab, seed, temp=3.0):
    g = np.random.default_rng(seed)
    return (g.standard_normal((n, vocab)) * temp).astype(np.float32)


@pytest.mark.parametrize("temp", [0.5, 3.0, 8.0])
def test_kld_from_the_stored_reference_equals_the_exact_kld(temp):
    """The reference is stored as uint16 log-probs: the KLD from it is the exact one to ~1e-5 nats on average."""
    vocab = 20000
    ref = _peaked(48, vocab, 0, temp)
    test = ref + _peaked(48, vocab, 1, temp=0.3)
    targets = np.arange(48)
    pos = metrics.reference_positions(ref, targets)
    assert pos.logp_u16.dtype == np.uint16 and pos.logp_u16.shape == (48, vocab)
    s = metrics.score(pos, test, targets)
    exact = _exact_kld(ref, test)
    np.testing.assert_allclose(s.kld, exact, rtol=0, atol=5e-5)
    assert abs(s.kld.mean() - exact.mean()) < 1e-5
    np.testing.assert_allclose(metrics.score(pos, ref, targets).kld, 0, atol=2e-5)


def test_nll_same_top_and_summary():
    ref = _peaked(200, 300, 4)
    test = ref + _peaked(200, 300, 5, temp=0.5)
    targets = np.random.default_rng(6).integers(0, 300, 200)
    s = metrics.score(metrics.reference_positions(ref, targets), test, targets)
    lq = torch.log_softmax(torch.from_numpy(test).double(), -1).numpy()
    np.testing.assert_allclose(s.nll, -lq[np.arange(200), targets], rtol=1e-5)
    assert np.array_equal(s.same_top, test.argmax(1) == ref.argmax(1))
    summ = metrics.summarize(s)
    assert summ.ppl == pytest.approx(math.exp(s.nll.mean()))
    assert summ.kld_median == pytest.approx(float(np.median(s.kld)))
    assert summ.kld_p99 == pytest.approx(float(np.percentile(s.kld, 99)))


def _direct_ppl(model_dir, windows, first):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll = []
    with torch.no_grad():
        logits = model(torch.from_numpy(windows)).logits
    lp = torch.log_softmax(logits.double(), -1)
    for w in range(windows.shape[0]):
        for j in range(first, windows.shape[1] - 1):
            nll.append(-lp[w, j, windows[w, j + 1]].item())
    return math.exp(sum(nll) / len(nll))


@pytest.mark.slow
def test_a_model_against_itself_and_ppl_against_transformers(tmp_path, monkeypatch):
    monkeypatch.setenv("QWQQ_CACHE", str(tmp_path / "cache"))
    model_dir = tiny_model_dir("qwen2")
    text = (tmp_path / "t.txt")
    from qwqq.eval.harness import default_text

    text = default_text()[:6000]
    r = evaluate(model_dir, model_dir, text=text, ctx=64, max_tokens=256, progress=False)
    assert r.windows == 4 and r.summary.tokens == 4 * 31
    assert r.summary.kld_mean < 1e-5 and r.summary.kld_max < 1e-4 and r.summary.same_top == 1.0
    assert r.summary.ppl == pytest.approx(r.summary.ref_ppl, rel=1e-6)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    windows = windows_of(np.asarray(tok.encode(text, add_special_tokens=False).ids), 64, 256)
    assert r.summary.ppl == pytest.approx(_direct_ppl(model_dir, windows, 32), rel=1e-4)
    again = evaluate(model_dir, model_dir, text=text, ctx=64, max_tokens=256, progress=False)
    assert again.ref_cached and not r.ref_cached
    assert again.summary.ppl == r.summary.ppl


@pytest.mark.slow
def test_gguf_against_its_source(tmp_path, monkeypatch):
    """F16 in llama.cpp is nearly the reference; Q2_K is far from it; the order is the quality order."""
    from qwqq.gguf.quantize import quantize_to_gguf, resolve_mixture

    monkeypatch.setenv("QWQQ_CACHE", str(tmp_path / "cache"))
    model_dir = tiny_model_dir("qwen3")
    klds = {}
    for t in ("F16", "Q4_K_M", "Q2_K"):
        out = quantize_to_gguf(model_dir, resolve_mixture(type_name=t), out=tmp_path / f"{t}.gguf", progress=False)
        r = evaluate(out.path, model_dir, ctx=64, max_tokens=256, progress=False)
        klds[t] = r.summary.kld_mean
    assert klds["F16"] < 1e-3 < klds["Q4_K_M"] < klds["Q2_K"]


MLX_CASES = [("qwen2", {"bits": 4}), ("qwen3", {"bits": 3, "mixed": "3_6"}), ("qwen3_moe", {"bits": 4})]


@pytest.mark.parametrize("arch,opts", MLX_CASES, ids=[a for a, _ in MLX_CASES])
@pytest.mark.slow
def test_mlx_folders_are_scored_on_the_weights_mlx_computes_with(arch, opts, tmp_path):
    """On mlx's CPU backend eval runs the block engine over each module as mlx.dequantize gives it back:
    the logits equal mlx-lm's own forward pass of the same folder (dequantized by mlx, in float32)."""
    mx = pytest.importorskip("mlx.core")
    from mlx_lm import load
    from mlx_lm.utils import dequantize_model

    from qwqq.eval.logits import open_logits
    from qwqq.mlx.quantize import quantize_to_mlx

    folder = quantize_to_mlx(tiny_model_dir(arch), out=tmp_path / "m", progress=False, **opts).path
    windows = np.random.default_rng(0).integers(0, TINY_BPE_TOKENS, (2, 32))
    ours = open_logits(folder, 32)
    assert ours.describe.startswith("mlx weights")
    got = np.stack([x.copy() for x in ours.logits(windows, 16)])
    ours.close()
    model, _ = load(str(folder))
    model.set_dtype(mx.float32)  # scales and biases widened first, exactly, as eval reads them
    dequantize_model(model)
    want = np.array(model(mx.array(windows.astype(np.int32)))[:, 16:31].astype(mx.float32))
    assert got.shape == want.shape == (2, 15, TINY_VOCAB_SIZE)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * float(np.ptp(want)))


@pytest.mark.slow
def test_mlx_quality_follows_the_bits(tmp_path, monkeypatch):
    from qwqq.mlx.quantize import quantize_to_mlx

    pytest.importorskip("mlx.core")
    monkeypatch.setenv("QWQQ_CACHE", str(tmp_path / "cache"))
    src = tiny_model_dir("qwen3")
    kld = {}
    for bits in (8, 4, 2):
        folder = quantize_to_mlx(src, bits=bits, out=tmp_path / f"m{bits}", progress=False).path
        kld[bits] = evaluate(folder, src, ctx=64, max_tokens=256, progress=False).summary.kld_mean
    assert 0 < kld[8] < kld[4] < kld[2]

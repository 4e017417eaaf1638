"""`qwqq eval` on the hybrid Qwen models (Gated DeltaNet + gated attention): the reference is the Hugging Face
release run through the block engine, the GGUF runs in llama.cpp, the MLX folder through the block engine on
mlx's own dequantized weights (laid back out as the hub's: mlx-lm's `language_model.` prefix, conv1d axes,
plus-one norms, switch_mlp experts). GPTQ on a hybrid: tests/test_hybrid_gptq.py (test_gptq_beats_round_to_nearest)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qwqq.eval.harness import default_text, evaluate, windows_of
from tests.fixtures import TINY_BPE_TOKENS, TINY_VOCAB_SIZE
from tests.fixtures_hybrid import tiny_hybrid_dir

CTX, TOKENS = 64, 256  # 4 windows, each scored on its last 31 positions


def _transformers_ppl(src, text: str) -> float:
    """transformers' own perplexity of the source over eval's windows (the second half of each scored)."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    ids = Tokenizer.from_file(str(src / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    windows = windows_of(np.asarray(ids), CTX, TOKENS)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.from_numpy(windows)).logits.double(), -1)
    first = CTX // 2
    nll = [-lp[w, j, windows[w, j + 1]].item() for w in range(windows.shape[0]) for j in range(first, CTX - 1)]
    return math.exp(sum(nll) / len(nll))


@pytest.mark.slow
def test_gguf_and_mlx_of_a_qwen3_5_against_its_source(tmp_path, monkeypatch):
    """The reference perplexity is transformers' own; an F32 GGUF in llama.cpp is the reference to float32
    rounding, 8-bit MLX near it, 2-bit GGUF and MLX far from it; every run scores the same positions.
    (Q8_0 against Q4_K_M and Q2_K: tests/test_eval.py, on a Qwen3.)"""
    pytest.importorskip("mlx.core")
    from qwqq.gguf.quantize import quantize_to_gguf, resolve_mixture
    from qwqq.mlx.quantize import quantize_to_mlx

    monkeypatch.setenv("QWQQ_CACHE", str(tmp_path / "cache"))
    src = tiny_hybrid_dir("qwen3_5")  # the multimodal release form: vision tower and MTP block on disk
    text = default_text()[:6000]
    kw = dict(text=text, ctx=CTX, max_tokens=TOKENS, progress=False)
    runs = {}
    for t in ("F32", "Q2_K"):
        out = quantize_to_gguf(src, resolve_mixture(type_name=t), out=tmp_path / f"{t}.gguf", progress=False,
                               threads=2).path
        runs[t] = evaluate(out, src, **kw)
    for bits in (8, 2):
        out = quantize_to_mlx(src, bits=bits, out=tmp_path / f"mlx{bits}", progress=False).path
        runs[f"mlx{bits}"] = evaluate(out, src, **kw)
    s = {k: r.summary for k, r in runs.items()}
    assert not runs["F32"].ref_cached and all(r.ref_cached for k, r in runs.items() if k != "F32")
    assert {x.tokens for x in s.values()} == {4 * 31} and len({x.ref_ppl for x in s.values()}) == 1
    assert s["F32"].ref_ppl == pytest.approx(_transformers_ppl(src, text), rel=1e-5)
    assert s["F32"].kld_mean < 1e-5 and s["F32"].same_top == 1.0 and s["F32"].ppl == pytest.approx(s["F32"].ref_ppl,
                                                                                                   rel=1e-4)
    assert 0 < s["mlx8"].kld_mean < 0.02 and s["mlx8"].same_top > 0.5
    for far in ("Q2_K", "mlx2"):  # a random model's flat distributions: far is tenths of a nat, no top token kept
        assert s[far].kld_mean > 0.2 and s[far].same_top < 0.2, (far, s[far].kld_mean, s[far].same_top)


@pytest.mark.slow
def test_mlx_qwen3_next_is_scored_on_the_weights_mlx_lm_computes_with(tmp_path):
    """The MoE hybrid's MLX folder (switch_mlp experts, in_proj_qkvz, conv1d and plus-one norms as mlx-lm holds
    them) read by eval's block engine gives mlx-lm's own logits (its model dequantized, in float32)."""
    mx = pytest.importorskip("mlx.core")
    from mlx_lm import load
    from mlx_lm.utils import dequantize_model

    from qwqq.eval.logits import open_logits
    from qwqq.mlx.quantize import quantize_to_mlx

    folder = quantize_to_mlx(tiny_hybrid_dir("qwen3_next"), bits=8, out=tmp_path / "m", progress=False).path
    windows = np.random.default_rng(0).integers(0, TINY_BPE_TOKENS, (1, 32))
    ours = open_logits(folder, 32)
    got = np.stack([x.copy() for x in ours.logits(windows, 16)])
    ours.close()
    model, _ = load(str(folder))
    model.set_dtype(mx.float32)
    dequantize_model(model)
    want = np.array(model(mx.array(windows.astype(np.int32)))[:, 16:31].astype(mx.float32))
    assert got.shape == want.shape == (1, 15, TINY_VOCAB_SIZE)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * float(np.ptp(want)))

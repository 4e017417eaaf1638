"""The block-streaming calibration engine against a whole-model transformers forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwqq.calib import engine as calibrate
from qwqq.calib import imatrix as calib_imatrix
from qwqq.calib import text as calib_text
from qwqq.source import open_checkpoint
from tests.fixtures import TINY_BPE_TOKENS, tiny_model_dir

ARCHS = ["qwen2", "qwen3", "qwen3_moe", "llama"]


def _tokens(n_seq=3, seqlen=48, seed=0):
    return np.random.default_rng(seed).integers(0, TINY_BPE_TOKENS, size=(n_seq, seqlen))


def _direct_square_sums(model_dir, tokens):
    """The statistic computed straight from the whole float32 model: per linear, sum over tokens of x^2;
    per expert, over the tokens the router sends it (its down_proj: over act(gate x) * up x)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sums, counts = {}, {}

    def add(name, x):
        x = x.reshape(-1, x.shape[-1]).double()
        sums[name] = sums.get(name, 0) + (x * x).sum(0).numpy()
        counts[name] = counts.get(name, 0) + x.shape[0]

    def linear_hook(name):
        return lambda mod, args: add(name, args[0])

    def router_hook(prefix, experts):
        def hook(mod, args, out):
            x = args[0].reshape(-1, args[0].shape[-1])
            chosen = out[2]  # (logits, weights, indices)
            for e in range(experts.gate_up_proj.shape[0]):
                xe = x[(chosen == e).any(-1)]
                add(f"{prefix}.experts.{e}.gate_proj.weight", xe)
                add(f"{prefix}.experts.{e}.up_proj.weight", xe)
                g, u = torch.nn.functional.linear(xe, experts.gate_up_proj[e]).chunk(2, -1)
                add(f"{prefix}.experts.{e}.down_proj.weight", experts.act_fn(g) * u)
        return hook

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            mod.register_forward_pre_hook(linear_hook(name + ".weight"))
        if name.endswith(".mlp") and hasattr(mod, "experts"):
            mod.gate.register_forward_hook(router_hook(name, mod.experts))
    with torch.no_grad():
        model(torch.from_numpy(tokens))
    if model.config.tie_word_embeddings:
        sums.pop("lm_head.weight"), counts.pop("lm_head.weight")
    return sums, counts


@pytest.mark.parametrize("arch", ARCHS)
def test_square_sums_equal_direct_torch_computation(arch):
    model_dir = tiny_model_dir(arch)
    tokens = _tokens()
    got = calib_imatrix.collect_square_sums(open_checkpoint(model_dir), tokens, device=torch.device("cpu"))
    want, want_counts = _direct_square_sums(model_dir, tokens)
    assert set(got.sums) == set(want)
    for name, ref in want.items():
        np.testing.assert_allclose(got.sums[name], ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max(), err_msg=name)
        assert got.counts[name] == want_counts[name], name
    if arch == "qwen3_moe":  # experts see only their routed tokens: top-2 of 8
        expert_tokens = sum(c for n, c in got.counts.items() if n.startswith("model.layers.0.mlp.experts."))
        assert expert_tokens == 2 * tokens.size * 3  # 2 experts x 3 projections each


def test_imatrix_entries_are_gguf_named_and_experts_stacked():
    ckpt = open_checkpoint(tiny_model_dir("qwen3_moe"))
    tokens = _tokens()
    im = calib_imatrix.compute_imatrix(ckpt, tokens, device=torch.device("cpu"), dataset="sample.txt")
    sums, counts = im.entries["blk.1.ffn_down_exps.weight"]
    assert sums.shape == (8, 256) and counts.shape == (8,)
    assert counts.sum() == 2 * tokens.size
    s, c = im.entries["blk.0.attn_q.weight"]
    assert s.shape == (1, 256) and c.tolist() == [tokens.size]
    assert "output.weight" in im.entries and "token_embd.weight" not in im.entries
    assert im.chunk_count == 3 and im.chunk_size == 48 and im.datasets == ["sample.txt"]
    stats = calib_imatrix.collect_square_sums(ckpt, tokens, device=torch.device("cpu"))
    np.testing.assert_allclose(im.values("blk.0.attn_k.weight"),
                               stats.sums["model.layers.0.self_attn.k_proj.weight"] / tokens.size, rtol=1e-6)


def test_residual_stream_matches_the_whole_model():
    """Block by block, the stream the engine carries is the whole model's hidden state."""
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_dir("qwen3")
    tokens = _tokens(2, 32)
    model = calibrate.open_block_model(open_checkpoint(model_dir), torch.device("cpu"))
    try:
        for i, layer, x, rope in calibrate.blocks(model, tokens):
            calibrate.run_block(layer, x, rope, batch=1)
        final = model.final_norm()(x).detach()
    finally:
        model.close()
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.from_numpy(tokens), output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(final, want, rtol=1e-4, atol=1e-4)


def test_tokenize_windows_and_short_text():
    ckpt = open_checkpoint(tiny_model_dir("qwen2"))
    text = calib_text.default_text()
    ids = calib_text.tokenize(ckpt, text, n_tokens=2048, seqlen=256)
    assert ids.shape == (8, 256) and ids.dtype == np.int64
    short = calib_text.tokenize(ckpt, " ".join(["word"] * 100), n_tokens=4096, seqlen=512)
    assert short.shape == (1, 100)
    from qwqq.errors import QwqqError

    with pytest.raises(QwqqError, match="at least 64"):
        calib_text.tokenize(ckpt, "too short", n_tokens=4096, seqlen=512)


def test_peak_memory_formula_has_no_depth_term_and_sizes_qwq():
    """docs/calibration.md's formula (measured against peak RSS in bench/calib_memory.py): a deeper model of the
    same width needs the same; QwQ-32B's GPTQ pass at 8192 tokens needs about 13 GB, its imatrix about 3."""
    from qwqq.calib.engine import peak_memory

    qwq = {"hidden_size": 5120, "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
           "intermediate_size": 27648, "vocab_size": 152064, "num_hidden_layers": 64}
    for method in ("gptq", "imatrix"):
        assert peak_memory(qwq, 8192, 512, method) == peak_memory({**qwq, "num_hidden_layers": 8}, 8192, 512, method)
    gptq, imat = (sum(peak_memory(qwq, 8192, 512, m).values()) / 1e9 for m in ("gptq", "imatrix"))
    assert 11 < gptq < 15 and 2 < imat < 4.5
    moe = {"hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
           "moe_intermediate_size": 768, "num_experts": 128, "vocab_size": 151936, "intermediate_size": 6144}
    parts = peak_memory(moe, 8192, 512, "gptq")
    assert parts["hessians"] == 4 * (2048**2 + 4096**2 + 128 * (2048**2 + 768**2))  # each expert its own

"""DeepSeek-V3 / R1's importance matrix from its FP8 release, one block at a time through transformers'
DeepseekV3DecoderLayer (MLA, sigmoid group-limited routing with the correction bias, shared expert).

Held against (a) transformers' whole DeepseekV3ForCausalLM (eager attention, so its attention weights are
seen) on the same FP8 weights dequantized, with hooks: every linear's input, each routed expert's tokens,
and what llama.cpp's absorbed MLA matrices multiply: attn_k_b each head's q_nope, attn_v_b each head's
attention-weighted latent; (b) llama-imatrix on llama.cpp's converter's F32 GGUF of the release (same
entries, attn_k_b / attn_v_b included, same counts, same values up to float32 noise); (c) llama-quantize
taking qwqq's file: byte for byte what `qwqq quantize --imatrix auto` makes from the same sample.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from qwqq.calib import imatrix as calib_imatrix
from qwqq.calib.text import tokenize
from qwqq.gguf.imatrix_file import read_imatrix
from qwqq.source import open_checkpoint
from tests import fixtures
from tests.conftest import run_qwqq
from tests.fixtures_deepseek import dequantize_fp8_blockwise, tiny_deepseek_dir
from tests.fixtures import TINY_BPE_TOKENS
from tests.reference import SquareSums, assert_same_imatrix_entries, assert_same_tensors
from tests.test_imatrix import TEXT, llama_imatrix

CPU = torch.device("cpu")
N_LAYER, HEADS, NOPE, KV_LORA, EXPERTS = 4, 4, 32, 64, 8  # the fixture's shapes


def _whole_model(model_dir: Path):
    """transformers' DeepseekV3ForCausalLM in float32, eager attention, its weights the release's FP8 blocks
    dequantized (float(q) x scale, as qwqq and llama.cpp's converter do), experts fused as transformers holds
    them; the MTP layer not part of it."""
    from safetensors import safe_open
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = json.loads((model_dir / "config.json").read_text())
    config.pop("quantization_config")
    model = DeepseekV3ForCausalLM(DeepseekV3Config.from_dict(config)).float().eval()
    model.config._attn_implementation = "eager"
    raw = {}
    for shard in sorted(model_dir.glob("model-*.safetensors")):
        with safe_open(shard, "pt") as f:
            raw.update({k: f.get_tensor(k) for k in f.keys()})
    state = {}
    for name, t in raw.items():
        if name.endswith("_scale_inv") or name.startswith(f"model.layers.{N_LAYER}."):
            continue
        state[name] = dequantize_fp8_blockwise(t, raw[name + "_scale_inv"]) if name + "_scale_inv" in raw else t.float()
    for i in range(1, N_LAYER):
        e = f"model.layers.{i}.mlp.experts."
        pop = lambda k: state.pop(e + k)
        state[e + "gate_up_proj"] = torch.stack([torch.cat([pop(f"{x}.gate_proj.weight"), pop(f"{x}.up_proj.weight")])
                                                 for x in range(EXPERTS)])
        state[e + "down_proj"] = torch.stack([pop(f"{x}.down_proj.weight") for x in range(EXPERTS)])
    model.load_state_dict(state, strict=True)
    return model


def _whole_model_square_sums(model_dir: Path, tokens: np.ndarray):
    model = _whole_model(model_dir)
    stats = SquareSums()
    add = stats.add

    latent = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            mod.register_forward_pre_hook(lambda m, args, n=name + ".weight": add(n, args[0]))
        if name.endswith(".mlp") and hasattr(mod, "experts"):
            mod.gate.register_forward_hook(stats.router_hook(name, mod.experts))
        if name.endswith(".self_attn"):
            def q_nope(m, args, out, n=name):  # q_b_proj's output [b, s, heads x (nope + rope)]
                add(n + ".q_nope", out.view(*out.shape[:2], HEADS, -1)[..., :NOPE].reshape(-1, HEADS * NOPE))
            mod.q_b_proj.register_forward_hook(q_nope)
            mod.kv_b_proj.register_forward_pre_hook(lambda m, args, n=name: latent.__setitem__(n, args[0]))
            def latent_out(m, args, out, n=name):  # eager attention's weights [b, h, s, s] @ the latent [b, 1, s, r]
                add(n + ".latent_out", (out[1] @ latent.pop(n)).transpose(1, 2).reshape(-1, HEADS * KV_LORA))
            mod.register_forward_hook(latent_out)
    with torch.no_grad():
        model(input_ids=torch.from_numpy(tokens))
    return stats.sums, stats.counts


@pytest.mark.slow  # ~10 s: the whole model beside the engine
def test_square_sums_equal_the_whole_model():
    """Every statistic equals the whole model's: the linears (q_a_proj and kv_a_proj_with_mqa share one input),
    routed experts over their own tokens, the shared expert over all, kv_b_proj's latent, and the absorbed
    matrices' inputs; the GGUF entries are those, attn_k_b / attn_v_b one row of heads x dim with one count."""
    model_dir = tiny_deepseek_dir("fp8")
    tokens = np.random.default_rng(0).integers(0, TINY_BPE_TOKENS, size=(3, 40))
    ckpt = open_checkpoint(model_dir)
    got = calib_imatrix.collect_square_sums(ckpt, tokens, device=CPU)
    want, want_counts = _whole_model_square_sums(model_dir, tokens)
    assert set(got.sums) == set(want)
    assert not any(n.startswith(f"model.layers.{N_LAYER}.") for n in got.sums)  # MTP: not run
    for name, ref in want.items():
        np.testing.assert_allclose(got.sums[name], ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max(), err_msg=name)
        assert got.counts[name] == want_counts[name], name
    for i in range(1, N_LAYER):  # top-2 of 8: each token reaches two
        assert sum(got.counts[f"model.layers.{i}.mlp.experts.{e}.gate_proj.weight"] for e in range(8)) == 2 * tokens.size

    entries = calib_imatrix.gguf_imatrix_entries(ckpt, got)
    f32 = lambda name: got.sums[name].astype(np.float32)[None]
    for i in range(N_LAYER):
        b, a = f"blk.{i}.", f"model.layers.{i}.self_attn."
        for key, stat in (("attn_k_b", "q_nope"), ("attn_v_b", "latent_out")):
            sums, counts = entries[f"{b}{key}.weight"]
            np.testing.assert_array_equal(sums, f32(a + stat))
            assert counts.tolist() == [tokens.size]
        np.testing.assert_array_equal(entries[b + "attn_q_a.weight"][0], f32(a + "q_a_proj.weight"))
        np.testing.assert_array_equal(entries[b + "attn_kv_a_mqa.weight"][0], f32(a + "q_a_proj.weight"))
    assert entries["blk.0.attn_k_b.weight"][0].shape == (1, HEADS * NOPE)
    assert entries["blk.0.attn_v_b.weight"][0].shape == (1, HEADS * KV_LORA)
    s, c = entries["blk.1.ffn_down_exps.weight"]
    assert s.shape == (8, 128) and c.sum() == 2 * tokens.size
    assert entries["blk.1.ffn_down_shexp.weight"][1].tolist() == [tokens.size]
    assert "output.weight" in entries and not any(n.startswith(f"blk.{N_LAYER}.") for n in entries)


# ---------------------------------------------------------------- llama.cpp's tools on the converter's F32 GGUF
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("deepseek-calib")
    (d / "calib.txt").write_text(TEXT)
    return d


@pytest.fixture(scope="module")
def converted(work) -> Path:
    """llama.cpp's converter's F32 GGUF of the FP8 release (it dequantizes in float32, as qwqq does)."""
    return fixtures.convert_hf_to_gguf(tiny_deepseek_dir("fp8"), work / "fp8-f32.gguf", "f32")


@pytest.mark.slow  # the converter and llama-imatrix
def test_entries_are_llama_imatrixs(converted, work):
    """On the same two windows of 128 tokens, llama-imatrix (float32 weights and activations, MLA absorbed)
    and qwqq give the same entries (llama.cpp also lists the routers ffn_gate_inp, which it never quantizes;
    qwqq also the output matrix), attn_k_b / attn_v_b shaped as llama-imatrix keeps them (one count, heads side
    by side), the same counts (each routed expert's too: the fixture's routers have margins above float noise), the same
    values up to float32 noise."""
    theirs = read_imatrix(llama_imatrix(fixtures.llama_cpp_tools(), converted, work / "calib.txt",
                                        work / "llama.imatrix.gguf"))
    ckpt = open_checkpoint(tiny_deepseek_dir("fp8"))
    tokens = tokenize(ckpt, TEXT, 256, 128)
    assert tokens.shape == (2, 128) and (theirs.chunk_count, theirs.chunk_size) == (2, 128)
    ours = calib_imatrix.gguf_imatrix_entries(ckpt, calib_imatrix.collect_square_sums(ckpt, tokens, device=CPU))
    assert_same_imatrix_entries(ours, theirs)
    for key, width in (("attn_k_b", HEADS * NOPE), ("attn_v_b", HEADS * KV_LORA)):
        assert theirs.entries[f"blk.0.{key}.weight"][0].shape == (1, width)


@pytest.mark.slow  # qwqq imatrix, qwqq quantize --imatrix auto, llama-quantize
def test_a_qwqq_imatrix_file_drives_llama_quantize(converted, tmp_path):
    """`qwqq imatrix` on the FP8 folder writes the file; llama-quantize --imatrix makes an IQ2_XXS of the
    converter's F32 with it (each block weight needs importance data of the right size, attn_k_b and attn_v_b
    included), and `qwqq quantize --imatrix auto` on the same sample makes the same GGUF, tensor for tensor."""
    path = tmp_path / "qwqq.imatrix.gguf"
    calib = ["--calib-tokens", "256", "--calib-seqlen", "128"]
    r = run_qwqq("imatrix", tiny_deepseek_dir("fp8"), "-o", path, *calib, "-q")
    assert r.returncode == 0, r.stderr
    im = read_imatrix(path)
    assert {"blk.3.attn_k_b.weight", "blk.3.attn_v_b.weight"} <= set(im.entries)
    theirs = tmp_path / "theirs.gguf"
    subprocess.run([str(fixtures.llama_cpp_tools() / "llama-quantize"), "--imatrix", str(path), str(converted),
                    str(theirs), "IQ2_XXS", "2"], check=True, capture_output=True, timeout=600)
    out = tmp_path / "ours.gguf"
    r = run_qwqq("quantize", tiny_deepseek_dir("fp8"), "--type", "IQ2_XXS", "--imatrix", "auto", *calib,
                 "-o", out, "-j", "2", "-q")
    assert r.returncode == 0, r.stderr
    assert_same_tensors(out, theirs)

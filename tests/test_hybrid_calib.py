"""The importance matrix of the hybrid Qwen families (Qwen3.5, Qwen3.5-MoE, Qwen3-Next), one block at a time.

Held against (a) transformers' whole model with hooks on its linears (the same statistic, the same windows:
equal), (b) llama-imatrix on llama.cpp's converter's GGUF (the same entry names, counts and column order,
values within bf16 noise), (c) llama-quantize taking the file qwqq writes: byte for byte what `qwqq quantize
--imatrix` makes with it. The tiny fixtures are the releases' layout (tests/fixtures_hybrid.py): a vision
tower (skipped), an MTP block (not run, as llama-imatrix does not run it), fused experts on disk (Qwen3.5-MoE).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from qwqq.archs import hybrid
from qwqq.calib import imatrix as calib_imatrix
from qwqq.calib.text import tokenize
from qwqq.gguf.imatrix_file import read_imatrix
from qwqq.source import open_checkpoint
from tests import fixtures
from tests.conftest import one_line_error, run_qwqq
from tests.fixtures_hybrid import tiny_hybrid_dir
from tests.fixtures import TINY_BPE_TOKENS
from tests.reference import SquareSums, assert_same_imatrix_entries, assert_same_tensors
from tests.test_imatrix import TEXT, llama_imatrix

HYBRIDS = ["qwen3_5", "qwen3_5_moe", "qwen3_next"]
CPU = torch.device("cpu")


def _tokens(n_seq=3, seqlen=40, seed=0):
    return np.random.default_rng(seed).integers(0, TINY_BPE_TOKENS, size=(n_seq, seqlen))


def _whole_model_square_sums(model_dir: Path, tokens: np.ndarray):
    """Sum of x^2 per input column of every linear, from the release's own transformers class run whole
    (vision tower and all) on the windows, under the text model's names; per expert over its routed tokens
    (its down_proj: over act(gate x) * up x)."""
    import transformers

    cls = getattr(transformers, json.loads((model_dir / "config.json").read_text())["architectures"][0])
    model = cls.from_pretrained(model_dir, dtype=torch.float32).eval()
    n_layer = model.config.get_text_config().num_hidden_layers
    stats = SquareSums()
    add = stats.add

    for name, mod in model.named_modules():
        text_name = hybrid.rename(name + ".weight", n_layer)  # model.language_model.* -> model.*
        if isinstance(mod, torch.nn.Linear) and text_name is not None:
            mod.register_forward_pre_hook(lambda m, args, n=text_name: add(n, args[0]))
        if name.endswith(".mlp") and hasattr(mod, "experts"):
            mod.gate.register_forward_hook(stats.router_hook(text_name.removesuffix(".weight"), mod.experts))
    with torch.no_grad():
        model(input_ids=torch.from_numpy(tokens))
    return stats.sums, stats.counts


def _head_cols(heads, dim):
    return np.concatenate([np.arange(h * dim, (h + 1) * dim) for h in heads])


# ---------------------------------------------------------------- (a) the whole model, in torch
@pytest.mark.slow  # some 8 s each: the whole model in float32 beside the engine
@pytest.mark.parametrize("arch", HYBRIDS)
def test_square_sums_equal_the_whole_model(arch):
    """Every linear's statistic equals the whole transformers model's (the multimodal class for Qwen3.5, the
    vision tower idle): Gated DeltaNet layers with their state running within each window, gated attention
    with partial (M-)RoPE, routed tokens per expert; and the GGUF entries are those weights' statistics
    in the GGUF's own column order."""
    model_dir = tiny_hybrid_dir(arch)
    tokens = _tokens()
    ckpt = open_checkpoint(model_dir)
    got = calib_imatrix.collect_square_sums(ckpt, tokens, device=CPU)
    want, want_counts = _whole_model_square_sums(model_dir, tokens)
    assert set(got.sums) == set(want)
    assert not any(".visual." in n or n.startswith(("mtp.", "model.layers.4.")) for n in got.sums)
    for name, ref in want.items():
        np.testing.assert_allclose(got.sums[name], ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max(), err_msg=name)
        assert got.counts[name] == want_counts[name], name
    if arch != "qwen3_5":  # 8 experts, top-2: each token reaches two of them
        assert sum(got.counts[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"] for e in range(8)) == 2 * tokens.size

    entries = calib_imatrix.gguf_imatrix_entries(ckpt, got)
    la = "model.layers.0.linear_attn."
    out_proj = got.sums[la + "out_proj.weight"]
    f32 = lambda name: got.sums[name].astype(np.float32)  # the file's precision
    if arch == "qwen3_next":  # in_proj_qkvz regrouped into two tensors, both reading its input; heads as stored
        for key in ("attn_qkv", "attn_gate"):
            np.testing.assert_array_equal(entries[f"blk.0.{key}.weight"][0][0], f32(la + "in_proj_qkvz.weight"))
        np.testing.assert_array_equal(entries["blk.0.ssm_ba.weight"][0][0], f32(la + "in_proj_ba.weight"))
        np.testing.assert_array_equal(entries["blk.0.ssm_out.weight"][0][0], out_proj.astype(np.float32))
    else:  # 4 value heads of 32 grouped by 2 key heads (0 1 | 2 3), tiled in the GGUF: 0 2 1 3
        np.testing.assert_array_equal(entries["blk.0.ssm_out.weight"][0][0],
                                      out_proj[_head_cols([0, 2, 1, 3], 32)].astype(np.float32))
        for key, proj in (("attn_qkv", "in_proj_qkv"), ("attn_gate", "in_proj_z"), ("ssm_alpha", "in_proj_a"),
                          ("ssm_beta", "in_proj_b")):
            np.testing.assert_array_equal(entries[f"blk.0.{key}.weight"][0][0], f32(la + proj + ".weight"))
    s, c = entries["blk.3.attn_q.weight"]
    assert s.shape == (1, 256) and c.tolist() == [tokens.size]
    if arch != "qwen3_5":
        s, c = entries["blk.1.ffn_down_exps.weight"]
        assert s.shape == (8, 128) and c.sum() == 2 * tokens.size
        assert entries["blk.1.ffn_down_shexp.weight"][1].tolist() == [tokens.size]
        assert entries["blk.1.ffn_gate_inp_shexp.weight"][0].shape == (1, 256)
    assert not any(n.startswith("blk.4.") for n in entries) and "output.weight" in entries


# ---------------------------------------------------------------- (b) llama-imatrix, on llama.cpp's own GGUF
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hybrid-calib")
    (d / "calib.txt").write_text(TEXT)
    return d


@pytest.fixture(scope="module")
def converted(work):
    """(arch, mtp, outtype) -> llama.cpp's converter's GGUF of the tiny model (BF16 unless told; --no-mtp when
    mtp is False)."""
    made = {}

    def get(arch: str, mtp: bool = False, outtype: str = "bf16") -> Path:
        if (arch, mtp, outtype) not in made:
            out = work / f"{arch}-{'mtp' if mtp else 'nomtp'}-{outtype}.gguf"
            made[arch, mtp, outtype] = fixtures.convert_hf_to_gguf(tiny_hybrid_dir(arch), out, outtype,
                                                                   *([] if mtp else ["--no-mtp"]))
        return made[arch, mtp, outtype]

    return get


@pytest.mark.slow  # llama.cpp's converter and llama-imatrix
@pytest.mark.parametrize("arch", HYBRIDS)
def test_entries_are_llama_imatrixs(arch, converted, work):
    """On the same two windows of 128 tokens, llama-imatrix (on the converter's F32 GGUF: float32 weights and
    activations, so that both route every token alike) and qwqq (float32) give the same entries (llama.cpp also
    lists the routers ffn_gate_inp, which it never quantizes; qwqq also the output matrix, as it does for every
    family), the same counts (each routed expert's too: the fixtures' routers have margins above float noise),
    and values within float noise, columns in the same order: ssm_out's tiled value heads included."""
    theirs = read_imatrix(llama_imatrix(fixtures.llama_cpp_tools(), converted(arch, outtype="f32"), work / "calib.txt",
                                        work / f"{arch}-llama.imatrix.gguf"))
    ckpt = open_checkpoint(tiny_hybrid_dir(arch))
    tokens = tokenize(ckpt, TEXT, 256, 128)
    assert tokens.shape == (2, 128) and (theirs.chunk_count, theirs.chunk_size) == (2, 128)
    stats = calib_imatrix.collect_square_sums(ckpt, tokens, device=CPU)
    ours = calib_imatrix.gguf_imatrix_entries(ckpt, stats)
    assert_same_imatrix_entries(ours, theirs)
    for b in range(3):  # the column order is the GGUF's: the source's order correlates far worse
        name = f"blk.{b}.ssm_out.weight"
        t = theirs.entries[name][0][0]
        err = np.abs(ours[name][0][0] - t).max() / t.max()
        assert err < 0.1, (name, err)
        if arch != "qwen3_next":
            raw = stats.sums[f"model.layers.{b}.linear_attn.out_proj.weight"]
            assert np.abs(raw - t).max() / t.max() > 3 * err, name


# ---------------------------------------------------------------- (c) llama-quantize takes qwqq's file
def _llama_quantize(src: Path, dst: Path, mixture: str, imatrix: Path) -> Path:
    subprocess.run([str(fixtures.llama_cpp_tools() / "llama-quantize"), "--imatrix", str(imatrix), str(src), str(dst),
                    mixture, "2"], check=True, capture_output=True, timeout=600)
    return dst


@pytest.mark.slow  # qwqq imatrix, then an IQ2_XXS by each tool
@pytest.mark.parametrize("arch", ["qwen3_next"])  # one family (the regrouped qkvz, experts): ~30 s each; the
def test_a_qwqq_imatrix_file_drives_llama_quantize(arch, converted, tmp_path):  # entries of all three are held above
    """`qwqq imatrix` on the release's folder writes the file; llama-quantize --imatrix makes an IQ2_XXS (every
    block weight needs importance data) of the converter's --no-mtp BF16 with it, and `qwqq quantize --imatrix
    <file> --no-mtp` makes the same GGUF, tensor for tensor."""
    path = tmp_path / "qwqq.imatrix.gguf"
    r = run_qwqq("imatrix", tiny_hybrid_dir(arch), "-o", path, "--calib-tokens", "256", "--calib-seqlen", "128", "-q")
    assert r.returncode == 0, r.stderr
    assert not any(n.startswith("blk.4.") for n in read_imatrix(path).entries)  # MTP: not run
    theirs = _llama_quantize(converted(arch), tmp_path / "theirs.gguf", "IQ2_XXS", path)
    out = tmp_path / "ours.gguf"
    r = run_qwqq("quantize", tiny_hybrid_dir(arch), "--type", "IQ2_XXS", "--imatrix", path, "--no-mtp",
                 "-o", out, "-j", "2", "-q")
    assert r.returncode == 0, r.stderr
    assert_same_tensors(out, theirs)


@pytest.mark.slow  # two calibration passes and two Q4_K_M writes
def test_imatrix_auto_with_the_mtp_block_kept(converted, tmp_path):
    """--imatrix auto computes what llama-imatrix would: nothing for the MTP block. A mixture that needs
    importance data there is refused in one line naming --no-mtp; one that does not (Q4_K_M) quantizes the
    block without it, as llama-quantize does with that file, byte for byte, and says so in a note."""
    arch = "qwen3_5"
    src = tiny_hybrid_dir(arch)
    calib = ["--calib-tokens", "256", "--calib-seqlen", "128"]
    r = run_qwqq("quantize", src, "--type", "IQ2_XXS", "--imatrix", "auto", *calib, "-o", tmp_path / "iq2.gguf",
                 "-j", "2", "-q")
    one_line_error(r, "multi-token-prediction block", "--no-mtp")
    assert not list(tmp_path.glob("iq2.gguf*"))

    out = tmp_path / "q4.gguf"
    r = run_qwqq("quantize", src, "--type", "Q4_K_M", "--imatrix", "auto", *calib, "-o", out, "-j", "2", "-q")
    assert r.returncode == 0, r.stderr
    note = next(line for line in r.stderr.splitlines() if "the imatrix has no data for" in line)
    assert "blk.4.attn_q.weight" in note and "as llama-quantize does" in note, note
    path = tmp_path / "same-sample.imatrix.gguf"  # the same sample as auto's: the same importance data
    assert run_qwqq("imatrix", src, "-o", path, *calib, "-q").returncode == 0
    assert_same_tensors(out, _llama_quantize(converted(arch, mtp=True), tmp_path / "theirs.gguf", "Q4_K_M", path))

"""Qwen3.5, Qwen3.5-MoE and Qwen3-Next to GGUF, against llama.cpp's own converter and quantizer.

Tiny random models of each class, written as the releases are (tests/fixtures_hybrid.py: the multimodal
form with a vision tower, fused or per-expert experts, an MTP block): qwqq's one pass must write what
`convert_hf_to_gguf.py` + `llama-quantize` write from the same checkpoint, tensor for tensor, byte for byte;
llama.cpp must run the result and agree with transformers' forward pass.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from qwqq.gguf.imatrix_file import read_imatrix
from qwqq.gguf.prepared import prepare
from qwqq.gguf.quantize import GGUF_TYPES, quantize_to_gguf, resolve_mixture
from qwqq.gguf.types import MIXTURES
from tests import fixtures
from tests.conftest import one_line_error, run_qwqq
from tests.fixtures_hybrid import tiny_hybrid_dir
from tests.reference import (assert_same_tensors, keys_unlike_the_converters, llamacpp_quantize, metadata_values,
                             tensor_table)
from tests.test_imatrix import TEXT, llama_imatrix

pytestmark = pytest.mark.slow  # each case runs llama.cpp's converter and quantizer
HYBRIDS = ["qwen3_5", "qwen3_5_moe", "qwen3_next"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(arch, mtp) -> llama.cpp's converter's BF16 GGUF of the tiny model (--no-mtp when mtp is False)."""
    d, made = tmp_path_factory.mktemp("convert"), {}

    def get(arch: str, mtp: bool = True) -> Path:
        if (arch, mtp) not in made:
            out = d / f"{arch}-{'mtp' if mtp else 'nomtp'}-bf16.gguf"
            made[arch, mtp] = fixtures.convert_hf_to_gguf(tiny_hybrid_dir(arch), out, "bf16", *([] if mtp else ["--no-mtp"]))
        return made[arch, mtp]

    return get


@pytest.mark.parametrize("arch", HYBRIDS)
def test_bf16_metadata_and_tensors_are_the_converters(arch, converted, tmp_path):
    """Every key the converter writes (ssm sizes, recurrent layers, rope sections, nextn count, ...) with its
    value; every tensor (renamed language tower, MTP as nextn block, +1 norms, -exp(A_log), reordered value
    heads, regrouped qkvz) as llama-quantize leaves the converter's BF16."""
    ours = quantize_to_gguf(tiny_hybrid_dir(arch), resolve_mixture(type_name="BF16"), out=tmp_path / "ours.gguf",
                            progress=False, threads=2).path
    theirs = converted(arch)
    differ = keys_unlike_the_converters(ours, theirs)
    assert not differ, differ
    vb = metadata_values(theirs)
    assert vb[f"{vb['general.architecture']}.nextn_predict_layers"] == 1
    requantized = tmp_path / "llama-bf16.gguf"
    llamacpp_quantize(theirs, requantized, "BF16")
    assert_same_tensors(ours, requantized)


CASES = [(a, "Q4_K_M") for a in HYBRIDS] + [("qwen3_5", "Q8_0"), ("qwen3_next", "Q2_K")]


@pytest.mark.parametrize("arch, mixture", CASES, ids=[f"{a}-{m}" for a, m in CASES])
def test_quantized_bytes_are_llama_quantizes(arch, mixture, converted, tmp_path):
    ours = quantize_to_gguf(tiny_hybrid_dir(arch), resolve_mixture(type_name=mixture), out=tmp_path / "ours.gguf",
                            progress=False, threads=2)
    theirs = tmp_path / "llama.gguf"
    llamacpp_quantize(converted(arch), theirs, mixture)
    assert_same_tensors(ours.path, theirs)
    assert ours.plan.tensor_bytes == sum(v[2] for v in tensor_table(ours.path, with_hash=False).values())


@pytest.mark.parametrize("arch", HYBRIDS)
def test_every_mixture_is_llama_quantizes(arch, converted, tmp_path):
    """Every mixture quantize offers, byte for byte as llama-quantize writes it from the converter's BF16: the
    19 that need no importance matrix here, the 11 that want one (IQ1_S ... Q2_K_S) in the next test."""
    for mixture in GGUF_TYPES:
        ours = quantize_to_gguf(tiny_hybrid_dir(arch), resolve_mixture(type_name=mixture),
                                out=tmp_path / f"ours-{mixture}.gguf", progress=False, threads=2).path
        theirs = tmp_path / f"llama-{mixture}.gguf"
        llamacpp_quantize(converted(arch), theirs, mixture)
        assert_same_tensors(ours, theirs)
        ours.unlink(), theirs.unlink()


def test_every_imatrix_mixture_is_llama_quantizes(converted, tmp_path):
    """The mixtures that take an importance matrix (llama-imatrix's own file, MTP left out on both sides, as
    llama-imatrix never runs the block), on the hybrid MoE: byte for byte as llama-quantize --imatrix."""
    arch = "qwen3_5_moe"
    (tmp_path / "calib.txt").write_text(TEXT)
    imatrix = llama_imatrix(fixtures.llama_cpp_tools(), converted(arch, mtp=False), tmp_path / "calib.txt",
                            tmp_path / "imatrix.gguf")
    imatrix_mixtures = [m for m in MIXTURES if m not in GGUF_TYPES]
    assert len(imatrix_mixtures) == 11
    for mixture in imatrix_mixtures:
        ours = tmp_path / f"ours-{mixture}.gguf"
        quantize_to_gguf(prepare(tiny_hybrid_dir(arch), mtp=False), resolve_mixture(type_name=mixture, has_imatrix=True),
                         out=ours, progress=False, threads=2, imatrix=read_imatrix(imatrix))
        theirs = tmp_path / f"llama-{mixture}.gguf"
        subprocess.run([str(fixtures.llama_cpp_tools() / "llama-quantize"), "--imatrix", str(imatrix),
                        str(converted(arch, mtp=False)), str(theirs), mixture, "2"], check=True, capture_output=True)
        assert_same_tensors(ours, theirs)
        ours.unlink(), theirs.unlink()


def test_iq_type_with_an_imatrix_is_llama_quantizes_and_mtp_asks_for_no_mtp(converted, tmp_path):
    """llama-imatrix never runs the MTP block: with --no-mtp on both sides an IQ2_XXS matches byte for byte;
    with the block kept, qwqq says in one line to leave it out (llama-quantize aborts)."""
    arch = "qwen3_5_moe"
    (tmp_path / "calib.txt").write_text(TEXT)
    imatrix = llama_imatrix(fixtures.llama_cpp_tools(), converted(arch, mtp=False), tmp_path / "calib.txt",
                            tmp_path / "imatrix.gguf")
    r = run_qwqq("quantize", tiny_hybrid_dir(arch), "--type", "IQ2_XXS", "--imatrix", imatrix, "--no-mtp",
                 "-o", tmp_path / "ours.gguf", "-j", "2", "-q")
    assert r.returncode == 0, r.stderr
    assert "note: the vision tower (21 tensors) is left out" in r.stderr
    theirs = tmp_path / "llama.gguf"
    subprocess.run([str(fixtures.llama_cpp_tools() / "llama-quantize"), "--imatrix", str(imatrix),
                    str(converted(arch, mtp=False)), str(theirs), "IQ2_XXS", "2"], check=True, capture_output=True)
    assert_same_tensors(tmp_path / "ours.gguf", theirs)
    r = run_qwqq("quantize", tiny_hybrid_dir(arch), "--type", "IQ2_XXS", "--imatrix", imatrix,
                 "-o", tmp_path / "with-mtp.gguf", "-j", "2", "-q")
    one_line_error(r, "multi-token-prediction block", "--no-mtp")
    assert not (tmp_path / "with-mtp.gguf").exists()


@pytest.mark.parametrize("arch", HYBRIDS)
def test_llama_cpp_runs_it_as_transformers_does(arch, tmp_path):
    """An F16 GGUF from qwqq: llama.cpp's logits over a short prompt agree with transformers' float32 forward
    (the recurrent state and the gated attention included), and it generates."""
    import llama_cpp

    src = tiny_hybrid_dir(arch)
    out = quantize_to_gguf(src, resolve_mixture(type_name="F16"), out=tmp_path / "f16.gguf", progress=False,
                           threads=2).path
    ids = [785, 2062, 2174, 315, 2869, 681, 374, 393, 277, 285, 13, 576]  # "The capital of France is Paris. The"
    want = fixtures.reference_logits(src, ids)
    llm = llama_cpp.Llama(str(out), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    try:
        llm.eval(ids)
        got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
        assert np.abs(got - want).max() < 0.05, np.abs(got - want).max()
        assert (got.argmax(-1) == want.argmax(-1)).all()
        llm.reset()
        gen = []
        for tok in llm.generate(ids, temp=0.0):
            gen.append(tok)
            if len(gen) == 4:
                break
        assert len(gen) == 4 and all(0 <= t < llm.n_vocab() for t in gen)
    finally:
        llm.close()

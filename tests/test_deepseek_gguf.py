"""DeepSeek-V3 / R1 to GGUF from its FP8 release (and from a bf16 cast), against llama.cpp's own converter
and quantizer: MLA split into attn_k_b (transposed per head) / attn_v_b, experts stacked, router and
correction bias float, the MTP layer left out, the deepseek2 metadata. FP8 blocks are dequantized while
streaming; the reference for an FP8 source is the converter's F32 output (it dequantizes in float32), for
the bf16 cast its BF16 output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qwqq.gguf.quantize import plan_checkpoint, quantize_to_gguf, resolve_mixture
from qwqq.gguf.reader import read_gguf
from qwqq.source import open_checkpoint
from tests import fixtures
from tests.fixtures_deepseek import tiny_deepseek_dir
from tests.reference import assert_same_tensors, keys_unlike_the_converters, llama_quantize_plan, llamacpp_quantize
from tests.test_plan_vs_llamacpp import MIXTURES

pytestmark = pytest.mark.slow  # llama.cpp's converter and quantizer on each form
FORMS = {"fp8": "F32", "bfloat16": "BF16"}  # source form -> the converter's lossless output type for it


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    d, made = tmp_path_factory.mktemp("convert"), {}

    def get(form: str) -> Path:
        if form not in made:
            made[form] = fixtures.convert_hf_to_gguf(tiny_deepseek_dir(form), d / f"{form}.gguf", FORMS[form].lower())
        return made[form]

    return get


@pytest.mark.parametrize("form", FORMS)
def test_lossless_output_is_the_converters(form, converted, tmp_path):
    """Every metadata key the converter writes (MLA lengths, head_count_kv 1, expert groups, sigmoid gating,
    yarn) and every tensor, byte for byte: FP8 dequantized exactly as the converter does."""
    r = quantize_to_gguf(tiny_deepseek_dir(form), resolve_mixture(type_name=FORMS[form]), out=tmp_path / "ours.gguf",
                         progress=False, threads=2)
    theirs = converted(form)
    differ = keys_unlike_the_converters(r.path, theirs)
    assert not differ, differ
    assert_same_tensors(r.path, theirs)
    assert not any(t.name.startswith("blk.4.") for t in read_gguf(r.path).tensors)  # the MTP layer is left out


def test_every_mixture_plans_as_llama_quantize(converted):
    """The plan is a function of names and shapes, the same for both forms: held on the FP8 one."""
    ckpt = open_checkpoint(tiny_deepseek_dir("fp8"))
    tools = fixtures.llama_cpp_tools()
    for mixture in MIXTURES:
        ours = {t.name: t.type.name for t in plan_checkpoint(ckpt, mixture)[2].tensors}
        theirs = llama_quantize_plan(tools, converted("fp8"), mixture)
        assert theirs and ours == theirs, (mixture, {n: (ours.get(n), theirs.get(n)) for n in set(ours) | set(theirs)
                                                     if ours.get(n) != theirs.get(n)})


CASES = [("fp8", "Q4_K_M"), ("fp8", "Q8_0")]  # the bf16 cast: its lossless tensors are held above


@pytest.mark.parametrize("form, mixture", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_quantized_bytes_are_llama_quantizes(form, mixture, converted, tmp_path):
    ours = quantize_to_gguf(tiny_deepseek_dir(form), resolve_mixture(type_name=mixture), out=tmp_path / "ours.gguf",
                            progress=False, threads=2)
    theirs = tmp_path / "llama.gguf"
    llamacpp_quantize(converted(form), theirs, mixture)
    assert_same_tensors(ours.path, theirs)


def test_iq2_xxs_with_llama_imatrixs_file_is_byte_identical(converted, tmp_path):
    """An importance matrix from llama-imatrix (on the converter's F32 of the FP8 release) drives both sides."""
    import subprocess

    from tests.test_imatrix import TEXT, llama_imatrix

    (tmp_path / "calib.txt").write_text(TEXT)
    tools = fixtures.llama_cpp_tools()
    imatrix = llama_imatrix(tools, converted("fp8"), tmp_path / "calib.txt", tmp_path / "imatrix.gguf")
    from tests.conftest import run_qwqq

    r = run_qwqq("quantize", tiny_deepseek_dir("fp8"), "--type", "IQ2_XXS", "--imatrix", imatrix,
                 "-o", tmp_path / "ours.gguf", "-j", "2", "-q")
    assert r.returncode == 0, r.stderr
    theirs = tmp_path / "llama.gguf"
    subprocess.run([str(tools / "llama-quantize"), "--imatrix", str(imatrix), str(converted("fp8")), str(theirs),
                    "IQ2_XXS", "2"], check=True, capture_output=True)
    assert_same_tensors(tmp_path / "ours.gguf", theirs)


def test_llama_cpp_runs_the_fp8_release_as_transformers_runs_its_bf16_cast(tmp_path):
    """qwqq's F16 GGUF of the FP8 release: llama.cpp's logits agree with transformers' float32 forward of the
    bf16 cast (the same weights), and it generates."""
    import llama_cpp

    out = quantize_to_gguf(tiny_deepseek_dir("fp8"), resolve_mixture(type_name="F32"), out=tmp_path / "f32.gguf",
                           progress=False, threads=2).path
    ids = [785, 2062, 2174, 315, 2869, 681, 374, 393, 277, 285, 13, 576]  # "The capital of France is Paris. The"
    want = fixtures.reference_logits(tiny_deepseek_dir("bfloat16"), ids)
    llm = llama_cpp.Llama(str(out), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    try:
        llm.eval(ids)
        got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
        assert np.abs(got - want).max() < 0.05, np.abs(got - want).max()
        assert (got.argmax(-1) == want.argmax(-1)).all()
    finally:
        llm.close()


def test_a_budget_from_the_fp8_release_is_filled_and_runs(tmp_path):
    """--target-bpw on DeepSeek's tensor kinds (MLA halves, stacked experts, shared experts): sensitivity is
    measured on the rows the writer quantizes (transposed k_b included), the file stays within the budget,
    and llama.cpp runs it."""
    import llama_cpp

    from tests.conftest import run_qwqq

    out = tmp_path / "budget.gguf"
    r = run_qwqq("quantize", tiny_deepseek_dir("fp8"), "--target-bpw", "4.5", "-o", out, "-j", "2", "-q")
    assert r.returncode == 0, r.stderr
    assert "multi-token-prediction layer (44 tensors) is left out" in r.stderr
    g = read_gguf(out)
    bpw = 8 * sum(t.nbytes for t in g.tensors) / sum(t.n_elements for t in g.tensors)
    assert bpw <= 4.5 and len({t.type for t in g.tensors}) > 2
    llm = llama_cpp.Llama(str(out), n_ctx=64, n_threads=2, verbose=False)
    try:
        llm.eval(llm.tokenize(b"Hello"))
        assert np.isfinite(np.asarray(llm.scores[: llm.n_tokens])).all()
    finally:
        llm.close()

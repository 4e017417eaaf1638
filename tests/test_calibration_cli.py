"""The calibration commands as a user runs them: qwqq imatrix, quantize --imatrix auto / --calib,
quantize --format gptq, qwqq eval; and their bad inputs, each one line, non-zero, nothing left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwqq.gguf.imatrix_file import read_imatrix
from tests.conftest import one_line_error, run_qwqq
from tests.fixtures import smollm2_gguf, tiny_model_dir

FAST = ["--calib-tokens", "256", "--calib-seqlen", "128", "-q"]


@pytest.fixture(scope="module")
def qwen2():
    return tiny_model_dir("qwen2")


@pytest.mark.slow
def test_imatrix_command_then_iq2_xs_that_llama_cpp_runs(qwen2, tmp_path):
    r = run_qwqq("imatrix", qwen2, "-o", tmp_path / "m.imatrix.gguf", *FAST)
    assert r.returncode == 0, r.stderr
    im = read_imatrix(tmp_path / "m.imatrix.gguf")
    assert len(im) == 15 and im.chunk_count == 2 and im.chunk_size == 128  # 7 linears x 2 layers + output
    r = run_qwqq("quantize", qwen2, "--type", "IQ2_XS", "--imatrix", tmp_path / "m.imatrix.gguf",
                 "-o", tmp_path / "iq2.gguf", "-q")
    assert r.returncode == 0, r.stderr
    from llama_cpp import Llama

    llm = Llama(model_path=str(tmp_path / "iq2.gguf"), n_ctx=64, verbose=False)
    out = llm("The capital of France is", max_tokens=4, temperature=0)
    assert out["usage"]["completion_tokens"] >= 1
    llm.close()


@pytest.mark.slow
def test_calib_implies_imatrix_auto(qwen2, tmp_path):
    text = tmp_path / "mine.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 40 + "The sum of 2 and 3 is 5. " * 40)
    r = run_qwqq("quantize", qwen2, "--type", "Q2_K", "--calib", text, "-o", tmp_path / "q2.gguf", *FAST)
    assert r.returncode == 0, r.stderr
    from qwqq.gguf.reader import read_gguf

    meta = read_gguf(tmp_path / "q2.gguf").metadata
    assert "mine.txt" in str(meta.get("quantize.imatrix.dataset", ""))


@pytest.mark.slow
def test_gptq_folder_and_eval_json(qwen2, tmp_path):
    r = run_qwqq("quantize", qwen2, "--format", "gptq", "--bits", "4", "--group-size", "64", "--desc-act",
                 "-o", tmp_path / "g", *FAST)
    assert r.returncode == 0, r.stderr
    q = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert (q["bits"], q["group_size"], q["desc_act"]) == (4, 64, True)
    assert q["damp_percent"] == 0.05  # the default: GPTQModel's, and better than 0.01 on Qwen2.5-1.5B
    r = run_qwqq("eval", tmp_path / "g", "--ref", qwen2, "--ctx", "128", "--max-tokens", "512", "--json", "-q",
                 env={"QWQQ_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["tokens"] == 4 * 63 and 0 < res["kld_mean"] < 1 and 0 <= res["same_top"] <= 1


def _calib(tmp_path, data: bytes):
    p = tmp_path / "calib.txt"
    p.write_bytes(data)
    return p


BAD = {
    "gptq bits": (["quantize", "{src}", "--format", "gptq", "--bits", "5"], ["--bits 5", "2, 3, 4, 8"]),
    "gptq group size": (["quantize", "{src}", "--format", "gptq", "--group-size", "100"], ["--group-size 100"]),
    "gptq damp": (["quantize", "{src}", "--format", "gptq", "--damp", "1.5"], ["--damp"]),
    "gptq with --type": (["quantize", "{src}", "--format", "gptq", "--type", "Q4_K_M"], ["--type"]),
    "gptq resume": (["quantize", "{src}", "--format", "gptq", "--resume"], ["--resume"]),
    "desc-act on gguf": (["quantize", "{src}", "--desc-act"], ["--format gptq"]),
    "imatrix on mlx": (["quantize", "{src}", "--format", "mlx", "--imatrix", "auto"], ["--imatrix"]),
    "calib on mlx": (["quantize", "{src}", "--format", "mlx", "--calib", "{calib}"], ["--calib"]),
    "imatrix file and calib": (["quantize", "{src}", "--type", "Q2_K", "--imatrix", "{calib}", "--calib", "{calib}"],
                               ["not both"]),
    "missing calib": (["quantize", "{src}", "--format", "gptq", "--calib", "{tmp}/nope.txt"], ["nope.txt"]),
    "calib not utf-8": (["imatrix", "{src}", "--calib", "{binary}"], ["not UTF-8"]),
    "calib too short": (["imatrix", "{src}", "--calib", "{short}"], ["at least 64"]),
    "calib tokens too few": (["imatrix", "{src}", "--calib-tokens", "10"], ["--calib-tokens"]),
    "bad device": (["imatrix", "{src}", "--device", "tpu:9"], ["tpu:9"]),
    "unknown format": (["quantize", "{src}", "--format", "exl2"], ["exl2"]),
    "imatrix out exists": (["imatrix", "{src}", "-o", "{existing}"], ["already exists"]),
    "eval missing model": (["eval", "{tmp}/none.gguf", "--ref", "{src}"], ["no such file"]),
    "eval missing ref": (["eval", "{src}", "--ref", "{tmp}/none"], ["no such file"]),
    "eval ctx": (["eval", "{src}", "--ref", "{src}", "--ctx", "8"], ["--ctx"]),
    "eval text too short": (["eval", "{src}", "--ref", "{src}", "--text", "{short}"], ["fewer than one window"]),
    "eval other vocabulary": (["eval", "{smollm2}", "--ref", "{src}", "--ctx", "64", "--max-tokens", "128"],
                              ["vocabulary"]),
    "eval truncated gptq": (["eval", "{trunc_gptq}", "--ref", "{src}", "--ctx", "64", "--max-tokens", "128"],
                            ["model.safetensors"]),
    "eval gptq config disagrees": (["eval", "{bits_gptq}", "--ref", "{src}", "--ctx", "64", "--max-tokens", "128"],
                                   ["config"]),
    "eval truncated gguf": (["eval", "{trunc_gguf}", "--ref", "{src}", "--ctx", "64", "--max-tokens", "128"],
                            ["trunc.gguf"]),
    "eval not a gguf": (["eval", "{not_gguf}", "--ref", "{src}"], ["not a GGUF"]),
    "eval truncated mlx": (["eval", "{trunc_mlx}", "--ref", "{src}", "--ctx", "64", "--max-tokens", "128"],
                           ["model.safetensors"]),
    "eval mlx config without bits": (["eval", "{nobits_mlx}", "--ref", "{src}", "--ctx", "64", "--max-tokens", "128"],
                                     ["quantization", "bits"]),
}


@pytest.fixture(scope="module")
def truncated_gptq(tmp_path_factory, qwen2):
    import torch

    from qwqq.gptq.solver import rtn_quantize
    from qwqq.gptq.checkpoint import write_gptq
    from qwqq.gptq.packing import pack

    def q(lin, w):
        r = rtn_quantize(torch.from_numpy(w), bits=4, group_size=128)
        return pack(r.q, r.scales, r.zeros, r.g_idx, 4)

    out = write_gptq(qwen2, tmp_path_factory.mktemp("tg") / "g", q).path
    f = out / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    return out


@pytest.fixture(scope="module")
def bits_mismatch_gptq(tmp_path_factory, truncated_gptq, qwen2):
    """A whole 4-bit GPTQ folder whose config says 8 bits."""

    import torch

    from qwqq.gptq.solver import rtn_quantize
    from qwqq.gptq.checkpoint import write_gptq
    from qwqq.gptq.packing import pack

    def q(lin, w):
        r = rtn_quantize(torch.from_numpy(w), bits=4, group_size=128)
        return pack(r.q, r.scales, r.zeros, r.g_idx, 4)

    out = write_gptq(qwen2, tmp_path_factory.mktemp("bm") / "g", q).path
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 8
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def truncated_gguf(tmp_path_factory):
    src = smollm2_gguf()
    out = tmp_path_factory.mktemp("tg") / "trunc.gguf"
    with open(src, "rb") as f:
        out.write_bytes(f.read(src.stat().st_size // 3))
    return out


@pytest.fixture(scope="module")
def mlx_folders(tmp_path_factory, qwen2):
    """A 4-bit MLX folder cut in half, and a whole one whose config's quantization block has lost its bits."""
    pytest.importorskip("mlx.core")
    import shutil

    from qwqq.mlx.quantize import quantize_to_mlx

    base = tmp_path_factory.mktemp("mlx")
    whole = quantize_to_mlx(qwen2, bits=4, out=base / "whole", progress=False).path
    trunc = Path(shutil.copytree(whole, base / "trunc"))
    f = trunc / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    nobits = Path(shutil.copytree(whole, base / "nobits"))
    cfg = json.loads((nobits / "config.json").read_text())
    del cfg["quantization"]["bits"]
    (nobits / "config.json").write_text(json.dumps(cfg))
    return {"trunc_mlx": trunc, "nobits_mlx": nobits}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_calibration_and_eval_inputs(case, qwen2, tmp_path, truncated_gptq, bits_mismatch_gptq, truncated_gguf,
                                         mlx_folders):
    args, needles = BAD[case]
    existing = tmp_path / "there.gguf"
    existing.write_bytes(b"x")
    subs = {"src": qwen2, "tmp": tmp_path, "calib": _calib(tmp_path, b"hello " * 200),
            "binary": (tmp_path / "bin.txt"), "short": (tmp_path / "short.txt"), "existing": existing,
            "smollm2": smollm2_gguf(), "trunc_gptq": truncated_gptq, "bits_gptq": bits_mismatch_gptq,
            "trunc_gguf": truncated_gguf, "not_gguf": tmp_path / "fake.gguf", **mlx_folders}
    subs["not_gguf"].write_bytes(b"this is not a model\n" * 100)
    subs["binary"].write_bytes(b"\xff\xfe\x00bad" * 50)
    subs["short"].write_text("too short")
    before = set(tmp_path.iterdir())
    r = run_qwqq(*[a.format(**subs) for a in args], cwd=tmp_path, env={"QWQQ_CACHE": str(tmp_path / "cache")})
    one_line_error(r, *needles)
    assert set(tmp_path.iterdir()) - before <= {tmp_path / "cache"}

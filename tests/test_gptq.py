"""GPTQ end to end: the checkpoint holds exactly the solver's weights, a third-party reader
(llama.cpp's convert_hf_to_gguf.py) reads the same weights, and GPTQ beats round-to-nearest."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qwqq.calib import engine as calibrate
from qwqq.calib import text as calib_text
from qwqq.gptq.quantize import SolverSettings, gptq_model, quantize_to_gptq
from qwqq.gptq.checkpoint import write_gptq
from qwqq.gptq.packing import dequantize, pack
from qwqq.gptq.solver import rtn_quantize
from qwqq.source import open_checkpoint
from tests.fixtures import convert_hf_to_gguf, tiny_model_dir

pytestmark = pytest.mark.slow  # GPTQ-calibrates tiny models (13-26 s each) and runs llama.cpp's converter

CALIB = dict(calib_tokens=512, calib_seqlen=128)


def _packed_from_folder(folder, module):
    from safetensors.numpy import load_file

    tensors = {}
    for f in folder.glob("*.safetensors"):
        tensors.update(load_file(f))
    return {k: tensors[f"{module}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}


@pytest.fixture(scope="module")
def gptq_qwen2(tmp_path_factory):
    out = tmp_path_factory.mktemp("gptq") / "tiny-qwen2-gptq"
    run = quantize_to_gptq(tiny_model_dir("qwen2"), out=out, progress=False, **CALIB)
    return run


def test_checkpoint_holds_exactly_the_solver_weights(gptq_qwen2):
    ckpt = open_checkpoint(tiny_model_dir("qwen2"))
    tokens = calib_text.tokenize(ckpt, calib_text.default_text(), **{"n_tokens": 512, "seqlen": 128})
    results = {}
    model = calibrate.open_block_model(ckpt, torch.device("cpu"))
    gptq_model(model, tokens, SolverSettings(), lambda i, q, u: results.update(q))
    assert len(results) == 14
    for name, r in results.items():
        assert r.method == "gptq"
        got = dequantize(_packed_from_folder(gptq_qwen2.path, name.removesuffix(".weight")), 4)
        np.testing.assert_array_equal(got, r.weight.numpy(), err_msg=name)


def test_checkpoint_config_is_what_loaders_read(gptq_qwen2):
    config = json.loads((gptq_qwen2.path / "config.json").read_text())
    q = config["quantization_config"]
    assert (q["quant_method"], q["bits"], q["group_size"], q["sym"], q["desc_act"]) == ("gptq", 4, 128, True, False)
    from transformers import AutoConfig

    AutoConfig.from_pretrained(gptq_qwen2.path)  # parses quantization_config


def test_llama_cpp_converter_reads_the_same_weights(gptq_qwen2, tmp_path):
    """convert_hf_to_gguf.py dequantizes GPTQ checkpoints itself: its F32 tensors are our weights."""
    import gguf

    out = convert_hf_to_gguf(gptq_qwen2.path, tmp_path / "from-gptq.gguf", "f32")
    reader = gguf.GGUFReader(out)
    by = {t.name: np.asarray(t.data) for t in reader.tensors}
    for module, gguf_name in [("model.layers.0.self_attn.q_proj", "blk.0.attn_q.weight"),
                              ("model.layers.1.mlp.down_proj", "blk.1.ffn_down.weight")]:
        want = dequantize(_packed_from_folder(gptq_qwen2.path, module), 4)
        np.testing.assert_allclose(by[gguf_name].reshape(want.shape), want, rtol=0, atol=1e-6, err_msg=module)


def test_gptq_beats_round_to_nearest(gptq_qwen2, tmp_path, monkeypatch):
    from qwqq.eval.harness import evaluate

    monkeypatch.setenv("QWQQ_CACHE", str(tmp_path / "cache"))
    src = tiny_model_dir("qwen2")

    def rtn(lin, w):
        r = rtn_quantize(torch.from_numpy(w), bits=4, group_size=128)
        return pack(r.q, r.scales, r.zeros, r.g_idx, 4)

    rtn_dir = write_gptq(src, tmp_path / "rtn", rtn, bits=4, group_size=128).path
    kw = dict(ctx=128, max_tokens=1024, progress=False)
    k_gptq = evaluate(gptq_qwen2.path, src, **kw).summary.kld_mean
    k_rtn = evaluate(rtn_dir, src, **kw).summary.kld_mean
    assert 0 < k_gptq < k_rtn


def test_moe_gptq_reports_starved_experts(tmp_path):
    run = quantize_to_gptq(tiny_model_dir("qwen3_moe"), out=tmp_path / "moe", progress=False, **CALIB)
    assert run.rtn_fallbacks and all(".experts." in r for r in run.rtn_fallbacks)
    names = _packed_from_folder(run.path, "model.layers.1.mlp.experts.7.down_proj")
    assert names["qweight"].shape == (256 * 4 // 32, 256)

"""Bad input around the hybrid Qwen families: one line each, nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from tests import fixtures
from tests.conftest import one_line_error, run_qwqq
from tests.fixtures_hybrid import tiny_hybrid_dir


def _copy_meta(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        if not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy2(f, dst / f.name)


def test_a_qwen3_5_folder_with_only_its_vision_tower(tmp_path):
    src = tiny_hybrid_dir("qwen3_5")
    bad = tmp_path / "vision-only"
    _copy_meta(src, bad)
    tensors = {k: v for k, v in load_file(src / "model.safetensors").items() if k.startswith("model.visual.")}
    assert tensors
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    r = run_qwqq("quantize", bad, "--bits", "4", "-o", tmp_path / "out.gguf", "-q")
    one_line_error(r, "holds no text-model weights", "vision tower")
    assert not list(tmp_path.glob("out.gguf*"))


def test_no_mtp_on_a_model_without_mtp(tmp_path):
    for src in (tiny_hybrid_dir("qwen3_5", mtp=False), fixtures.tiny_model_dir("qwen3")):
        r = run_qwqq("quantize", src, "--bits", "4", "--no-mtp", "-o", tmp_path / "out.gguf", "-q")
        one_line_error(r, "has no multi-token-prediction (MTP) layers", "drop --no-mtp")
        assert not list(tmp_path.glob("out.gguf*"))


def test_no_mtp_is_for_gguf(tmp_path):
    for fmt in ("mlx", "gptq"):
        r = run_qwqq("quantize", tiny_hybrid_dir("qwen3_5"), "--format", fmt, "--no-mtp", "-o", tmp_path / "out", "-q")
        one_line_error(r, "--no-mtp is for GGUF outputs")


def test_a_config_that_contradicts_its_linear_attention_sizes(tmp_path):
    src = tiny_hybrid_dir("qwen3_next")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    config = json.loads((bad / "config.json").read_text())
    config["linear_num_value_heads"] = 3  # not a multiple of the 2 key heads
    (bad / "config.json").write_text(json.dumps(config))
    r = run_qwqq("quantize", bad, "--bits", "4", "-o", tmp_path / "out.gguf", "-q")
    one_line_error(r, "linear_num_value_heads 3 is not a multiple of linear_num_key_heads 2")
    config["linear_num_value_heads"] = 8  # a multiple, but not what the tensors hold
    (bad / "config.json").write_text(json.dumps(config))
    r = run_qwqq("quantize", bad, "--bits", "4", "-o", tmp_path / "out.gguf", "-q")
    one_line_error(r, "but config.json implies")


def test_qwen3_5s_tokenizer_is_llama_cpps_qwen35_pre_tokenizer(tmp_path):
    """Qwen3.5+ keep combining marks with letters ([\\p{L}\\p{M}]+, llama-vocab.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN35
    regex); the tokenizer.ggml.pre qwqq writes for it is "qwen35", and "qwen2" for the Qwen2/3 regex."""
    from qwqq.gguf.prepared import prepare

    src = tiny_hybrid_dir("qwen3_5")
    assert prepare(src).vocab.pre == "qwen2"
    patched = tmp_path / "qwen35-tokenizer"
    shutil.copytree(src, patched)
    tj = json.loads((patched / "tokenizer.json").read_text())
    split = next(s for s in tj["pre_tokenizer"]["pretokenizers"] if s["type"] == "Split")
    split["pattern"]["Regex"] = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?[\\p{L}\\p{M}]+|\\p{N}| ?[^\\s\\p{L}"
                                 "\\p{M}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
    (patched / "tokenizer.json").write_text(json.dumps(tj))
    assert prepare(patched).vocab.pre == "qwen35"


def test_refused_families_are_data_found_by_class_model_type_or_gguf_architecture():
    from qwqq.archs import refusal

    why = refusal({"architectures": ["Qwen4ExpForConditionalGeneration"], "model_type": "qwen4_exp"})
    assert why.startswith("architecture Qwen4ExpForConditionalGeneration (Qwen3.8-Flash-Next) is not supported: ")
    assert "(Qwen3.8-Flash-Next)" in refusal({"model_type": "x", "text_config": {"model_type": "qwen4_exp_text"}})
    assert refusal(gguf_arch="qwen4exp").startswith("GGUF architecture qwen4exp (Qwen3.8-Flash-Next) is not supported")
    assert "(DeepSeek-V3.2)" in refusal({"architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32"})
    assert "(DeepSeek-V4)" in refusal({"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4"})
    assert refusal(json.loads((tiny_hybrid_dir("qwen3_5") / "config.json").read_text())) is None
    assert refusal(gguf_arch="qwen35") is None and refusal(gguf_arch="qwen3next") is None


def _qwen4exp(tmp_path):
    """A Qwen3.8-Flash-Next-looking folder (the tiny Qwen3.5's config renamed, one small tensor) and a GGUF whose
    general.architecture is qwen4exp, with the keys fit reads."""
    import gguf
    import numpy as np
    import torch

    folder = tmp_path / "flash-next"
    _copy_meta(tiny_hybrid_dir("qwen3_5"), folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["Qwen4ExpForConditionalGeneration"], model_type="qwen4_exp")
    config["text_config"]["model_type"] = "qwen4_exp_text"
    (folder / "config.json").write_text(json.dumps(config))
    save_file({"model.language_model.norm.weight": torch.ones(256)}, folder / "model.safetensors",
              metadata={"format": "pt"})
    path = tmp_path / "flash-next.gguf"
    w = gguf.GGUFWriter(str(path), "qwen4exp")
    w.add_block_count(2), w.add_context_length(4096), w.add_embedding_length(64), w.add_head_count(4)
    w.add_tensor("token_embd.weight", np.zeros((16, 64), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return folder, path


@pytest.mark.slow
def test_qwen4exp_is_refused_in_one_line_by_every_command(tmp_path):
    """Qwen3.8-Flash-Next (Qwen4ExpForConditionalGeneration; llama.cpp's qwen4exp, which its llama.cpp may load):
    quantize, imatrix, fit, run and eval each refuse it in one line naming the architecture, and write nothing."""
    folder, path = _qwen4exp(tmp_path)
    cache = tmp_path / "cache"
    commands = [("quantize", folder, "--bits", "4", "-o", tmp_path / "out.gguf", "-q"),
                ("imatrix", folder, "-o", tmp_path / "out.imatrix"),
                ("fit", folder, "--vram", "24"), ("fit", path, "--vram", "24"),
                ("run", path, "-p", "hi"), ("run", path, "-p", "hi", "--ctx", "256", "--kv", "f16", "-ngl", "0"),
                ("run", folder, "-p", "hi", "--backend", "transformers"),
                ("eval", path, "--ref", folder), ("eval", folder, "--ref", folder)]
    for args in commands:
        r = run_qwqq(*args, env={"QWQQ_CACHE": str(cache)})
        named = "GGUF architecture qwen4exp" if path in args[:2] else "architecture Qwen4ExpForConditionalGeneration"
        one_line_error(r, f"{named} (Qwen3.8-Flash-Next) is not supported")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flash-next", "flash-next.gguf"]  # no output, no cache

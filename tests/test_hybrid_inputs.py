"""Bad input around the hybrid Qwen families: one line each, nothing written."""

from __future__ import annotations

import json
import shutil

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

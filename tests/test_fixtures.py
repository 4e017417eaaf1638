"""The model fixtures build, and transformers and tokenizers read them back."""

import json

import numpy as np
import pytest

from tests import fixtures

ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "llama": "LlamaForCausalLM",
}


def _safetensors_header(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


@pytest.mark.parametrize("arch", fixtures.TINY_ARCHS)
def test_tiny_model(arch):
    path = fixtures.tiny_model_dir(arch)
    assert fixtures.tiny_model_dir(arch) == path  # cached

    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURES[arch]]
    assert config["vocab_size"] == fixtures.TINY_VOCAB_SIZE == 4096
    assert config["tie_word_embeddings"] is (arch == "qwen3")
    assert (path / "generation_config.json").exists()

    logits = fixtures.reference_logits(path, [39, 301, 385, 11])
    assert logits.shape == (4, 4096) and logits.dtype == np.float32
    assert np.isfinite(logits).all() and logits.std() > 0.1

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    text = "Hello, world! 你好"
    ids = tok.encode(text).ids  # the Qwen tokenizer's first 4000 tokens: "Hello" and "你好" in pieces
    assert ids == [39, 301, 385, 11, 1879, 0, 220, 160, 121, 254, 161, 98, 121]
    assert max(ids) < fixtures.TINY_BPE_TOKENS
    assert tok.decode(ids) == text
    assert tok.get_vocab_size() == 4022 <= config["vocab_size"]
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [4000, 4001, 4002]

    tok_config = json.loads((path / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"].startswith("{%- if tools %}")
    assert "<|im_start|>" in tok_config["chat_template"]


def test_tiny_qwen2_has_biases():
    header = _safetensors_header(fixtures.tiny_model_dir("qwen2") / "model.safetensors")
    for proj in "qkv":
        assert f"model.layers.0.self_attn.{proj}_proj.bias" in header


def test_tiny_moe_is_per_expert_on_disk():
    header = _safetensors_header(fixtures.tiny_model_dir("qwen3_moe") / "model.safetensors")
    assert not any(name.endswith(("gate_up_proj", "experts.down_proj")) for name in header)
    for e in range(8):
        prefix = f"model.layers.1.mlp.experts.{e}"
        assert header[f"{prefix}.gate_proj.weight"]["shape"] == [256, 256]
        assert header[f"{prefix}.up_proj.weight"]["shape"] == [256, 256]
        assert header[f"{prefix}.down_proj.weight"]["shape"] == [256, 256]
    assert header["model.layers.1.mlp.gate.weight"]["shape"] == [8, 256]


def test_tiny_sharded():
    path = fixtures.tiny_model_dir("qwen3_moe", "float16", shards=3)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in path.glob("*.safetensors"))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted(set(index["weight_map"].values())) == files
    assert all(v["dtype"] == "F16" for f in files for v in _safetensors_header(path / f).values())
    # Same seed, same weights whatever the sharding: logits match the single-file float16 model.
    ids = [4001, 872, 198, 2023]
    single = fixtures.reference_logits(fixtures.tiny_model_dir("qwen3_moe", "float16"), ids)
    np.testing.assert_array_equal(fixtures.reference_logits(path, ids), single)


def test_build_is_atomic(tmp_path):
    dest = tmp_path / "fixture"

    def failing(tmp):
        (tmp / "half").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fixtures._build(dest, failing)
    assert list(tmp_path.iterdir()) == [tmp_path / ".fixture.lock"]

    calls = []
    build = lambda tmp: calls.append((tmp / "done").write_text("ok"))
    assert fixtures._build(dest, build) == dest == fixtures._build(dest, build)
    assert (dest / "done").read_text() == "ok" and len(calls) == 1

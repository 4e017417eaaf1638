"""qwqq's BF16 GGUF against llama.cpp's own converter (convert_hf_to_gguf.py) on the same checkpoint.

Every metadata key the converter writes for these architectures (hyper-parameters, rope, MoE
keys, the whole tokenizer: tokens, types, merges, pre-tokenizer, special ids, add_bos, chat
template) must be in ours with the same value, and every tensor must have the same name, shape,
type and bytes (BF16 is lossless from a bf16 source): this checks the name mapping, the Llama q/k
permutation and the expert stacking against the reference, not against ourselves.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from qwqq.gguf.reader import LazyArray, read_gguf
from qwqq.gguf.quantize import quantize_to_gguf, resolve_mixture
from tests import fixtures
from tests.reference import tensor_table

pytestmark = pytest.mark.slow  # every test runs llama.cpp's convert_hf_to_gguf.py (8-18 s each)

# Descriptive keys the converter derives from folder names and READMEs; not model facts.
DESCRIPTIVE = {"general.name", "general.basename", "general.size_label", "general.finetune", "general.version",
               "general.type", "general.quantized_by", "general.organization"}


def _values(path: Path) -> dict:
    g = read_gguf(path)
    return {k: (g.array(k) if isinstance(v, LazyArray) else v) for k, v in g.metadata.items()}


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6)
    return a == b


@pytest.fixture(scope="module")
def pair(tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("convert")
    theirs = fixtures.convert_hf_to_gguf(tiny_dir, d / "convert-bf16.gguf")
    ours = quantize_to_gguf(tiny_dir, resolve_mixture(type_name="BF16"), out=d / "qwqq-bf16.gguf", progress=False,
                            threads=2).path
    return ours, theirs


def test_metadata_matches_the_converter(pair):
    ours, theirs = (_values(p) for p in pair)
    missing = [k for k in theirs if k not in DESCRIPTIVE and k not in ours]
    assert not missing, f"keys llama.cpp's converter writes that qwqq does not: {missing}"
    differ = [k for k in theirs if k not in DESCRIPTIVE and not _same(ours[k], theirs[k])]
    assert not differ, {k: (str(ours[k])[:80], str(theirs[k])[:80]) for k in differ}


def test_tensors_match_the_converter(pair):
    ours, theirs = (tensor_table(p) for p in pair)
    assert ours == theirs


def test_yarn_rope_scaling_is_carried(tmp_path):
    """QwQ-32B style YaRN (factor 4 over 32k) in config.json reaches the GGUF as the converter writes it."""
    import json
    import shutil

    src = tmp_path / "yarn-qwen2"
    shutil.copytree(fixtures.tiny_model_dir("qwen2"), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg.update(rope_theta=1e6, max_position_embeddings=131072,
               rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
    (src / "config.json").write_text(json.dumps(cfg))
    ours = _values(quantize_to_gguf(src, resolve_mixture(type_name="Q8_0"), out=tmp_path / "o.gguf", progress=False,
                                    threads=2).path)
    assert ours["qwen2.rope.scaling.type"] == "yarn"
    assert ours["qwen2.rope.scaling.factor"] == 4.0
    assert ours["qwen2.rope.scaling.original_context_length"] == 32768
    assert ours["qwen2.context_length"] == 131072
    theirs = _values(fixtures.convert_hf_to_gguf(src, tmp_path / "c.gguf"))
    for k in ("qwen2.rope.scaling.type", "qwen2.rope.scaling.factor", "qwen2.rope.scaling.original_context_length",
              "qwen2.rope.freq_base"):
        assert _same(ours[k], theirs[k]), k


@pytest.mark.parametrize("arch,dtype,shards,mixture", [("qwen3_moe", "float16", 3, "F16"), ("qwen2", "float32", 2, "F32")])
def test_fp16_and_fp32_sharded_sources(arch, dtype, shards, mixture, tmp_path):
    """Sharded checkpoints (an index json) in fp16 and fp32, written losslessly by both tools."""
    src = fixtures.tiny_model_dir(arch, dtype, shards)
    assert (src / "model.safetensors.index.json").is_file()
    ours = quantize_to_gguf(src, resolve_mixture(type_name=mixture), out=tmp_path / "o.gguf", progress=False,
                            threads=2).path
    theirs = fixtures.convert_hf_to_gguf(src, tmp_path / "c.gguf", outtype=mixture.lower())
    assert tensor_table(ours) == tensor_table(theirs)

"""Our plan and kernels against llama.cpp's own quantizer, tensor for tensor.

For each mixture: qwqq quantizes the safetensors checkpoint in one pass; llama.cpp's
llama_model_quantize quantizes a BF16 GGUF of the same weights. Every tensor must get the same
type, the same byte count and (same kernels, same input floats) the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qwqq.gguf.quantize import GGUF_TYPES, plan_checkpoint, quantize_to_gguf, resolve_mixture
from qwqq.source import open_checkpoint
from tests.reference import llamacpp_quantize, tensor_table

MIXTURES = ["F16", "BF16", "Q8_0", "Q6_K", "Q5_K_S", "Q5_K_M", "Q4_K_S", "Q4_K_M", "Q4_0", "Q3_K_S", "Q3_K_M",
            "Q3_K_L", "Q2_K", "IQ4_XS", "IQ4_NL"]


@pytest.fixture(scope="module")
def smollm2_bf16_gguf(smollm2_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "smollm2-BF16.gguf"
    quantize_to_gguf(smollm2_dir, resolve_mixture(type_name="BF16"), out=out, progress=False, threads=2)
    return out


def _compare(ours: Path, theirs: Path) -> None:
    a, b = tensor_table(ours), tensor_table(theirs)
    assert set(a) == set(b)
    for name in sorted(a):
        assert a[name][:3] == b[name][:3], f"{name}: qwqq {a[name][:3]} vs llama.cpp {b[name][:3]}"
        assert a[name][3] == b[name][3], f"{name}: same type but different bytes"
    sa, sb = ours.stat().st_size, theirs.stat().st_size
    assert abs(sa - sb) / sb < 0.001, (sa, sb)


@pytest.mark.slow
@pytest.mark.parametrize("mixture", MIXTURES)
def test_smollm2_matches_llama_quantize(mixture, smollm2_dir, smollm2_bf16_gguf, tmp_path):
    ours = quantize_to_gguf(smollm2_dir, resolve_mixture(type_name=mixture), out=tmp_path / "ours.gguf",
                            progress=False, threads=2)
    theirs = tmp_path / "llamacpp.gguf"
    llamacpp_quantize(smollm2_bf16_gguf, theirs, mixture)
    _compare(ours.path, theirs)
    # the plan predicts the file's tensor bytes exactly
    assert ours.plan.tensor_bytes == sum(v[2] for v in tensor_table(ours.path, with_hash=False).values())


@pytest.fixture(scope="module")
def tiny_bf16(tiny_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-bf16") / "bf16.gguf"
    quantize_to_gguf(tiny_dir, resolve_mixture(type_name="BF16"), out=out, progress=False, threads=2)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mixture", ["Q4_K_M", "Q3_K_M", "Q2_K", "IQ4_XS"])
def test_tiny_archs_match_llama_quantize(mixture, tiny_dir, tiny_bf16, tmp_path):
    """Qwen2 (biases), Qwen3 (q/k norms, head_dim 128), Qwen3-MoE (8 experts: the n_expert == 8 rules), Llama."""
    bf16 = tiny_bf16
    ours = quantize_to_gguf(tiny_dir, resolve_mixture(type_name=mixture), out=tmp_path / "ours.gguf",
                            progress=False, threads=2)
    theirs = tmp_path / "llamacpp.gguf"
    llamacpp_quantize(bf16, theirs, mixture)
    _compare(ours.path, theirs)


def test_every_offered_type_has_a_plan(tiny_dir):
    ckpt = open_checkpoint(tiny_dir)
    for name in GGUF_TYPES:
        _, _, plan = plan_checkpoint(ckpt, name)
        assert plan.tensor_bytes > 0

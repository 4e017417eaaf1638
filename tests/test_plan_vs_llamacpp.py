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
from tests import fixtures
from tests.reference import llama_quantize_plan, llamacpp_quantize, tensor_table

MIXTURES = ["F16", "BF16", "Q8_0", "Q6_K", "Q5_K_S", "Q5_K_M", "Q4_K_S", "Q4_K_M", "Q4_0", "Q3_K_S", "Q3_K_M",
            "Q3_K_L", "Q2_K", "IQ4_XS", "IQ4_NL"]
# SmolLM2 (rows of 576: the 256-block fall-backs) byte for byte in every mixture but IQ4_NL, whose 32-blocks
# never fall back: its bytes are held on a tiny Qwen3 below, at a third of the cost.
SMOLLM2_MIXTURES = [m for m in MIXTURES if m not in ("IQ4_NL", "Q5_K_S", "Q4_K_S", "Q3_K_S", "Q3_K_L")]
# The _S / _L variants use the kernels of their _M siblings with other per-tensor types: their plans are held
# against llama-quantize's --dry-run below (test_smollm2_plans_as_llama_quantize), every mixture.
TINY_ARCHS = ["qwen2", "qwen3", "qwen3_moe", "llama"]
# Tiny models byte for byte: the K-quant mixtures on every arch; the IQ4 kernels on Qwen3 (tied) and
# Qwen3-MoE (the 8-expert rules). Every arch's plan in every mixture is held against llama-quantize's
# --dry-run in test_tiny_archs_plan_as_llama_quantize (same kernels, same types: same bytes).
TINY_PAIRS = [(a, m) for a in TINY_ARCHS for m in ("Q4_K_M", "Q3_K_M", "Q2_K")] + [
    ("qwen3", "IQ4_XS"), ("qwen3_moe", "IQ4_XS"), ("qwen3", "IQ4_NL")]


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
@pytest.mark.parametrize("mixture", SMOLLM2_MIXTURES)
def test_smollm2_matches_llama_quantize(mixture, smollm2_dir, smollm2_bf16_gguf, tmp_path):
    ours = quantize_to_gguf(smollm2_dir, resolve_mixture(type_name=mixture), out=tmp_path / "ours.gguf",
                            progress=False, threads=2)
    theirs = tmp_path / "llamacpp.gguf"
    llamacpp_quantize(smollm2_bf16_gguf, theirs, mixture)
    _compare(ours.path, theirs)
    # the plan predicts the file's tensor bytes exactly
    assert ours.plan.tensor_bytes == sum(v[2] for v in tensor_table(ours.path, with_hash=False).values())


@pytest.mark.slow
def test_smollm2_plans_as_llama_quantize(smollm2_dir, smollm2_bf16_gguf):
    """Every mixture's plan on a real model with rows of 576 (the fall-backs), type for type."""
    ckpt = open_checkpoint(smollm2_dir)
    tools = fixtures.llama_cpp_tools()
    for mixture in MIXTURES:
        ours = {t.name: t.type.name for t in plan_checkpoint(ckpt, mixture)[2].tensors}
        theirs = llama_quantize_plan(tools, smollm2_bf16_gguf, mixture)
        assert theirs and ours == theirs, (mixture, {n: (ours.get(n), theirs.get(n)) for n in set(ours) | set(theirs)
                                                     if ours.get(n) != theirs.get(n)})


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory):
    """arch -> (checkpoint folder, a BF16 GGUF of it): the floats llama-quantize starts from."""
    made = {}

    def get(arch: str) -> tuple[Path, Path]:
        if arch not in made:
            src = fixtures.tiny_model_dir(arch)
            out = tmp_path_factory.mktemp(f"tiny-{arch}-bf16") / "bf16.gguf"
            quantize_to_gguf(src, resolve_mixture(type_name="BF16"), out=out, progress=False, threads=2)
            made[arch] = (src, out)
        return made[arch]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("arch, mixture", TINY_PAIRS, ids=[f"{a}-{m}" for a, m in TINY_PAIRS])
def test_tiny_archs_match_llama_quantize(arch, mixture, tiny_bf16, tmp_path):
    """Qwen2 (biases), Qwen3 (q/k norms, head_dim 128), Qwen3-MoE (8 experts: the n_expert == 8 rules), Llama."""
    src, bf16 = tiny_bf16(arch)
    ours = quantize_to_gguf(src, resolve_mixture(type_name=mixture), out=tmp_path / "ours.gguf",
                            progress=False, threads=2)
    theirs = tmp_path / "llamacpp.gguf"
    llamacpp_quantize(bf16, theirs, mixture)
    _compare(ours.path, theirs)


@pytest.mark.slow
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_archs_plan_as_llama_quantize(arch, tiny_bf16):
    """Every mixture's plan, tensor for tensor, is the type llama-quantize's own rules give (its --dry-run)."""
    src, bf16 = tiny_bf16(arch)
    ckpt = open_checkpoint(src)
    tools = fixtures.llama_cpp_tools()
    for mixture in MIXTURES:
        ours = {t.name: t.type.name for t in plan_checkpoint(ckpt, mixture)[2].tensors}
        theirs = llama_quantize_plan(tools, bf16, mixture)
        assert theirs and ours == theirs, f"{arch} {mixture}: " + ", ".join(
            f"{n} qwqq {ours.get(n)} llama.cpp {theirs.get(n)}" for n in sorted(set(ours) | set(theirs))
            if ours.get(n) != theirs.get(n))


def test_every_offered_type_has_a_plan(tiny_dir):
    ckpt = open_checkpoint(tiny_dir)
    for name in GGUF_TYPES:
        _, _, plan = plan_checkpoint(ckpt, name)
        assert plan.tensor_bytes > 0

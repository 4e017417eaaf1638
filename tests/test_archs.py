"""The architecture registry: each family module answers to the names transformers gives it, is found by
its class name, and refuses what it should, in one line."""

from __future__ import annotations

import pytest

from qwqq.archs import ARCHS, FAMILIES, KNOWN, arch_of, find_arch, sampling_table
from qwqq.errors import UnsupportedError


@pytest.mark.parametrize("module", FAMILIES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_each_family_answers_to_transformers_own_names(module):
    import transformers

    arch = module.ARCH
    cls = getattr(transformers, arch.hf_class)  # the class exists in the transformers qwqq pins
    assert cls.config_class.model_type in arch.model_types
    assert find_arch({"architectures": [arch.hf_class]}) is arch
    assert module.__name__.rsplit(".", 1)[-1] in arch.model_types  # the module is named after its model_type


def test_quantize_takes_the_quantizable_families_and_fit_knows_them_all():
    assert set(ARCHS) == {a.hf_class for a in KNOWN.values() if a.quantizable}
    for name, a in KNOWN.items():  # a family's other classes (a text-only form) find it too
        assert name in (a.hf_class, *a.also_classes) and find_arch({"architectures": [name]}) is a
    for a in KNOWN.values():  # a fit-only family (none today) is refused by quantize in one line
        if not a.quantizable:
            with pytest.raises(UnsupportedError, match=f"architecture {a.hf_class} is not supported"):
                arch_of({"architectures": [a.hf_class]})
    # DeepSeek: GGUF, MLX and importance matrices; GPTQ refused in one line
    deepseek = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"}
    assert arch_of(deepseek, job="calibrate").hf_class == "DeepseekV3ForCausalLM"
    with pytest.raises(UnsupportedError, match="DeepseekV3ForCausalLM: qwqq makes a GGUF, an MLX folder and an "
                                               "importance matrix .* of it so far, not a GPTQ checkpoint"):
        arch_of(deepseek, job="gptq")


def test_sampling_patterns_in_family_order():
    assert [s.label for s in sampling_table()] == [s.label for m in FAMILIES for s in m.ARCH.sampling]


def test_found_by_model_type_also_when_nested_and_contradictions_are_one_line():
    from qwqq.archs import BY_MODEL_TYPE
    from qwqq.errors import SourceError

    qwen3 = BY_MODEL_TYPE["qwen3"]
    assert find_arch({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}) is qwen3
    # a multimodal release keeps the language tower's hyperparameters (and model_type) under text_config
    assert find_arch({"architectures": ["Qwen3ForCausalLM"], "model_type": "x", "text_config": {"model_type": "qwen3"}}) is qwen3
    with pytest.raises(SourceError, match="architecture Qwen2ForCausalLM is not a qwen3 class"):
        find_arch({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen3"})
    with pytest.raises(UnsupportedError, match="architecture GPT2LMHeadModel is not supported"):
        find_arch({"architectures": ["GPT2LMHeadModel"], "model_type": "qwen3"})

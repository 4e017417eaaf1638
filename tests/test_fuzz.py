"""Bounded fuzzing of the three readers a hostile file reaches first (see tests/fuzzing.py).

Only the reader's own error type may escape: SourceError from safetensors headers, GGUFError from GGUF
headers, QwqqError from config.json through planning and the writer's metadata. ~200 examples each,
no deadline, no example database; the long runs are `python -m bench.fuzz_readers`.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings

from tests import fuzzing

FUZZ = settings(max_examples=200, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


@pytest.fixture(scope="module")
def scratch():
    d = fuzzing.scratch_dir()
    yield d
    import shutil

    shutil.rmtree(d, ignore_errors=True)


def test_safetensors_header_fuzz(scratch):
    seen = Counter()
    path = scratch / "fuzz.safetensors"

    @FUZZ
    @given(fuzzing.safetensors_inputs())
    def run(data):
        seen[fuzzing.check_safetensors(data, path)] += 1

    run()
    assert seen["refused"] > 0


def test_gguf_header_fuzz(scratch):
    seed = fuzzing.gguf_seed(scratch / "seed.gguf")
    assert fuzzing.check_gguf(seed, scratch / "check.gguf") == "ok"
    seen = Counter()
    path = scratch / "fuzz.gguf"

    @FUZZ
    @given(fuzzing.gguf_inputs(seed))
    def run(data):
        seen[fuzzing.check_gguf(data, path)] += 1

    run()
    assert seen["refused"] > 0


def test_config_fuzz(scratch):
    seeds = fuzzing.config_seeds(scratch / "models")
    for i, s in enumerate(seeds):  # the unmutated seeds plan and write fine
        assert fuzzing.check_config((i, s.config), seeds) == "ok"
    seen = Counter()

    @FUZZ
    @given(fuzzing.config_inputs(seeds))
    def run(item):
        seen[fuzzing.check_config(item, seeds)] += 1

    run()
    assert seen["refused"] > 0 and seen["ok"] > 0, seen


# Inputs the fuzzers (or the corpus) found that used to escape as something other than QwqqError, kept as
# regressions: (seed, config change, "ok" or "refused").
FOUND = [
    ("qwen2", {"num_experts": float("nan")}, "ok"),  # int(nan) on a dense model's unused expert count: ValueError
    ("qwen2", {"num_experts": float("inf")}, "ok"),  # OverflowError
    ("qwen2", {"num_experts": []}, "ok"),  # TypeError
    ("qwen3_moe", {"num_experts": 2**32 - 1}, "refused"),  # list(range(n_experts)): tens of GB, the OOM killer
    ("qwen2", {"architectures": [{"name": "Qwen2ForCausalLM"}]}, "refused"),  # unhashable architecture: TypeError
    ("qwen2", {"num_hidden_layers": "two"}, "refused"),  # int("two"): ValueError
    ("qwen2", {"vocab_size": "x"}, "refused"),  # int("x"): ValueError
    ("qwen2", {"num_attention_heads": 0}, "refused"),  # hidden // 0: ZeroDivisionError
    ("qwen2", {"rope_scaling": ["yarn"]}, "refused"),  # dict(["yarn"]): ValueError
    ("qwen2", {"max_position_embeddings": 2**40}, "refused"),  # u32 overflow in the writer: struct.error
    ("qwen2", {"rms_norm_eps": 1e39}, "refused"),  # f32 overflow in the writer: OverflowError
    ("qwen3_moe", {"decoder_sparse_step": "x"}, "refused"),  # int("x") on the dense-layers check: ValueError
    ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": [4], "original_max_position_embeddings": 4096}},
     "refused"),  # float([4]) in the writer: TypeError
]


def test_config_fuzz_findings_are_refused(scratch):
    archs = ("qwen2", "qwen3_moe", "llama")
    seeds = fuzzing.config_seeds(scratch / "found", archs)
    for arch, change, expected in FOUND:
        i = archs.index(arch)
        config = {**seeds[i].config, **change}
        assert fuzzing.check_config((i, config), seeds) == expected, (arch, change)

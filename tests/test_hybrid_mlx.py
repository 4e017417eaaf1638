"""MLX folders of the hybrid Qwen families (Qwen3.5, Qwen3.5-MoE, Qwen3-Next): what mlx_lm.convert writes.

mlx_lm.convert is the reference, called through its Python API on the same tiny release-layout fixture
(tests/fixtures_hybrid.py: vision tower, MTP block, Qwen3.5-MoE's fused experts) with the same bits, group
size and recipe. Every array must match bitwise (names, dtypes, shapes, bytes), and so must config.json
and the index; mlx-lm loads qwqq's folder with `mlx_lm.load`, computes the logits its own folder gives
and generates. fit's MLX rows predict the bytes written. Each folder is converted once per module
(mlx on a Linux CPU is slow; the machine is shared).
"""

from __future__ import annotations

import json

import pytest

from qwqq.fit import mlx as mlx_fit
from qwqq.fit import subject as models
from qwqq.mlx.writer import plan_mlx
from qwqq.source import open_checkpoint
from tests.fixtures import TINY_VOCAB_SIZE
from tests.conftest import one_line_error, run_qwqq
from tests.fixtures_hybrid import HYBRID_ARCHS, tiny_hybrid_dir
from tests.reference import assert_same_mlx_folder, safetensors_data_bytes

TOKENS = [4001, 872, 198, 39, 301, 385]  # "<|im_start|>user\nHello" in the tiny models' tokenizer
CASES = [(arch, 4, 64, None) for arch in HYBRID_ARCHS] + [("qwen3_5_moe", 3, 64, "3_6")]
IDS = [f"{a}-{b}bit-g{g}" + (f"-mixed_{r}" if r else "") for a, b, g, r in CASES]


# ---------------------------------------------------------------- without mlx: the plan
@pytest.mark.parametrize("arch", HYBRID_ARCHS)
def test_config_only_plan_equals_writer_plan(arch):
    """fit's plan for a model known by its config (GGUF shapes mapped back to mlx-lm's names, MTP blocks
    dropped, Qwen3-Next's attn_qkv + attn_gate as one in_proj_qkvz) = the writer's plan of the folder."""
    root = tiny_hybrid_dir(arch)
    m = models.from_config(json.loads((root / "config.json").read_text()), arch, "hub", f"x/{arch}")
    for bits, recipe in ((4, None), (8, None), (3, "3_6")):
        predicted = mlx_fit.mlx_plan(m, bits, 64, recipe)
        written = plan_mlx(open_checkpoint(root), bits, 64, recipe)[2]
        assert sorted(predicted.arrays()) == sorted(written.arrays())
        assert predicted.quantization == written.quantization
        assert (predicted.tensor_bytes, predicted.n_params) == (written.tensor_bytes, written.n_params)


def test_plan_keeps_what_mlx_lm_keeps():
    """The rules the arrays test holds end to end, readable on their own: no vision or MTP tensor, norms and
    conv1d unquantized (conv1d as [C, K, 1]), A_log float32 (Qwen3.5's cast_predicate), the router and the
    shared expert's gate pinned at 8 bits / 64 with experts, not in the dense Qwen3.5."""
    dense = plan_mlx(open_checkpoint(tiny_hybrid_dir("qwen3_5")), 4, 64)[2].by_name()
    assert all(n.startswith("language_model.") and "mtp" not in n and "visual" not in n for n in dense)
    conv = dense["language_model.model.layers.0.linear_attn.conv1d.weight"]
    assert conv.shape == (256, 4, 1) and not conv.quantized
    assert dense["language_model.model.layers.0.linear_attn.A_log"].dtype == "F32"
    assert not any(t.config_entry for t in dense.values())
    moe = plan_mlx(open_checkpoint(tiny_hybrid_dir("qwen3_next")), 4, 64)[2]
    pinned = {t.module.split(".", 3)[-1] for t in moe.tensors if t.config_entry}
    assert pinned == {"mlp.gate", "mlp.shared_expert_gate"}
    assert all(t.bits == 8 and t.group_size == 64 for t in moe.tensors if t.config_entry)


def test_text_only_form_is_refused_in_one_line(tmp_path):
    """mlx-lm has no qwen3_5_text model: mlx_lm.convert cannot make one, nor does qwqq."""
    r = run_qwqq("quantize", tiny_hybrid_dir("qwen3_5", vision=False), "--format", "mlx", "-o", tmp_path / "o", "-q")
    one_line_error(r, "mlx-lm has no model for model_type qwen3_5_text")
    assert not (tmp_path / "o").exists()


def test_catalog_hybrids_get_mlx_rows_with_a_recurrent_state():
    from qwqq.fit import candidate as C
    from qwqq.fit import search as F

    for name in ("Qwen3.5-9B", "Qwen3.5-35B-A3B", "Qwen3-Next-80B-A3B"):
        m = models.resolve(name)
        assert mlx_fit.makes_mlx(m)
        rows = [c for c in F.fit_model(m, F.machine(unified=128), C.Request()) if c.format == "mlx"]
        assert {c.build.type_name for c in rows} == {"MLX-4bit", "MLX-8bit", "MLX-mixed_3_6"}
        d = m.dims  # KV on the full-attention layers only, a fixed state on the others
        assert mlx_fit.kv_cache_bytes(m, 4096) == d.kv_layers * (d.n_embd_k + d.n_embd_v) * 4096 * 2 + \
            (d.n_layer - d.kv_layers) * (2 * d.n_embd_r + 4 * d.n_embd_s)


# ---------------------------------------------------------------- with mlx: against mlx_lm.convert
@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(qwqq's folder, mlx_lm.convert's folder, qwqq's result) per case, made once."""
    pytest.importorskip("mlx.core", reason='needs mlx: pip install "qwqq[mlx]"')
    pytest.importorskip("mlx_lm", reason='needs mlx-lm: pip install "qwqq[mlx]"')
    from mlx_lm import convert

    from qwqq.mlx.quantize import quantize_to_mlx

    root, done = tmp_path_factory.mktemp("hybrid-mlx"), {}

    def get(case):
        if case not in done:
            arch, bits, group_size, recipe = case
            name = "-".join(map(str, case))
            src = tiny_hybrid_dir(arch)
            result = quantize_to_mlx(src, bits=bits, group_size=group_size, mixed=recipe, out=root / f"ours-{name}",
                                     progress=False)
            convert(str(src), mlx_path=str(root / f"ref-{name}"), quantize=True, q_bits=bits,
                    q_group_size=group_size, quant_predicate=f"mixed_{recipe}" if recipe else None)
            done[case] = (result.path, root / f"ref-{name}", result)
        return done[case]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_identical_to_mlx_lm_convert(case, converted):
    ours, ref, result = converted(case)
    assert_same_mlx_folder(ours, ref)
    assert safetensors_data_bytes(ours) == result.plan.tensor_bytes
    left = " ".join(result.notes)
    assert "MTP weights" in left and ("vision tower" in left) == (case[0] != "qwen3_next")


@pytest.mark.slow
@pytest.mark.parametrize("arch", HYBRID_ARCHS)
def test_mlx_lm_loads_it_computes_the_same_logits_and_generates(arch, converted):
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate
    from mlx_lm.utils import load_model

    ours, ref, _ = converted((arch, 4, 64, None))
    model, tokenizer = load(str(ours))
    reference, _ = load_model(ref)
    x = mx.array([TOKENS])
    got, want = model(x), reference(x)
    mx.eval(got, want)
    assert got.shape == (1, len(TOKENS), TINY_VOCAB_SIZE)
    assert mx.array_equal(got, want).item()  # the same arrays: the same logits, not merely close ones
    text = generate(model, tokenizer, prompt=TOKENS, max_tokens=3)
    assert isinstance(text, str) and text


@pytest.mark.slow
@pytest.mark.parametrize("arch", HYBRID_ARCHS)
def test_fit_predicts_the_written_bytes(arch, converted):
    """`qwqq fit <folder> --unified 16 --json` offers MLX rows; the 4-bit one's weights are the folder's."""
    ours, _, _ = converted((arch, 4, 64, None))
    r = run_qwqq("fit", tiny_hybrid_dir(arch), "--unified", "16", "--json")
    assert r.returncode == 0, r.stderr
    rows = {d["type"]: d for d in json.loads(r.stdout) if d["format"] == "mlx"}
    assert set(rows) == {"MLX-4bit", "MLX-8bit", "MLX-mixed_3_6"}
    assert rows["MLX-4bit"]["weights_bytes"] == safetensors_data_bytes(ours)
    assert rows["MLX-4bit"]["commands"]["quantize"].endswith("--format mlx --bits 4")

"""MLX folders of DeepSeek-V3 / R1 from the FP8 release (and DeepSeek's bfloat16 cast): what mlx_lm.convert writes.

mlx_lm.convert (mlx-lm 0.32.2, through its Python API) is the reference, on tests/fixtures_deepseek.py's tiny
release-layout checkpoint: two shards, FP8 blocks with partial edges, the MTP layer at index 4 of 4 layers.
mlx-lm's sanitize drops the MTP layer by the literal `model.layers.61` (every release has 61 layers), so on
the fixture's layer 4 convert fails ("Received 44 parameters not in model", pinned below); the reference is
convert's folder of the same fixture built without its MTP layer (the main model is the same), which is what
the literal does to every release. qwqq drops the layer at index num_hidden_layers (archs/deepseek_mlx.py).

Every array must match bitwise (names, dtypes, shapes, bytes), as must config.json, the index and the order
convert fills its shards in; qwqq's folders of the FP8 and bfloat16 forms are the same bytes (mlx-lm's FP8
dequantization is float32(q x scale) rounded to bfloat16, which is the bfloat16 cast); mlx_lm.load reads
qwqq's folder, gives convert's logits and generates. fit's MLX rows predict the written plan.
"""

from __future__ import annotations

import json

import pytest

from qwqq.fit import mlx as mlx_fit
from qwqq.fit import subject as models
from qwqq.mlx.writer import plan_mlx
from qwqq.source import open_checkpoint
from tests.fixtures import TINY_VOCAB_SIZE
from tests.conftest import run_qwqq
from tests.fixtures_deepseek import DEEPSEEK_DTYPES, tiny_deepseek_dir
from tests.reference import assert_same_mlx_folder, safetensors_data_bytes

TOKENS = [4001, 872, 198, 39, 301, 385]  # "<|im_start|>user\nHello" in the tiny models' tokenizer
CASES = [("fp8", 4, 64), ("bfloat16", 4, 64), ("fp8", 4, 32)]  # group 32: embed_q (nope 32) quantized too
IDS = [f"{d}-{b}bit-g{g}" for d, b, g in CASES]


# ---------------------------------------------------------------- without mlx: the plan
@pytest.mark.parametrize("dtype", DEEPSEEK_DTYPES)
def test_config_only_plan_equals_writer_plan(dtype):
    """fit's plan for a model known by its config (the GGUF shapes mapped back: attn_k_b / attn_v_b as
    embed_q / unembed_out, exp_probs_b as the hub's e_score_correction_bias) = the writer's plan of the folder."""
    root = tiny_deepseek_dir(dtype)
    m = models.from_config(json.loads((root / "config.json").read_text()), "deepseek", "hub", "x/deepseek")
    for bits, group, recipe in ((4, 64, None), (8, 64, None), (3, 64, "3_6"), (4, 32, None)):
        predicted = mlx_fit.mlx_plan(m, bits, group, recipe)
        written = plan_mlx(open_checkpoint(root), bits, group, recipe)[2]
        assert sorted(predicted.arrays()) == sorted(written.arrays())
        assert predicted.quantization == written.quantization
        assert (predicted.tensor_bytes, predicted.n_params) == (written.tensor_bytes, written.n_params)


def test_plan_keeps_what_mlx_lm_keeps():
    """The rules the arrays test holds end to end, readable on their own: the FP8 and bfloat16 forms plan the
    same folder (bfloat16 throughout); no MTP layer, no kv_b_proj but its per-head split; the router
    unquantized and nothing pinned (mlx-lm's deepseek_v3 has no quant_predicate); the correction bias float32
    under the hub's name; experts stacked."""
    fp8, bf16 = (plan_mlx(open_checkpoint(tiny_deepseek_dir(d)), 4, 64)[2] for d in DEEPSEEK_DTYPES)
    assert fp8.arrays() == bf16.arrays()
    t = fp8.by_name()
    assert not any(n.startswith("model.layers.4.") or "kv_b_proj" in n or ".experts." in n for n in t)
    p = "model.layers.1."
    assert t[p + "self_attn.embed_q.weight"].shape == (4, 64, 32)  # [heads, kv_lora, nope]: 32 % 64, kept
    assert not t[p + "self_attn.embed_q.weight"].quantized
    assert (t[p + "self_attn.unembed_out.weight"].shape, t[p + "self_attn.unembed_out.weight"].bits) == ((4, 32, 64), 4)
    assert not t[p + "mlp.gate.weight"].quantized and t[p + "mlp.gate.weight"].dtype == "BF16"
    assert t[p + "mlp.gate.e_score_correction_bias"].dtype == "F32"
    assert t[p + "mlp.switch_mlp.down_proj.weight"].shape == (8, 256, 128)
    assert {x.dtype for x in t.values()} == {"BF16", "F32"} and not any(x.config_entry for x in t.values())
    assert set(fp8.quantization) == {"group_size", "bits", "mode"}


def test_fp8_mlx_lm_does_not_dequantize_is_refused():
    """Blocks other than sanitize's literal 128 x 128 (ue8m0 32 x 32: mlx-lm keeps those packed as mxfp8), and
    FP8 in a family whose mlx-lm model does not dequantize it: one UnsupportedError each, before any writing."""
    import dataclasses

    from qwqq.archs import arch_of
    from qwqq.errors import UnsupportedError
    from qwqq.mlx.rules import mlx_rules
    from qwqq.mlx.writer import mlx_sources
    from tests.fixtures import tiny_model_dir

    config = json.loads((tiny_deepseek_dir("fp8") / "config.json").read_text())
    rules = mlx_rules(arch_of(config, job="mlx"))
    rules.check(config, None)
    q = dict(config["quantization_config"], weight_block_size=[32, 32], scale_fmt="ue8m0")
    with pytest.raises(UnsupportedError, match=r"weight_block_size \[32, 32\]: mlx-lm's deepseek_v3"):
        rules.check(dict(config, quantization_config=q), None)
    ckpt = open_checkpoint(tiny_model_dir("qwen3"))
    name = "model.layers.0.self_attn.o_proj.weight"
    ref = ckpt.tensors[name]
    ckpt.tensors[name] = dataclasses.replace(ref, scale=ref, block=(128, 128))
    with pytest.raises(UnsupportedError, match=f"tensor {name} is block-scaled FP8, which mlx-lm's model for "
                                               "Qwen3ForCausalLM does not read"):
        mlx_sources(ckpt, arch_of(ckpt.config, job="mlx"))


def test_catalog_deepseek_gets_mlx_rows_with_the_latent_cache():
    """DeepSeek-R1 known by its config: MLX rows, and mlx-lm's cache is the latent + rope part per token and
    layer (kv_lora_rank 512 + 64), not the GGUF's K + V widths."""
    from qwqq.fit import candidate as C
    from qwqq.fit import search as F

    m = models.resolve("DeepSeek-R1")
    assert mlx_fit.makes_mlx(m)
    rows = [c for c in F.fit_model(m, F.machine(unified=512), C.Request()) if c.format == "mlx"]
    assert {c.build.type_name for c in rows} == {"MLX-4bit", "MLX-8bit", "MLX-mixed_3_6"}
    assert mlx_fit.kv_cache_bytes(m, 4096) == 61 * (512 + 64) * 4096 * 2
    plan = mlx_fit.mlx_plan(m, 4, 64)
    assert plan.n_params == 671_026_419_200  # no MTP layer
    names = plan.by_name()
    assert names["model.layers.3.self_attn.embed_q.weight"].bits == 4  # nope 128: quantized in the release
    assert names["model.layers.3.mlp.gate.e_score_correction_bias"].dtype == "F32"


# ---------------------------------------------------------------- with mlx: against mlx_lm.convert
@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(qwqq's folder of the fixture, convert's folder of the fixture without its MTP layer, qwqq's result)."""
    pytest.importorskip("mlx.core", reason='needs mlx: pip install "qwqq[mlx]"')
    pytest.importorskip("mlx_lm", reason='needs mlx-lm: pip install "qwqq[mlx]"')
    from mlx_lm import convert

    from qwqq.mlx.quantize import quantize_to_mlx

    root, done = tmp_path_factory.mktemp("deepseek-mlx"), {}

    def get(case):
        if case not in done:
            dtype, bits, group = case
            name = "-".join(map(str, case))
            result = quantize_to_mlx(tiny_deepseek_dir(dtype), bits=bits, group_size=group, out=root / f"ours-{name}",
                                     progress=False)
            convert(str(tiny_deepseek_dir(dtype, mtp=False)), mlx_path=str(root / f"ref-{name}"), quantize=True,
                    q_bits=bits, q_group_size=group)
            done[case] = (result.path, root / f"ref-{name}", result)
        return done[case]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_identical_to_mlx_lm_convert(case, converted):
    ours, ref, result = converted(case)
    assert_same_mlx_folder(ours, ref)
    assert safetensors_data_bytes(ours) == result.plan.tensor_bytes
    assert result.notes == ["the MTP layer (44 tensors) is left out, as mlx_lm.convert leaves it: "
                            "this folder is the language model"]


@pytest.mark.slow
def test_fp8_and_bfloat16_forms_give_the_same_bytes(converted):
    """mlx-lm's sanitize rounds float32(q x scale) to bfloat16, as DeepSeek's fp8_cast_bf16.py does."""
    fp8, bf16 = converted(CASES[0])[0], converted(CASES[1])[0]
    assert (fp8 / "model.safetensors").read_bytes() == (bf16 / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_shards_fill_in_mlx_lm_module_order(converted):
    """The arrays in the order of convert's save_model (its model's parameter tree), so a many-shard folder
    (R1) splits its 5 GiB shards where convert's does."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model

    _, ref, result = converted(CASES[2])
    model, _ = load_model(ref, lazy=True)
    assert [k for k, _ in tree_flatten(model.parameters())] == [name for name, _, _ in result.plan.arrays()]


@pytest.mark.slow
def test_mlx_lm_convert_fails_on_the_mtp_layer_of_a_small_model(tmp_path):
    """Why the reference is the fixture without its MTP layer: sanitize drops `model.layers.61` only."""
    pytest.importorskip("mlx_lm")
    from mlx_lm import convert

    with pytest.raises(ValueError, match="44 parameters not in model"):
        convert(str(tiny_deepseek_dir("fp8")), mlx_path=str(tmp_path / "o"), quantize=True)


@pytest.mark.slow
def test_mlx_lm_loads_it_computes_the_same_logits_and_generates(converted):
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate
    from mlx_lm.utils import load_model

    ours, ref, _ = converted(CASES[2])
    model, tokenizer = load(str(ours))
    reference, _ = load_model(ref)
    x = mx.array([TOKENS])
    got, want = model(x), reference(x)
    mx.eval(got, want)
    assert got.shape == (1, len(TOKENS), TINY_VOCAB_SIZE)
    assert mx.array_equal(got, want).item()
    text = generate(model, tokenizer, prompt=TOKENS, max_tokens=3)
    assert isinstance(text, str) and text


@pytest.mark.slow
def test_fit_predicts_the_written_bytes(converted):
    ours, _, _ = converted(CASES[0])
    r = run_qwqq("fit", tiny_deepseek_dir("fp8"), "--unified", "16", "--json")
    assert r.returncode == 0, r.stderr
    rows = {d["type"]: d for d in json.loads(r.stdout) if d["format"] == "mlx"}
    assert set(rows) == {"MLX-4bit", "MLX-8bit", "MLX-mixed_3_6"}
    assert rows["MLX-4bit"]["weights_bytes"] == safetensors_data_bytes(ours)

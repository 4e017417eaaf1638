"""qwqq fit on a Mac: MLX builds sized from the plan `qwqq quantize --format mlx` executes."""

from __future__ import annotations

import json

import pytest

from qwqq.fit import candidate as C
from qwqq.fit import search as F
from qwqq.fit import mlx as mlx_fit
from qwqq.fit import subject as models
from qwqq.mlx.writer import plan_mlx
from qwqq.source import open_checkpoint
from tests import fixtures
from tests.conftest import run_qwqq

ARCHS = ("qwen2", "qwen3", "qwen3_moe", "llama")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("bits,recipe", [(4, None), (8, None), (3, "3_6")])
def test_config_only_plan_equals_writer_plan(arch, bits, recipe):
    """From config.json alone (GGUF shapes mapped back to mlx-lm names) = the writer's own plan."""
    root = fixtures.tiny_model_dir(arch)
    config = json.loads((root / "config.json").read_text())
    m = models.from_config(config, arch, "hub", f"x/{arch}")
    predicted = mlx_fit.mlx_plan(m, bits, 64, recipe)
    written = plan_mlx(open_checkpoint(root), bits, 64, recipe)[2]
    assert predicted.tensor_bytes == written.tensor_bytes
    assert sorted(predicted.arrays()) == sorted(written.arrays())
    assert predicted.quantization == written.quantization


@pytest.mark.parametrize("arch", ["qwen2", "qwen3_moe"])
def test_predicted_bytes_equal_written_folder(arch, tmp_path):
    """The weights fit predicts = the safetensors data quantize_to_mlx writes (file sizes less headers)."""
    pytest.importorskip("mlx.core", reason='needs mlx: pip install "qwqq[mlx]"')
    from qwqq.mlx.quantize import quantize_to_mlx

    root = fixtures.tiny_model_dir(arch)
    cand = next(c for c in F.fit_model(models.resolve(str(root)), F.machine(unified=36), C.Request())
                if c.build.type_name == "MLX-4bit")
    out = quantize_to_mlx(root, bits=4, out=tmp_path / "m", progress=False)
    data = 0
    for f in out.path.glob("*.safetensors"):
        raw = f.read_bytes()
        data += len(raw) - 8 - int.from_bytes(raw[:8], "little")
    assert cand.build.tensor_bytes == data == out.plan.tensor_bytes


def test_kv_cache_and_memory():
    m = models.resolve("qwen3-8b")  # 36 layers, 8 KV heads x 128
    assert mlx_fit.kv_cache_bytes(m, 4096) == 36 * 8 * 128 * 4096 * 2 * 2
    assert mlx_fit.kv_cache_bytes(m, 4000) == mlx_fit.kv_cache_bytes(m, 4096)  # mlx-lm grows in 256-token steps
    c = next(c for c in F.fit_model(m, F.machine(unified=36), C.Request()) if c.format == "mlx")
    g = c.gpus[0]
    assert g.total == c.build.tensor_bytes + mlx_fit.kv_cache_bytes(m, c.ctx) + mlx_fit._mlx_settings()[0]
    assert c.mode == "gpu" and c.kv == "f16"


def test_mlx_only_on_a_mac():
    m = models.resolve("qwen3-8b")
    assert not any(c.format == "mlx" for c in F.fit_model(m, F.machine(vram=24, ram=64), C.Request()))
    assert not any(c.format == "mlx" for c in F.fit_model(m, F.machine(unified=36), C.Request(), ["Q4_K_M"]))
    assert not any(c.format == "mlx" for c in F.fit_model(m, F.machine(unified=36), C.Request(kv="q8_0")))
    names = {c.build.type_name for c in F.fit_model(m, F.machine(unified=36), C.Request()) if c.format == "mlx"}
    assert names == {"MLX-4bit", "MLX-8bit", "MLX-mixed_3_6"}


def test_cli_unified_shows_mlx_rows():
    root = fixtures.tiny_model_dir("qwen3_moe")
    r = run_qwqq("fit", str(root), "--unified", "36")
    assert r.returncode == 0, r.stderr
    assert "MLX-4bit" in r.stdout and "MLX-8bit" in r.stdout and "Q4_K_M" in r.stdout
    r = run_qwqq("fit", "qwen3-8b", "--unified", "36", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    mlx = [d for d in rows if d["format"] == "mlx"]
    assert {d["type"] for d in mlx} == {"MLX-4bit", "MLX-8bit", "MLX-mixed_3_6"}
    four = next(d for d in mlx if d["type"] == "MLX-4bit")
    assert four["commands"]["run"] == f"qwqq run Qwen3-8B-mlx-4bit --backend mlx --ctx {four['ctx']}"
    assert four["commands"]["quantize"] == "qwqq quantize Qwen/Qwen3-8B --format mlx --bits 4"
    assert any(d["format"] == "gguf" for d in rows)

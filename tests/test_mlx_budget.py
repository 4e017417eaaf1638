"""MLX bits per module for a budget (`--format mlx --target-bpw / --target-size`): the allocator meets the
budget and is monotone in it, and the folder it plans is what mlx_lm.convert writes when told the same
bits per module (mlx's own quantization, array for array), loadable by mlx-lm."""

from __future__ import annotations

import json

import pytest

from tests import fixtures
from tests.conftest import one_line_error, run_qwqq

mx = pytest.importorskip("mlx.core", reason='needs mlx: pip install "qwqq[mlx]"')
pytest.importorskip("mlx_lm", reason='needs mlx-lm: pip install "qwqq[mlx]"')

from qwqq.budget.mlx import allocatable, plan_mlx_budget  # noqa: E402
from qwqq.mlx.quantize import quantize_to_mlx  # noqa: E402
from qwqq.mlx.plan import MLX_BITS, MLXTensorPlan  # noqa: E402
from tests.reference import assert_same_arrays, mlx_arrays  # noqa: E402
from tests.test_mlx import hub_clone, logits  # noqa: E402


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QWQQ_CACHE", str(tmp_path / "cache"))


def test_budget_is_met_and_loss_is_monotone():
    src = fixtures.tiny_model_dir("qwen2")
    losses, last = [], None
    for bpw in (2.6, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0):
        mb = plan_mlx_budget(src, target_bpw=bpw)
        assert mb.bits_per_weight <= bpw
        # full to within the cheapest step still open (one module one width up)
        steps = [MLXTensorPlan(t.name, t.shape, t.dtype, b, 64).nbytes - t.nbytes
                 for t in allocatable(mb.plan) for b in MLX_BITS if b > t.bits]
        room = bpw * mb.plan.n_params / 8 - mb.plan.tensor_bytes
        assert not steps or room < min(steps)
        assert set(mb.overrides) == {t.module for t in allocatable(mb.plan)}
        losses.append(mb.allocation.loss)
        last = mb
    assert all(b <= a + 1e-12 for a, b in zip(losses, losses[1:])), losses
    assert len({b for b, _ in last.overrides.values()}) >= 1
    mid = plan_mlx_budget(src, target_bpw=3.5)
    assert len({b for b, _ in mid.overrides.values()}) >= 2  # a real mixture
    with pytest.raises(Exception, match="--target-bpw"):
        plan_mlx_budget(src, target_bpw=1.0)


def test_target_size_counts_the_whole_safetensors_files(tmp_path):
    src = fixtures.tiny_model_dir("qwen3")  # tied: the quantized embedding is also the output layer
    four = quantize_to_mlx(src, bits=4, out=tmp_path / "four", progress=False)
    target = sum(f.stat().st_size for f in four.path.glob("*.safetensors")) * 9 // 10
    mb = plan_mlx_budget(src, target_bytes=target)
    out = quantize_to_mlx(src, out=tmp_path / "b", overrides=mb.overrides, progress=False)
    written = sum(f.stat().st_size for f in out.path.glob("*.safetensors"))
    assert written == mb.predicted_bytes <= target


@pytest.mark.slow
def test_the_folder_is_what_mlx_lm_convert_writes_for_the_same_bits(tmp_path):
    """mlx_lm.convert with a quant_predicate giving each module the allocator's bits is the reference:
    every array bitwise, config.json, and the logits."""
    from mlx_lm import convert

    src = hub_clone(fixtures.tiny_model_dir("qwen3_moe"), tmp_path / "src")
    mb = plan_mlx_budget(src, target_bpw=3.25)
    assert len({b for b, _ in mb.overrides.values()}) >= 2
    ours = quantize_to_mlx(src, out=tmp_path / "ours", overrides=mb.overrides, progress=False).path

    def predicate(path, module):
        if path in mb.overrides:
            bits, group = mb.overrides[path]
            return {"group_size": group, "bits": bits, "mode": "affine"}
        if path.endswith("mlp.gate"):  # what mlx-lm's qwen3_moe predicate (replaced by this one) does
            return {"group_size": 64, "bits": 8}
        return True

    ref = tmp_path / "ref"
    convert(str(src), mlx_path=str(ref), quantize=True, q_bits=4, q_group_size=64, quant_predicate=predicate)
    assert_same_arrays(mlx_arrays(ours), mlx_arrays(ref))
    assert json.loads((ours / "config.json").read_text()) == json.loads((ref / "config.json").read_text())
    assert mx.array_equal(logits(ours), logits(ref)).item()


@pytest.mark.slow
def test_cli_target_bpw_and_bad_options(tmp_path):
    src = fixtures.tiny_model_dir("qwen2")
    env = {"QWQQ_CACHE": str(tmp_path / "cache")}
    r = run_qwqq("quantize", src, "--format", "mlx", "--target-bpw", "3.5", "-o", tmp_path / "m", "-q", env=env)
    assert r.returncode == 0, r.stderr
    import re

    bpw = float(re.search(r"([\d.]+) bits/weight", r.stdout).group(1))
    assert 3.0 < bpw <= 3.5, r.stdout
    q = json.loads((tmp_path / "m" / "config.json").read_text())["quantization"]
    assert len({v["bits"] for k, v in q.items() if isinstance(v, dict)}) >= 2
    r = run_qwqq("run", tmp_path / "m", "--backend", "mlx", "-p", "hi", "-n", "4", "--greedy", env=env)
    assert r.returncode == 0, r.stderr
    for args, needle in [(["--target-bpw", "1"], "--target-bpw"), (["--target-bpw", "4", "--bits", "4"], "drop --bits"),
                         (["--fit", "rtx-4090"], "--fit"), (["--target-size", "1MB"], "smallest")]:
        one_line_error(run_qwqq("quantize", src, "--format", "mlx", *args, "-o", tmp_path / "x", env=env), needle)
        assert not (tmp_path / "x").exists()
    one_line_error(run_qwqq("quantize", src, "--format", "gptq", "--target-bpw", "4", "-o", tmp_path / "x", env=env),
                   "--bits")

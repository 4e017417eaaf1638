"""Budget quantization: the allocator meets budgets, is monotone, and the file quantize writes is the
size the plan predicts, at most the target."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from qwqq.errors import QwqqError
from qwqq.budget.allocate import _hull, allocate, parse_size
from qwqq.budget.gguf import plan_for_budget
from qwqq.gguf.types import tensor_bytes
from qwqq.budget.sensitivity import LADDER, Sensitivity
from qwqq.source import open_checkpoint
from tests.conftest import one_line_error, run_qwqq
from tests.fixtures import tiny_model_dir


def _synthetic(n=40, seed=0):
    g = np.random.default_rng(seed)
    shapes, errors = {}, {}
    for i in range(n):
        shape = (int(g.choice([256, 512, 1024])), 256 * int(g.integers(1, 4)))
        base = float(g.uniform(0.5, 5))
        shapes[f"t{i}"] = shape
        # error falls roughly 4x per extra bit, with noise (some steps not convex)
        errors[f"t{i}"] = {t.name: base * 0.25 ** k * float(g.uniform(0.7, 1.3)) for k, t in enumerate(LADDER)}
    return Sensitivity(errors, False), shapes


def test_hull_drops_dominated_and_concave_points():
    pts = [(10, 5.0, T.Q2_K), (20, 6.0, T.Q3_K), (30, 1.0, T.Q4_K), (40, 0.9, T.Q5_K), (50, 0.1, T.Q6_K)]
    kept = [p[2] for p in _hull(pts)]
    assert kept == [T.Q2_K, T.Q4_K, T.Q6_K]  # Q3_K dominated; Q5_K above the Q4_K-Q6_K segment


def test_budget_is_met_and_loss_is_monotone():
    sens, shapes = _synthetic()
    lo = sum(tensor_bytes(T.Q2_K, s) for s in shapes.values())
    hi = sum(tensor_bytes(T.Q8_0, s) for s in shapes.values())
    losses = []
    for budget in np.linspace(lo, hi, 60).astype(int):
        a = allocate(sens, shapes, int(budget))
        assert a.tensor_bytes <= budget
        assert a.tensor_bytes == sum(tensor_bytes(t, shapes[n]) for n, t in a.types.items())
        cheapest_step = min((tensor_bytes(b, shapes[n]) - tensor_bytes(a.types[n], shapes[n])
                             for n in shapes for b in LADDER
                             if tensor_bytes(b, shapes[n]) > tensor_bytes(a.types[n], shapes[n])), default=0)
        assert budget - a.tensor_bytes < max(cheapest_step, 1) or a.tensor_bytes == hi
        losses.append(a.loss)
    assert all(b <= a + 1e-12 for a, b in zip(losses, losses[1:])), "more budget gave a higher predicted loss"
    assert allocate(sens, shapes, hi).types == {n: T.Q8_0 for n in shapes}


def test_too_small_a_budget_is_one_clear_error():
    sens, shapes = _synthetic(5)
    with pytest.raises(QwqqError, match="smallest"):
        allocate(sens, shapes, 1000)


def test_parse_size():
    assert parse_size("19.5GB") == 19_500_000_000 and parse_size("20GiB") == 20 * 2**30
    assert parse_size("800M") == 800_000_000 and parse_size("1234") == 1234
    for bad in ("abc", "-3GB", "0"):
        with pytest.raises(QwqqError):
            parse_size(bad)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3_moe", "qwen3_5_moe", "qwen3_next"])
@pytest.mark.slow
def test_the_written_file_is_the_predicted_size_and_within_the_target(arch, tmp_path, monkeypatch):
    """Also the hybrids' tensor kinds (Gated DeltaNet projections, ssm_out, shared experts, the MTP block)."""
    from qwqq.gguf.quantize import quantize_to_gguf, resolve_mixture
    from tests.fixtures_hybrid import HYBRID_ARCHS, tiny_hybrid_dir

    monkeypatch.setenv("QWQQ_CACHE", str(tmp_path / "cache"))
    src = tiny_hybrid_dir(arch) if arch in HYBRID_ARCHS else tiny_model_dir(arch)
    q3 = quantize_to_gguf(src, resolve_mixture(type_name="Q3_K_M"), out=tmp_path / "q3.gguf", progress=False)
    q5 = quantize_to_gguf(src, resolve_mixture(type_name="Q5_K_M"), out=tmp_path / "q5.gguf", progress=False)
    target = (q3.file_bytes + q5.file_bytes) // 2
    bp = plan_for_budget(open_checkpoint(src), target_bytes=target)
    out = quantize_to_gguf(src, resolve_mixture(type_name="Q4_K_M"), out=tmp_path / "b.gguf", progress=False,
                           overrides=bp.overrides)
    assert out.file_bytes == bp.predicted_file_bytes <= target
    from qwqq.budget.sensitivity import ladder_for

    ups = [tensor_bytes(u, t.shape) - t.nbytes for t in out.plan.tensors if t.name in bp.overrides
           for u in ladder_for(t.shape[-1]) if tensor_bytes(u, t.shape) > t.nbytes]
    assert target - out.file_bytes < min(ups) + 32 * len(bp.overrides) + 4096  # full, to one step's granularity
    assert len({t.type for t in out.plan.tensors if t.quantized}) >= 2  # a real mixture, not one type


def test_cli_target_size_and_bad_sizes(tmp_path):
    src = tiny_model_dir("qwen2")
    env = {"QWQQ_CACHE": str(tmp_path / "cache")}
    r = run_qwqq("quantize", src, "--target-size", "100MB", "-o", tmp_path / "t.gguf", "-q", env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "t.gguf").stat().st_size <= 100_000_000
    for args, needle in [(["--target-size", "lots"], "--target-size"), (["--target-size", "1MB"], "smallest"),
                         (["--target-size", "90MB", "--type", "Q4_K_M"], "drop --bits"),
                         (["--target-bpw", "40"], "--target-bpw"),
                         (["--target-size", "90MB", "--target-bpw", "4"], "one of")]:
        one_line_error(run_qwqq("quantize", src, *args, "-o", tmp_path / "x.gguf", env=env), needle)
        assert not (tmp_path / "x.gguf").exists()


def test_more_budget_never_predicts_more_loss_on_a_real_checkpoint(tmp_path, monkeypatch):
    """Monotone on measured sensitivities (tiny qwen3_moe: experts, router, tied-free output), not only synthetic."""
    monkeypatch.setenv("QWQQ_CACHE", str(tmp_path / "cache"))
    ckpt = open_checkpoint(tiny_model_dir("qwen3_moe"))
    plans = [plan_for_budget(ckpt, target_bpw=b) for b in (3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0, 8.5)]
    losses = [p.allocation.loss for p in plans]
    sizes = [p.predicted_file_bytes for p in plans]
    assert all(b <= a + 1e-12 for a, b in zip(losses, losses[1:])), losses
    assert all(b >= a for a, b in zip(sizes, sizes[1:])), sizes
    assert losses[0] > 10 * losses[-1]


@pytest.mark.slow
def test_cli_target_bpw_gguf(tmp_path, monkeypatch):
    from qwqq.gguf.reader import read_gguf
    from qwqq.gguf.quantize import plan_checkpoint

    src = tiny_model_dir("qwen2")
    r = run_qwqq("quantize", src, "--target-bpw", "4.5", "-o", tmp_path / "b.gguf", "-q",
                 env={"QWQQ_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    assert "4.5 bits per weight" in r.stderr
    g = read_gguf(tmp_path / "b.gguf")
    n_params = plan_checkpoint(open_checkpoint(src), "Q4_K_M")[2].n_params
    assert 8 * sum(t.nbytes for t in g.tensors) / n_params <= 4.5
    # the written file is the plan's (whose fill test_the_written_file_is_... holds to one step)
    monkeypatch.setenv("QWQQ_CACHE", str(tmp_path / "cache"))
    assert (tmp_path / "b.gguf").stat().st_size == plan_for_budget(open_checkpoint(src), target_bpw=4.5).predicted_file_bytes
    assert len({t.type for t in g.tensors if t.type.name not in ("F32", "F16", "BF16")}) >= 2


@pytest.mark.slow
def test_fit_profile_leaves_the_kv_cache_room_and_the_file_fits(tmp_path):
    """--fit PROFILE --ctx N: the weights' room is what fit leaves after that context's KV cache, and
    `qwqq fit` then places the written file wholly on that GPU at that context."""
    import json

    from qwqq.budget.gguf import fit_weights_room

    src = tiny_model_dir("qwen2")
    ckpt = open_checkpoint(src)
    cfg = ckpt.config
    kv_per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * (
        cfg["hidden_size"] // cfg["num_attention_heads"]) * 2
    short, long = (fit_weights_room(ckpt, "rtx-4060", ctx, "f16") for ctx in (4096, 65536))
    assert short - long >= kv_per_token * (65536 - 4096)
    env = {"QWQQ_CACHE": str(tmp_path / "cache")}
    r = run_qwqq("quantize", src, "--fit", "rtx-4060", "--ctx", "65536", "-o", tmp_path / "f.gguf", "-q", env=env)
    assert r.returncode == 0, r.stderr
    assert "GiB of GPU memory for weights" in r.stderr
    r = run_qwqq("fit", tmp_path / "f.gguf", "--profile", "rtx-4060", "--ctx", "65536", "--kv", "f16", "--json",
                 env=env)
    assert r.returncode == 0, r.stderr
    top = json.loads(r.stdout)[0]
    assert top["fits"] and top["mode"] == "gpu" and top["gpu_layers"] == top["n_layers"]


@pytest.mark.slow
def test_a_budgeted_calibrated_quantize_opens_and_plans_the_checkpoint_once(tmp_path, monkeypatch):
    """--fit PROFILE with --imatrix auto: the imatrix, fit's room, the budget and the write share one prepared
    source (one open, one mapping) and one plan per distinct mixture; the file is the one the budget predicted."""
    from qwqq import quantize, source
    from qwqq.gguf import plan, prepared
    from qwqq.gguf.options import Budget
    from qwqq.options import CalibOptions

    opened, planned = [], []
    real_open, real_plan = source.open_checkpoint, plan.make_plan
    monkeypatch.setattr(source, "open_checkpoint", lambda spec: opened.append(spec) or real_open(spec))
    monkeypatch.setattr(prepared, "open_checkpoint", source.open_checkpoint)
    monkeypatch.setattr(prepared, "make_plan", lambda *a, **k: planned.append(
        (k["has_imatrix"], tuple(sorted((k.get("overrides") or {}).items())))) or real_plan(*a, **k))
    notes = []
    flags = quantize.Flags(str(tiny_model_dir("qwen3_moe")), out=tmp_path / "m.gguf", imatrix="auto",
                           calib=CalibOptions(tokens=256, seqlen=128), budget=Budget(fit_profile="rtx-4060", fit_ctx=4096),
                           threads=2, progress=False)
    written = quantize.quantize(flags, notes.append)
    assert len(opened) == 1
    # each distinct plan made once: fit's Q4_K_M (no imatrix), the budget's base (imatrix), the budget's choice
    assert len(planned) == len(set(planned)) == 3
    assert written.path.is_file() and any(n.startswith("budget: ") for n in notes)

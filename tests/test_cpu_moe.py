"""MoE experts in system RAM for `qwqq run` and `qwqq serve` (llama.cpp's --n-cpu-moe / --cpu-moe, handed to
llama.cpp as tensor buffer-type overrides through ctypes), fit's choice applied when none is given, and fit's
printed run / serve lines parsed by the commands themselves."""

from __future__ import annotations

import re
import shlex

import pytest
from rich.console import Console

from qwqq.errors import QwqqError
from qwqq.fit import candidate as C
from qwqq.fit import search as F
from qwqq.run import experts, fitted
from qwqq.run.chat import RunOptions
from qwqq.run.fitted import fitted_settings
from tests.conftest import one_line_error, run_qwqq


# ---------------------------------------------------------------- llama.cpp's patterns, re-derived
def test_patterns_are_llama_cpps():
    """common/arg.cpp: one `blk\\.<i>` + LLM_FFN_EXPS_REGEX per layer i < N; --cpu-moe: the regex alone."""
    assert experts.expert_patterns(0) == []
    assert experts.expert_patterns(2) == [r"blk\.0\.ffn_(up|down|gate|gate_up)_(ch|)exps",
                                          r"blk\.1\.ffn_(up|down|gate|gate_up)_(ch|)exps"]
    assert experts.expert_patterns(experts.ALL) == [r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"]
    hit = lambda n, name: any(re.search(p, name) for p in experts.expert_patterns(n))
    assert hit(2, "blk.1.ffn_up_exps.weight") and hit(2, "blk.0.ffn_gate_up_exps.weight")
    assert hit(2, "blk.1.ffn_down_chexps.weight")
    assert not hit(2, "blk.11.ffn_up_exps.weight") and not hit(2, "blk.2.ffn_up_exps.weight")
    assert not hit(2, "blk.0.ffn_up_shexp.weight") and not hit(2, "blk.0.ffn_gate_inp.weight")
    assert not hit(2, "blk.0.attn_q.weight") and hit(experts.ALL, "blk.93.ffn_down_exps.weight")


def test_bad_n_is_one_clear_error():
    with pytest.raises(QwqqError, match="--n-cpu-moe must be 0 or more"):
        experts.requested(-1, False)
    with pytest.raises(QwqqError, match="not both"):
        experts.requested(2, True)
    assert experts.requested(None, True) == experts.ALL and experts.requested(None, False) is None
    with pytest.raises(QwqqError, match="the model has 2 layers; give 0 to 2"):
        experts.check_layers(3, 2, 6, "m.gguf")
    with pytest.raises(QwqqError, match="no MoE expert tensors"):
        experts.check_layers(1, 30, 0, "m.gguf")
    experts.check_layers(2, 2, 6, "m.gguf")
    experts.check_layers(experts.ALL, 2, 6, "m.gguf")


def test_a_dense_gguf_has_no_experts_to_move(smollm2_gguf):
    pytest.importorskip("llama_cpp")
    from qwqq.run.backends import llamacpp

    assert llamacpp.expert_patterns(smollm2_gguf, 0) == []
    with pytest.raises(QwqqError, match="no MoE expert tensors"):
        llamacpp.expert_patterns(smollm2_gguf, 1)


def test_overrides_reach_llama_cpps_model_params():
    """Llama() builds its params from llama_model_default_params(); within overridden_load they point at a
    NULL-terminated array of {pattern, CPU buffer type}, and the function is restored afterwards."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import ctypes

    from qwqq.run.backends.llamacpp_buft import TensorBuftOverride, cpu_buffer_type, overridden_load

    lib = llama_cpp.llama_cpp
    before = lib.llama_model_default_params
    with overridden_load(experts.expert_patterns(2)) as arr:
        params = lib.llama_model_default_params()
        got = ctypes.cast(params.tensor_buft_overrides, ctypes.POINTER(TensorBuftOverride))
        assert [got[i].pattern.decode() for i in range(2)] == experts.expert_patterns(2)
        assert got[0].buft == got[1].buft == cpu_buffer_type() and got[0].buft
        assert got[2].pattern is None and not got[2].buft and len(arr) == 3
    assert lib.llama_model_default_params is before and not before().tensor_buft_overrides
    with overridden_load([]) as arr:
        assert arr is None and lib.llama_model_default_params is before


# ---------------------------------------------------------------- fit's choice, applied
@pytest.fixture(scope="module")
def moe_report():
    """Qwen3-30B-A3B on an 8 GB card: all layers on the GPU, the experts of some in RAM."""
    hw = F.machine(vram=8, ram=32)
    report = F.run_fit("Qwen3-30B-A3B", hw, C.Request(ctx=32768), ["Q4_K_M"])
    best = next(c for c in report.candidates if c.fits)
    assert best.cpu_moe_layers and best.gpu_layers == best.n_layers
    return hw, report, best


def _fitted(monkeypatch, moe_report, **given) -> dict:
    hw, report, _ = moe_report
    monkeypatch.setattr(fitted.fitting, "machine", lambda profile=None: hw)
    monkeypatch.setattr(fitted.fitting, "run_fit", lambda *a, **k: report)
    return fitted_settings(RunOptions(model="Qwen3-30B-A3B-Q4_K_M.gguf", **given), "llama.cpp",
                           Console(stderr=True, force_terminal=False))


def test_run_and_serve_apply_fits_experts_in_ram(monkeypatch, moe_report):
    best = moe_report[2]
    got = _fitted(monkeypatch, moe_report)
    assert (got["ctx"], got["kv_type"], got["n_gpu_layers"], got["n_cpu_moe"]) == (
        best.ctx, best.kv, best.ngl_flag, best.cpu_moe_layers)
    assert _fitted(monkeypatch, moe_report, n_cpu_moe=3)["n_cpu_moe"] == 3  # given: kept
    assert _fitted(monkeypatch, moe_report, cpu_moe=True)["n_cpu_moe"] == experts.ALL
    # the GPU layers given: fit's expert split (chosen for its own GPU layers) does not apply
    assert _fitted(monkeypatch, moe_report, n_gpu_layers=10)["n_cpu_moe"] == 0


def test_start_up_lines_say_where_the_experts_are():
    describe = fitted.placement  # serve's start-up line

    s = {"ctx": 32768, "kv_type": "q8_0", "n_gpu_layers": 49, "n_cpu_moe": 30}
    assert describe(s, True) == "ctx 32768, q8_0 KV cache, 49 GPU layers, experts of the first 30 layers in RAM"
    assert describe({**s, "n_cpu_moe": experts.ALL}, False).endswith("CPU only, experts of every layer in RAM")
    assert "experts" not in describe({**s, "n_cpu_moe": 0}, True)
    assert fitted.experts_line(1, ["a", "b", "c"]) == ("experts of the first 1 layer in RAM "
                                                     "(llama.cpp moved 3 expert tensors)")


@pytest.mark.parametrize("command", ["run", "serve"])
def test_fits_printed_lines_round_trip(command, moe_report):
    """The options fit prints are parsed by the command's own parser, and give run the very settings fit chose
    (all given: nothing fitted again)."""
    import typer.main

    from qwqq.cli import app

    best = moe_report[2]
    line = best.commands()[command]
    args = shlex.split(line)
    assert args[:2] == ["qwqq", command]
    p = typer.main.get_command(app).commands[command].make_context(command, args[2:]).params
    assert (p["ctx"], p["kv"], p["n_gpu_layers"], p["n_cpu_moe"], p["cpu_moe"], p["flash_attn"]) == (
        best.ctx, best.kv, best.ngl_flag, best.cpu_moe_layers, False, best.flash_attn)
    opts = RunOptions(model=p["model"], ctx=p["ctx"], kv=p["kv"], n_gpu_layers=p["n_gpu_layers"],
                      n_cpu_moe=p["n_cpu_moe"], flash_attn=p["flash_attn"])
    got = fitted_settings(opts, "llama.cpp", Console(stderr=True))
    assert got == {"ctx": best.ctx, "kv_type": best.kv, "flash_attn": best.flash_attn, "n_gpu_layers": best.ngl_flag,
                   "n_cpu_moe": best.cpu_moe_layers, "tensor_split": None}


def test_negative_n_from_the_command_line(smollm2_gguf, tmp_path):
    one_line_error(run_qwqq("run", smollm2_gguf, "-p", "hi", "--n-cpu-moe", "-2", cwd=tmp_path), "--n-cpu-moe must be 0")


# ---------------------------------------------------------------- a real load
@pytest.mark.slow
def test_experts_kept_on_the_cpu_by_llama_cpp(tmp_path):
    """A tiny Qwen3-MoE GGUF (2 layers) with --n-cpu-moe 1: llama.cpp's load log names the three expert tensors
    of layer 0 (and none of layer 1) as overridden to the CPU, and text still comes out; N over the layer
    count is one error line from serve before it binds a port."""
    pytest.importorskip("llama_cpp")
    from tests.test_fit import quantized

    gguf = quantized("qwen3_moe", "Q4_K_M")  # shared with test_fit / test_fit_llamacpp in one process
    r = run_qwqq("--debug", "run", gguf, "--n-cpu-moe", "1", "-p", "Hello", "-n", "6", "--greedy", "--ctx", "256",
                 "--kv", "f16", "-ngl", "0", "-j", "2", cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    moved = re.findall(r"tensor (\S+) \(.*\) buffer type overridden to CPU", r.stderr)
    assert sorted(moved) == [f"blk.0.ffn_{p}_exps.weight" for p in ("down", "gate", "up")], r.stderr[-3000:]
    assert "experts of the first 1 layer in RAM" in r.stderr
    assert r.stdout.strip()
    # (run meets the same check in the backend's load: test_a_dense_gguf_has_no_experts_to_move)
    one_line_error(run_qwqq("serve", gguf, "--port", "0", "--n-cpu-moe", "3", "--ctx", "256", "--kv", "f16", "-ngl", "0",
                            cwd=tmp_path, timeout=120), "--n-cpu-moe 3: the model has 2 layers")

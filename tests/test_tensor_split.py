"""--tensor-split: fit's split over several GPUs reaches run and serve (their own parsers, fitted when not given)
and llama.cpp's model parameters; bad values are one line."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from rich.console import Console

from qwqq.fit import search as F
from qwqq.errors import QwqqError
from qwqq.fit import candidate as C
from qwqq.run import fitted, split
from qwqq.run.chat import RunOptions
from qwqq.run.fitted import fitted_settings
from tests.conftest import run_qwqq


@pytest.fixture(scope="module")
def two_gpus():
    hw = F.machine(gpus="2x12")
    report = F.run_fit("QwQ-32B", hw, C.Request(), ["Q4_K_M"])
    best = next(c for c in report.candidates if c.fits)
    assert len(best.gpus) == 2 and all(g.layers for g in best.gpus)
    return hw, report, best


@pytest.mark.parametrize("command", ["run", "serve"])
def test_fits_split_round_trips_through_run_and_serve(command, two_gpus, monkeypatch):
    import typer.main

    from qwqq.cli import app

    hw, report, best = two_gpus
    layers = [g.layers for g in best.gpus]
    args = shlex.split(best.commands()[command])
    p = typer.main.get_command(app).commands[command].make_context(command, args[2:]).params
    assert split.parse(p["tensor_split"]) == [float(n) for n in layers]
    opts = RunOptions(model=p["model"], ctx=p["ctx"], kv=p["kv"], n_gpu_layers=p["n_gpu_layers"],
                      tensor_split=split.parse(p["tensor_split"]))
    assert fitted_settings(opts, "llama.cpp", Console(stderr=True))["tensor_split"] == [float(n) for n in layers]
    # given nothing, run and serve fit the same split themselves
    monkeypatch.setattr(fitted.fitting, "machine", lambda profile=None: hw)
    monkeypatch.setattr(fitted.fitting, "run_fit", lambda *a, **k: report)
    got = fitted_settings(RunOptions(model=Path(p["model"])), "llama.cpp", Console(stderr=True, force_terminal=False))
    assert got["tensor_split"] == [float(n) for n in layers] and got["n_gpu_layers"] == best.ngl_flag
    assert f"split {layers[0]}/{layers[1]} over 2 GPUs" in fitted.placement(got, True)


def test_parse():
    assert split.parse("3,1") == [3.0, 1.0] and split.parse("40/24") == [40.0, 24.0] and split.parse(None) is None
    assert split.flag([40.0, 24.0]) == "40,24"
    for bad in ("", "a,b", "1,-1", "0,0", "nan,1", ",".join("1" * 17)):
        with pytest.raises(QwqqError, match="--tensor-split"):
            split.parse(bad)


def test_bad_values_and_other_backends_are_one_line(tmp_path, smollm2_gguf):
    from tests import fixtures

    r = run_qwqq("run", smollm2_gguf, "-p", "hi", "--tensor-split", "1,x", cwd=tmp_path)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "one number per GPU" in r.stderr
    r = run_qwqq("run", fixtures.tiny_model_dir("qwen3"), "--backend", "transformers", "-p", "hi", "--tensor-split",
                 "1,1", cwd=tmp_path)
    assert r.returncode != 0 and "does not apply to the transformers backend" in r.stderr and "Traceback" not in r.stderr


def test_llama_cpp_gets_the_split(smollm2_gguf):
    """The proportions land in llama.cpp's llama_model_params.tensor_split (a CPU-only build has no GPU to
    split over and ignores them, as llama.cpp's own tools do)."""
    pytest.importorskip("llama_cpp")
    from qwqq.run.backends import LoadOptions, pick_backend

    m = pick_backend("llama.cpp", smollm2_gguf).load(Path(smollm2_gguf),
                                                     LoadOptions(ctx=256, threads=1, tensor_split=[3.0, 1.0]))
    try:
        ts = m.llm.model_params.tensor_split
        assert [ts[0], ts[1]] == [3.0, 1.0]
    finally:
        m.close()

"""Kill a real quantize (SIGINT, SIGTERM, SIGKILL) part-way, resume it, and compare bytes.

The interrupted run must leave nothing under the final name; `--resume` must keep the tensors
already written (not redo them) and produce a file byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qwqq.outputs import journal_path, lock_path, temp_path
from tests.conftest import run_qwqq

pytestmark = pytest.mark.slow  # kills quantizations of SmolLM2 mid-write and resumes them

ENV = {"QWQQ_JOURNAL_EVERY_S": "0"}  # record progress after every tensor so any kill point is resumable


@pytest.fixture(scope="module")
def reference(smollm2_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "ref.gguf"
    r = run_qwqq("quantize", smollm2_dir, "--type", "Q4_K_M", "-o", out, "--threads", "2", "-q")
    assert r.returncode == 0, r.stderr
    return out


def _interruptible() -> None:
    """In the child before exec: SIGINT back to its default. A suite started in the background (`cmd &`
    in a script) inherits SIGINT ignored, and Python then never turns it into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(src: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, **ENV, "HF_HUB_OFFLINE": "1"}
    # one thread: slow enough to be caught part-way (the resumed run uses two: rows are independent,
    # so the bytes do not depend on the thread count)
    return subprocess.Popen([sys.executable, "-m", "qwqq.cli", "quantize", str(src), "--type", "Q4_K_M", "-o", str(out),
                             "--threads", "1", "-q"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_interruptible)


def _kill_when_started(p: subprocess.Popen, out: Path, sig: int, after_tensors_s: float) -> None:
    """Wait until the partial output holds some tensors, then signal."""
    partial, t0 = temp_path(out), time.monotonic()
    while not (partial.exists() and partial.stat().st_size > 8 * 2**20):
        assert p.poll() is None, p.communicate()
        assert time.monotonic() - t0 < 120
        time.sleep(0.02)
    time.sleep(after_tensors_s)
    assert p.poll() is None, "the run finished before it could be interrupted"
    p.send_signal(sig)
    p.wait(timeout=60)


@pytest.mark.parametrize("sig,delay", [(signal.SIGINT, 0.0), (signal.SIGTERM, 0.4), (signal.SIGKILL, 0.2),
                                       (signal.SIGKILL, 0.8)])
def test_kill_then_resume_is_byte_identical(sig, delay, smollm2_dir, reference, tmp_path):
    out = tmp_path / "out.gguf"
    p = _start(smollm2_dir, out)
    _kill_when_started(p, out, sig, delay)
    stderr = p.stderr.read()
    assert not out.exists(), "an interrupted run left a file under the final name"
    if sig != signal.SIGKILL:
        assert p.returncode == 130, stderr
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "--resume" in lines[0], stderr
        assert not lock_path(out).exists()
    assert temp_path(out).exists() and journal_path(out).exists()

    r = run_qwqq("quantize", smollm2_dir, "--type", "Q4_K_M", "-o", out, "--threads", "2", "-q", "--resume", env=ENV)
    assert r.returncode == 0, r.stderr
    assert "resuming: keeping the" in r.stderr, r.stderr  # work was kept, not redone
    kept = int(r.stderr.split("keeping the ")[1].split()[0])
    assert kept > 0
    assert out.read_bytes() == reference.read_bytes()
    assert not temp_path(out).exists() and not journal_path(out).exists() and not lock_path(out).exists()


def test_without_resume_a_partial_is_started_over(smollm2_dir, reference, tmp_path):
    out = tmp_path / "out.gguf"
    p = _start(smollm2_dir, out)
    _kill_when_started(p, out, signal.SIGKILL, 0.2)
    r = run_qwqq("quantize", smollm2_dir, "--type", "Q4_K_M", "-o", out, "--threads", "2", "-q", env=ENV)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == reference.read_bytes()


def test_resume_of_a_different_plan_starts_over(smollm2_dir, reference, tmp_path):
    out = tmp_path / "out.gguf"
    p = subprocess.Popen([sys.executable, "-m", "qwqq.cli", "quantize", str(smollm2_dir), "--type", "Q8_0", "-o", str(out),
                          "--threads", "2", "-q"], env={**os.environ, **ENV}, stderr=subprocess.PIPE, text=True,
                         preexec_fn=_interruptible)
    _kill_when_started(p, out, signal.SIGINT, 0.0)
    r = run_qwqq("quantize", smollm2_dir, "--type", "Q4_K_M", "-o", out, "--threads", "2", "-q", "--resume", env=ENV)
    assert r.returncode == 0, r.stderr
    assert "starting from the beginning" in r.stderr
    assert out.read_bytes() == reference.read_bytes()

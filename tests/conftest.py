"""Shared fixtures: real models built or installed once per cache (see tests/fixtures.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import fixtures

REPO = Path(__file__).resolve().parent.parent


def run_qwqq(*args, cwd=None, env=None, timeout=600, input=None) -> subprocess.CompletedProcess:
    """Run the real CLI in a child process (exit codes and stderr as a user sees them)."""
    e = dict(os.environ)
    e.pop("QWQQ_DEBUG", None)
    e.setdefault("HF_HUB_OFFLINE", "1")
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "qwqq.cli", *map(str, args)], cwd=cwd, env=e, capture_output=True,
                          text=True, timeout=timeout, input=input)


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """A user error as qwqq must report it: non-zero exit, nothing on stdout, one stderr line."""
    assert r.returncode != 0
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="session", autouse=True)
def _hermetic_cache(tmp_path_factory):
    """qwqq's own cache (eval references, auto imatrix) goes under the session's scratch, never the user's."""
    os.environ["QWQQ_CACHE"] = str(tmp_path_factory.mktemp("qwqq-cache"))


@pytest.fixture(scope="module", autouse=True)
def _module_scratch_removed(request, tmp_path_factory):
    """Disk is finite on CI: a module's scratch folders (fixtures' GGUF/GPTQ outputs, several GB over the
    suite) go when the module ends, unless one of its tests failed (then they stay for a look). Each test's
    own tmp_path goes when it passes (tmp_path_retention_policy = "failed" in pyproject.toml)."""
    import shutil

    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        for p in set(base.iterdir()) - before:
            shutil.rmtree(p, ignore_errors=True)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return fixtures.smollm2_dir()


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return fixtures.smollm2_gguf()


@pytest.fixture(scope="session", params=["qwen2", "qwen3", "qwen3_moe", "llama"])
def tiny_arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_dir(tiny_arch) -> Path:
    return fixtures.tiny_model_dir(tiny_arch)

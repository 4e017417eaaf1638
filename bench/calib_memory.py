"""Peak memory of calibration against docs/calibration.md's formula, and flat in the model's depth (issue 5).

qwqq's calibration holds one decoder block at a time, so a model twice as deep needs the same memory,
and a wider one what `qwqq.calib.engine.peak_memory` says. Shown here on real weights: each model
also as a copy cut to its first few blocks (the same width, a quarter to a third of the depth), and
every step a child process whose peak RSS is read by os.wait4 (bench/gguf_vs_llamacpp.py's Launcher):

  imatrix    `qwqq imatrix SRC --calib-tokens N`
  gptq       `qwqq quantize SRC --format gptq --bits 4 --group-size 128 --calib-tokens N` (qwqq's defaults)
  gptqmodel  GPTQModel's defaults on the same windows, when its venv exists (docs/gptq.md): for scale
  runtime    the floor: a child that imports torch, transformers and qwqq's calibration engine, nothing more

The formula column is the runtime floor plus peak_memory()'s parts.

Run from the repository root::

    .venv/bin/python -m bench.calib_memory [--models smollm2,qwen25] [--methods imatrix,gptq,gptqmodel]
        [--calib-tokens 8192] [--cut smollm2=10,qwen25=7] [--full-depth-methods qwen25=imatrix]

Results: bench/results/calib_memory.json and the section "## Peak memory, measured" of docs/calibration.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

from bench.common import (BENCH_CACHE, DOCS, GPTQMODEL_VENV, MB, MODELS, RESULTS_DIR, Launcher, machine, prog,
                          qwqq_command, replace_section)
from bench.gptq_vs_gptqmodel import COMMON, GPTQMODEL

OUT = BENCH_CACHE / "calib_memory"
RESULTS = RESULTS_DIR / "calib_memory.json"
DOC = DOCS / "calibration.md"
HEADING = "## Peak memory, measured"
RUNTIME = "import torch, transformers, qwqq.calib.engine, qwqq.gptq.quantize"


def cut_depth(src: Path, layers: int, out: Path) -> Path:
    """A copy of src with only its first `layers` decoder blocks (tensors copied as stored, config edited)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if (out / "config.json").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    keep = {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                parts = name.split(".")
                if len(parts) > 2 and parts[1] == "layers" and int(parts[2]) >= layers:
                    continue
                keep[name] = st.get_tensor(name)
    save_file(keep, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = layers
    if isinstance(cfg.get("layer_types"), list):
        cfg["layer_types"] = cfg["layer_types"][:layers]
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json" and f.is_file():
            (tmp / f.name).write_bytes(f.read_bytes())
    os.replace(tmp, out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=prog(__spec__))
    ap.add_argument("--models", default="smollm2,qwen25")
    ap.add_argument("--methods", default="imatrix,gptq,gptqmodel")
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--cut", default="smollm2=10,qwen25=7", help="model=layers: the shallow copy of each model")
    ap.add_argument("--venv", type=Path, default=GPTQMODEL_VENV)
    ap.add_argument("--full-depth-methods", default="",
                    help="model=m1+m2: only these passes on that model's full depth (its GPTQ run is long: "
                         "bench.gptq_vs_gptqmodel measures it)")
    args = ap.parse_args(argv)
    import tests.fixtures as fx
    from qwqq.calib import engine as calibrate
    from qwqq.calib import text as calib_text
    from qwqq.source import open_checkpoint

    OUT.mkdir(parents=True, exist_ok=True)
    cuts = dict(kv.split("=") for kv in args.cut.split(",") if kv)
    methods = args.methods.split(",")
    gpy = args.venv / "bin" / "python"
    if "gptqmodel" in methods and not gpy.exists():
        print(f"no GPTQModel venv at {args.venv}: gptqmodel skipped", file=sys.stderr)
        methods.remove("gptqmodel")
    launch = Launcher()
    rows = []
    try:
        floor = launch.measure([sys.executable, "-c", RUNTIME], OUT / "runtime.log")["peak_rss"]
        print(f"runtime floor {floor / MB:.0f} MB", flush=True)
        for key in args.models.split(","):
            name, fixture = MODELS[key]
            full = getattr(fx, fixture)()
            n_full = json.loads((full / "config.json").read_text())["num_hidden_layers"]
            for layers, src in ((int(cuts[key]), cut_depth(full, int(cuts[key]), OUT / f"{key}-{cuts[key]}layers")),
                                (n_full, full)):
                ckpt = open_checkpoint(src)
                toks = calib_text.tokenize(ckpt, calib_text.default_text(), args.calib_tokens, 512)
                win = OUT / f"{key}-windows.json"
                win.write_text(json.dumps(toks.tolist()))
                full_only = dict(kv.split("=") for kv in args.full_depth_methods.split(",") if kv)
                for method in methods:
                    if layers == n_full and key in full_only and method not in full_only[key].split("+"):
                        continue
                    out = OUT / f"{key}-{layers}-{method}"
                    if method == "imatrix":
                        cmd, env = [*qwqq_command(), "imatrix", str(src), "-o", str(out) + ".gguf", "-f", "-q",
                                    "--calib-tokens", str(args.calib_tokens)], None
                    elif method == "gptq":
                        cmd, env = [*qwqq_command(), "quantize", str(src), "--format", "gptq", "--bits", "4",
                                    "--group-size", "128", "--calib-tokens", str(args.calib_tokens), "-o", str(out),
                                    "-f", "-q"], None
                    else:
                        import shutil

                        shutil.rmtree(out, ignore_errors=True)
                        cmd = [str(gpy), "-c", GPTQMODEL, str(src), str(out), str(win), json.dumps(COMMON), "auto"]
                        env = {**os.environ, "GPTQMODEL_CPU_WORKERS": str(len(os.sched_getaffinity(0))),
                               "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
                    m = launch.measure(cmd, OUT / f"{key}-{layers}-{method}.log", env)
                    parts = calibrate.peak_memory(ckpt.config, int(toks.size), 512,
                                                  "gptq" if method != "imatrix" else "imatrix")
                    row = {"model": name, "layers": layers, "method": method, "tokens": int(toks.size),
                           "peak_rss": m["peak_rss"], "wall_s": m["wall_s"], "others_cores": m["others_cores"],
                           "formula": floor + sum(parts.values()) if method != "gptqmodel" else None,
                           "parts": parts if method != "gptqmodel" else None}
                    rows.append(row)
                    print(f"  {name} {layers} layers {method}: peak {m['peak_rss'] / MB:.0f} MB"
                          + (f", formula {row['formula'] / MB:.0f} MB" if row["formula"] else "")
                          + f", {m['wall_s']:.0f} s", flush=True)
    finally:
        launch.close()
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "calib_tokens": args.calib_tokens, "runtime_floor": floor, "rows": rows,
              "command": ".venv/bin/python -m bench.calib_memory " + " ".join(argv if argv is not None else sys.argv[1:])}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    write_doc(result)
    return 0


def write_doc(r: dict) -> None:
    lines = [HEADING, "",
             f"Made by `{r['command']}` on {r['date'][:10]} ({r['machine']['cpu']}, {r['machine']['nproc']} cores); "
             f"{r['calib_tokens']} calibration tokens in windows of 512. Peak RSS of the whole child process; "
             f"formula = the runtime floor ({r['runtime_floor'] / MB:.0f} MB: Python, torch, transformers, qwqq "
             "imported) + `qwqq.calib.engine.peak_memory` (the parts above). Each model also as a copy cut to "
             "its first blocks: same width, a fraction of the depth.", "",
             "| model | blocks | pass | peak RSS MB | formula MB | measured / formula | wall s |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for x in r["rows"]:
        f = x["formula"]
        lines.append(f"| {x['model']} | {x['layers']} | {x['method']} | {x['peak_rss'] / MB:.0f} | "
                     f"{f / MB:.0f} | {x['peak_rss'] / f:.2f} |" if f else
                     f"| {x['model']} | {x['layers']} | {x['method']} (GPTQModel 7.7 defaults) | "
                     f"{x['peak_rss'] / MB:.0f} | | |")
        lines[-1] += f" {x['wall_s']:.0f} |"
    by = {}
    for x in r["rows"]:
        by.setdefault((x["model"], x["method"]), []).append(x)
    lines.append("")
    for (model, method), xs in by.items():
        if len(xs) == 2:
            a, b = sorted(xs, key=lambda x: x["layers"])
            lines.append(f"- {model}, {method}: {b['layers']} blocks / {a['layers']} blocks = "
                         f"{b['layers'] / a['layers']:.1f} x the depth, {b['peak_rss'] / a['peak_rss']:.2f} x the peak RSS.")
    section = "\n".join(lines) + "\n"
    replace_section(DOC, HEADING, section, before="## The sample")


if __name__ == "__main__":
    sys.exit(main())

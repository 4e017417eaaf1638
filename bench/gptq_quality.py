"""GPTQ and importance-matrix quality on a real model: KLD against the bf16 source, time and peak RSS.

Steps, each its own child process (wall time and peak RSS from os.wait4, as in
bench/gguf_vs_llamacpp.py):
  gptq     qwqq GPTQ, 4 bits, group 128, calibrated on the shipped sample (--calib-tokens)
  rtn      round-to-nearest on the same grid, written by the same writer (the baseline)
  imatrix  qwqq's importance matrix from the same sample; GGUF Q2_K, Q3_K_M and IQ2_XS with it,
           Q2_K and Q3_K_M without
Then `qwqq eval`'s harness scores each output against the bf16 source on the shipped evaluation
text (held apart from the calibration sample), and the table goes to docs/bench-gptq.md.

Run from the repository root::

    .venv/bin/python -m bench.gptq_quality [--model qwen25|smollm2] [--calib-tokens 2048] [--eval-tokens 4096]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys

from bench.common import BENCH_CACHE, DOCS, MB, MODELS, RESULTS_DIR, Launcher, machine, prog

OUT = BENCH_CACHE / "gptq"
RESULTS = RESULTS_DIR / "gptq_quality.json"
DOC = DOCS / "bench-gptq.md"

GPTQ = """
import sys; from qwqq.gptq.quantize import quantize_to_gptq
r = quantize_to_gptq(sys.argv[1], out=sys.argv[2], bits=4, group_size=128, calib_tokens=int(sys.argv[3]),
                     calib_seqlen=512, force=True, progress=False)
print(len(r.rtn_fallbacks), "fallbacks")
"""
RTN = """
import sys, torch; from qwqq.gptq.solver import rtn_quantize; from qwqq.gptq.packing import pack; from qwqq.gptq.checkpoint import write_gptq
def q(lin, w):
    r = rtn_quantize(torch.from_numpy(w), bits=4, group_size=128)
    return pack(r.q, r.scales, r.zeros, r.g_idx, 4)
write_gptq(sys.argv[1], sys.argv[2], q, bits=4, group_size=128, force=True)
"""
IMATRIX = """
import sys; from qwqq.calib.text import default_text, tokenize; from qwqq.calib.imatrix import compute_imatrix
from qwqq.gguf.imatrix_file import write_imatrix
from qwqq.source import open_checkpoint
ck = open_checkpoint(sys.argv[1])
toks = tokenize(ck, default_text(), int(sys.argv[3]), 512)
write_imatrix(compute_imatrix(ck, toks, dataset="qwqq calibration.txt"), sys.argv[2], force=True)
"""
GGUF = """
import sys; from qwqq.gguf.quantize import quantize_to_gguf, resolve_mixture
from qwqq.gguf.imatrix_file import read_imatrix
im = read_imatrix(sys.argv[4]) if len(sys.argv) > 4 else None
quantize_to_gguf(sys.argv[1], resolve_mixture(type_name=sys.argv[3], has_imatrix=im is not None), out=sys.argv[2],
                 force=True, progress=False, imatrix=im)
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=prog(__spec__))
    ap.add_argument("--model", default="qwen25", choices=sorted(MODELS))
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--skip", default="", help="comma-separated steps to skip: gptq,rtn,gguf")
    args = ap.parse_args(argv)
    import tests.fixtures as fx
    from qwqq.eval.harness import evaluate

    name, fixture = MODELS[args.model]
    src = getattr(fx, fixture)()
    OUT.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    py = sys.executable
    launch = Launcher()
    rows = []
    try:
        outputs = {}
        if "gptq" not in skip:
            out = OUT / f"{args.model}-gptq4"
            m = launch.measure([py, "-c", GPTQ, str(src), str(out), str(args.calib_tokens)], OUT / "gptq.log")
            outputs["GPTQ 4-bit g128 (qwqq)"] = (out, m)
        if "rtn" not in skip:
            out = OUT / f"{args.model}-rtn4"
            outputs["RTN 4-bit g128"] = (out, launch.measure([py, "-c", RTN, str(src), str(out)], OUT / "rtn.log"))
        if "gguf" not in skip:
            im = OUT / f"{args.model}.imatrix.gguf"
            m = launch.measure([py, "-c", IMATRIX, str(src), str(im), str(args.calib_tokens)], OUT / "imatrix.log")
            rows.append({"output": "imatrix (qwqq)", "wall_s": m["wall_s"], "peak_rss": m["peak_rss"]})
            for t, use in [("Q3_K_M", False), ("Q3_K_M", True), ("Q2_K", False), ("Q2_K", True), ("IQ2_XS", True)]:
                out = OUT / f"{args.model}-{t}{'-imat' if use else ''}.gguf"
                cmd = [py, "-c", GGUF, str(src), str(out), t] + ([str(im)] if use else [])
                outputs[f"GGUF {t}{' + imatrix' if use else ''}"] = (out, launch.measure(cmd, OUT / f"{t}.log"))
    finally:
        launch.close()
    for label, (path, m) in outputs.items():
        r = evaluate(path, src, ctx=512, max_tokens=args.eval_tokens, progress=False)
        size = path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.iterdir())
        rows.append({"output": label, "bytes": size, "wall_s": m["wall_s"], "peak_rss": m["peak_rss"],
                     **{k: r.summary.as_dict()[k] for k in ("tokens", "ppl", "ref_ppl", "kld_mean", "kld_err",
                                                             "kld_median", "kld_p99", "same_top")}})
        print(json.dumps(rows[-1]), flush=True)
    result = {"model": name, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "calib_tokens": args.calib_tokens, "eval_tokens": args.eval_tokens, "rows": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    write_doc(result, argv)
    return 0


def write_doc(result: dict, argv) -> None:
    lines = [f"# GPTQ and importance-matrix quality: {result['model']}", "",
             "Made by `.venv/bin/python -m bench.gptq_quality " + " ".join(argv or sys.argv[1:]) + "` on "
             f"{result['date'][:10]} ({result['machine'].get('cpu', '')}, {result['machine'].get('cores', '')} cores).",
             f"Calibration: the shipped sample, {result['calib_tokens']} tokens in windows of 512. "
             f"Evaluation: the shipped eval text (held apart), {result['eval_tokens']} tokens, windows of 512, "
             "second halves scored, against the bf16 source (KLD in nats).", "",
             "| output | size MB | KLD mean ± err | KLD median | KLD p99 | same top | PPL (bf16) | wall s | peak RSS MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if "kld_mean" not in r:
            lines.append(f"| {r['output']} | | | | | | | {r['wall_s']:.0f} | {r['peak_rss'] / MB:.0f} |")
            continue
        lines.append(f"| {r['output']} | {r['bytes'] / MB:.0f} | {r['kld_mean']:.4f} ± {r['kld_err']:.4f} | "
                     f"{r['kld_median']:.4f} | {r['kld_p99']:.3f} | {100 * r['same_top']:.1f}% | "
                     f"{r['ppl']:.3f} ({r['ref_ppl']:.3f}) | {r['wall_s']:.0f} | {r['peak_rss'] / MB:.0f} |")
    DOC.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())

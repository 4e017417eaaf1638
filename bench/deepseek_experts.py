"""Peak RSS of `qwqq quantize` on a tiny DeepSeek-V3 FP8 release with 16 routed experts and the same model with
256 (R1's count; every other shape equal): the GGUF writer streams row chunks, so the number of experts (the
size of a stacked expert tensor) must not move the peak. Writes the section "Memory at 256 experts" of
docs/bench-gguf.md and bench/results/deepseek_experts.json.

    .venv/bin/python -m bench.deepseek_experts [--experts 16,256] [--type Q4_K_M] [--repeat 1]

Each run is its own child process (bench.common.Launcher: ru_maxrss of the child). `qwqq imatrix` is measured
too, for the record: the block engine holds one whole decoder block in float32 by design, so its peak grows
with the experts of one block (docs/calibration.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.common import BENCH_CACHE, DOCS, MB, RESULTS_DIR, Launcher, machine, prog, qwqq_command, qwqq_git, \
    replace_section, source_files, version, warm

OUT = BENCH_CACHE / "deepseek_experts"
HEADING = "## Memory at 256 experts (DeepSeek)"
LIMIT = 0.10  # the peaks within 10 % of each other


def _source(experts: int) -> Path:
    from tests.fixtures_deepseek import tiny_deepseek_dir

    return tiny_deepseek_dir("fp8", mtp=False, experts=experts)


def run(experts: list[int], mixture: str, repeat: int, imatrix: bool) -> dict:
    OUT.mkdir(parents=True, exist_ok=True)
    launch = Launcher()
    try:
        floor = launch.measure([__import__("sys").executable, "-c", "pass"], OUT / "floor.log")["peak_rss"]
        rows = []
        for e in experts:
            src = _source(e)
            warm(source_files(src))
            row = {"experts": e, "source_bytes": sum(p.stat().st_size for p in source_files(src)), "quantize": []}
            for k in range(repeat):
                out = OUT / f"e{e}-{mixture}.gguf"
                m = launch.measure([*qwqq_command(), "quantize", str(src), "--type", mixture, "-o", str(out), "--force",
                                    "-j", "2", "-q"], OUT / f"e{e}-quantize-{k}.log")
                row["quantize"].append({"peak_rss": m["peak_rss"], "wall_s": m["wall_s"]})
                row["output_bytes"] = out.stat().st_size
                out.unlink()
            if imatrix:
                m = launch.measure([*qwqq_command(), "imatrix", str(src), "-o", str(OUT / f"e{e}.imatrix.gguf"), "--force",
                                    "--calib-tokens", "1024", "-q"], OUT / f"e{e}-imatrix.log")
                row["imatrix"] = {"peak_rss": m["peak_rss"], "wall_s": m["wall_s"]}
            rows.append(row)
            print(f"{e:4d} experts: quantize peak {max(q['peak_rss'] for q in row['quantize']) / MB:.0f} MB"
                  + (f", imatrix peak {row['imatrix']['peak_rss'] / MB:.0f} MB" if imatrix else ""), flush=True)
    finally:
        launch.close()
    peaks = [max(q["peak_rss"] for q in r["quantize"]) for r in rows]
    return {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "qwqq": qwqq_git(), "mixture": mixture,
            "torch": version("torch"), "rss_floor": floor, "rows": rows,
            "peak_ratio": max(peaks) / min(peaks), "within_limit": max(peaks) <= (1 + LIMIT) * min(peaks)}


def write_doc(res: dict) -> None:
    m = res["machine"]
    L = [HEADING, "",
         f"Made by `.venv/bin/python -m bench.deepseek_experts` on {res['date']} ({m['cpu']}, {m['nproc']} cores; "
         f"qwqq {res['qwqq']}). A tiny DeepSeek-V3 FP8 release (tests/fixtures_deepseek.py: hidden 256, 4 layers, "
         "3 of them MoE, expert FFN 128, MTP left out) built with 16 and with 256 routed experts, every other shape "
         f"equal; `qwqq quantize --type {res['mixture']}`, peak RSS of the child process (`ru_maxrss`).", "",
         "| routed experts | source | GGUF | quantize peak RSS | wall s | imatrix peak RSS (for the record) |",
         "|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        q = max(r["quantize"], key=lambda x: x["peak_rss"])
        im = f"{r['imatrix']['peak_rss'] / MB:,.0f} MB" if "imatrix" in r else ""
        L.append(f"| {r['experts']} | {r['source_bytes'] / MB:,.0f} MB | {r['output_bytes'] / MB:,.0f} MB | "
                 f"{q['peak_rss'] / MB:,.0f} MB | {q['wall_s']:.1f} | {im} |")
    e0, e1 = res["rows"][0], res["rows"][-1]
    stacked = 4 * e1["experts"] * 128 * 256
    L += ["", f"- {e1['experts']} experts / {e0['experts']} experts: quantize's peak RSS x {res['peak_ratio']:.3f} "
          f"({'within' if res['within_limit'] else '**outside**'} the 10 % target) while each stacked expert tensor "
          f"grows 16-fold, to {stacked / MB:.0f} MB as float32 (R1's: {4 * 256 * 2048 * 7168 / 1e9:.1f} GB): the writer "
          "reads, dequantizes and quantizes row chunks and never holds a stacked tensor.",
          "- The importance-matrix pass is the exception by design: the block engine holds one decoder block in "
          "float32 (all its experts), so its peak grows with the experts of a block (R1: about 45 GB for a MoE block, "
          "docs/calibration.md). tests/test_deepseek_memory.py holds the quantize peaks within 10 %."]
    replace_section(DOCS / "bench-gguf.md", HEADING, "\n".join(L) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=prog(__spec__), description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", default="16,256")
    ap.add_argument("--type", default="Q4_K_M")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--no-imatrix", action="store_true", help="skip the imatrix pass")
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args(argv)
    res = run([int(x) for x in args.experts.split(",")], args.type, args.repeat, not args.no_imatrix)
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "deepseek_experts.json").write_text(json.dumps(res, indent=2) + "\n")
    if not args.no_doc:
        write_doc(res)
    return 0 if res["within_limit"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

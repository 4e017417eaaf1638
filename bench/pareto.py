"""Quality against size: KLD vs file size for the stock GGUF mixtures, IQ types, MLX, GPTQ, and qwqq's
budget-targeted GGUFs at the sizes of the stock mixtures, and qwqq's budget-targeted MLX folders (bits
per module) at the sizes of the uniform 3- and 4-bit MLX folders.

Every point is scored by `qwqq eval`'s harness against the bf16 source on the shipped evaluation
text (held apart from the calibration sample). A point already scored (same label, same size on disk,
in bench/results/pareto-<model>.json) is not scored again. All GGUFs (stock and budget) are made with the same
importance matrix, computed by qwqq from the shipped calibration sample, so the comparison is
between type choices only. Output: docs/bench-pareto.md (table) and docs/pareto-<model>.png.

Run from the repository root::

    .venv/bin/python -m bench.pareto [--model smollm2|qwen25] [--eval-tokens 4096] [--calib-tokens 4096] [--skip-mlx]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

from bench.common import BENCH_CACHE, DOCS, MODELS, RESULTS_DIR, prog

OUT = BENCH_CACHE / "pareto"
DOC = DOCS / "bench-pareto.md"
STOCK = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]
IQ = ["IQ2_XS", "IQ2_M", "IQ3_XXS", "IQ3_M", "IQ4_XS"]
BUDGET_ALWAYS = ["Q3_K_M", "Q4_K_M", "Q5_K_M"]  # and every stock mixture from 2.5 to 5 bits per weight
BPW_RANGE = (2.5, 5.0)
MLX_BITS = [3, 4, 6, 8]
MLX_BUDGET_AT = [3, 4]


def size_of(p: Path) -> int:
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.iterdir() if f.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=prog(__spec__))
    ap.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--skip-mlx", action="store_true")
    ap.add_argument("--iq", default=",".join(IQ), help="the IQ mixtures to make and score (each takes minutes "
                    "on a 1.5B model: the grid searches are slow)")
    ap.add_argument("--gptq", type=Path, help="a qwqq GPTQ folder of this model already made (bench.gptq_vs_gptqmodel's)")
    args = ap.parse_args(argv)
    import tests.fixtures as fx
    from qwqq.eval.harness import evaluate
    from qwqq.calib import imatrix as calib_imatrix
    from qwqq.calib import text as calib_text
    from qwqq.budget.gguf import plan_for_budget
    from qwqq.gguf.imatrix_file import read_imatrix, write_imatrix
    from qwqq.gguf.quantize import quantize_to_gguf, resolve_mixture
    from qwqq.source import open_checkpoint

    name, fixture = MODELS[args.model]
    src = getattr(fx, fixture)()
    ckpt = open_checkpoint(src)
    out = OUT / args.model
    out.mkdir(parents=True, exist_ok=True)
    im_path = out / "imatrix.gguf"
    if not im_path.exists():
        toks = calib_text.tokenize(ckpt, calib_text.default_text(), args.calib_tokens, 512)
        write_imatrix(calib_imatrix.compute_imatrix(ckpt, toks, dataset="qwqq calibration.txt"), im_path)
    im = read_imatrix(im_path)
    iq = [t for t in args.iq.split(",") if t]
    from qwqq.gguf.quantize import plan_checkpoint

    n_params = plan_checkpoint(ckpt, "Q4_K_M")[2].n_params

    def gguf(t: str) -> Path:
        p = out / f"{t}.gguf"
        if not p.exists():
            quantize_to_gguf(src, resolve_mixture(type_name=t, has_imatrix=True), out=p, imatrix=im, progress=False)
        return p

    def budget_gguf(t: str) -> Path:
        p = out / f"budget-at-{t}.gguf"
        if not p.exists():
            bp = plan_for_budget(ckpt, target_bytes=size_of(gguf(t)), imatrix=im)
            quantize_to_gguf(src, resolve_mixture(type_name="Q4_K_M"), out=p, imatrix=im, overrides=bp.overrides,
                             progress=False)
        return p

    def mlx(b: int) -> Path:
        from qwqq.mlx.quantize import quantize_to_mlx

        p = out / f"mlx-{b}bit"
        if not p.exists():
            quantize_to_mlx(src, bits=b, out=p, progress=False)
        return p

    def budget_mlx(b: int) -> Path:
        from qwqq.budget.mlx import plan_mlx_budget
        from qwqq.mlx.quantize import quantize_to_mlx

        p = out / f"mlx-budget-at-{b}bit"
        if not p.exists():
            target = sum(f.stat().st_size for f in mlx(b).glob("*.safetensors"))
            quantize_to_mlx(src, out=p, overrides=plan_mlx_budget(ckpt, target_bytes=target).overrides,
                            progress=False)
        return p

    def gptq() -> Path:
        p = args.gptq or out / "gptq-4bit-g128"
        if not p.exists():
            from qwqq.gptq.quantize import quantize_to_gptq

            quantize_to_gptq(src, out=p, calib_tokens=args.calib_tokens, progress=False)
        return p

    # (family, label, make): each point is made (unless on disk) and scored in turn, the slow IQ grids last,
    # so a run that is stopped keeps what it scored (the progress file) and the next one goes on from there
    points = [("GGUF stock", t, lambda t=t: gguf(t)) for t in STOCK]
    bpw = {t: 8 * size_of(gguf(t)) / n_params for t in STOCK}
    points += [("GGUF qwqq budget", f"budget @ {t} size", lambda t=t: budget_gguf(t)) for t in STOCK
               if BPW_RANGE[0] <= bpw[t] <= BPW_RANGE[1] or t in BUDGET_ALWAYS]
    points.append(("GPTQ", "gptq 4-bit g128", gptq))
    if not args.skip_mlx:
        points += [("MLX", f"mlx {b}-bit g64", lambda b=b: mlx(b)) for b in MLX_BITS]
        points += [("MLX qwqq budget", f"mlx budget @ {b}-bit size", lambda b=b: budget_mlx(b)) for b in MLX_BUDGET_AT]
    points += [("GGUF IQ", t, lambda t=t: gguf(t)) for t in iq]

    results_file = RESULTS_DIR / f"pareto-{args.model}.json"
    before = json.loads(results_file.read_text()) if results_file.exists() else {}
    scored = {r["label"]: r for r in before.get("rows", [])} if before.get("eval_tokens") == args.eval_tokens else {}
    progress_file = out / f"scored-{args.eval_tokens}.json"  # rows scored by a run that did not finish
    if progress_file.exists():
        scored.update(json.loads(progress_file.read_text()))
    rows, files = [], []
    for family, label, make in points:
        p = make()
        files.append((family, label, p))
        if label in scored and scored[label]["bytes"] == size_of(p):
            rows.append({**scored[label], "family": family})
            continue
        r = evaluate(p, src, ctx=512, max_tokens=args.eval_tokens, progress=False).summary
        rows.append({"family": family, "label": label, "bytes": size_of(p), "kld_mean": r.kld_mean,
                     "kld_err": r.kld_err, "kld_p99": r.kld_p99, "same_top": r.same_top, "ppl": r.ppl,
                     "ref_ppl": r.ref_ppl})
        print(json.dumps(rows[-1]), flush=True)
        progress_file.write_text(json.dumps({**scored, **{r["label"]: r for r in rows}}, indent=1))
    # the allocator's predicted loss of every GGUF whose types it measured, against its measured KLD
    from gguf import GGMLQuantizationType as T

    from qwqq.gguf.reader import read_gguf
    from qwqq.budget.allocate import predicted_loss
    from qwqq.budget.sensitivity import measure

    _, tensors, base = plan_checkpoint(ckpt, "Q4_K_M", has_imatrix=True)
    sens = measure(ckpt, {t.name: t for t in tensors}, base, im)
    shapes = {t.name: t.shape for t in base.tensors}
    for row, (family, label, p) in zip(rows, files):
        if p.suffix == ".gguf":
            row["predicted_loss"] = predicted_loss(sens, {t.name: T(t.type) for t in read_gguf(p).tensors}, shapes)
    result = {"model": name, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "eval_tokens": args.eval_tokens, "calib_tokens": args.calib_tokens, "n_params": n_params, "rows": rows}
    (RESULTS_DIR).mkdir(exist_ok=True)
    (RESULTS_DIR / f"pareto-{args.model}.json").write_text(json.dumps(result, indent=2) + "\n")
    chart(result, DOCS / f"pareto-{args.model}.png")
    write_doc(result, args, argv)
    return 0


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    marks = {"GGUF stock": "o", "GGUF IQ": "s", "GGUF qwqq budget": "*", "MLX": "^", "MLX qwqq budget": "P",
             "GPTQ": "D"}
    for fam, m in marks.items():
        pts = [r for r in result["rows"] if r["family"] == fam]
        if not pts:
            continue
        ax.scatter([r["bytes"] / 1e6 for r in pts], [r["kld_mean"] for r in pts], marker=m, s=80 if m == "*" else 40,
                   label=fam)
        for r in pts:
            ax.annotate(r["label"].replace(" size", ""), (r["bytes"] / 1e6, r["kld_mean"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("mean KLD vs bf16 (nats, log scale)")
    ax.set_title(f"{result['model']}: quality against size ({result['eval_tokens']} eval tokens)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def write_doc(result: dict, args, argv) -> None:
    cmd = "`.venv/bin/python -m bench.pareto " + " ".join(argv if argv is not None else sys.argv[1:]) + "`"
    lines = [f"## {result['model']}", "",
             f"Made by {cmd} on {result['date'][:10]}. Chart: docs/pareto-{args.model}.png. Every GGUF (stock, IQ "
             "and budget) uses the same qwqq importance matrix (shipped calibration sample, "
             f"{result['calib_tokens']} tokens); KLD against the bf16 source on {result['eval_tokens']} tokens of "
             "the shipped eval text (windows of 512, second halves scored).", "",
             "| family | output | size MB | KLD mean ± err | KLD p99 | same top | PPL (bf16) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in sorted(result["rows"], key=lambda r: r["bytes"]):
        lines.append(f"| {r['family']} | {r['label']} | {r['bytes'] / 1e6:.1f} | {r['kld_mean']:.4f} ± {r['kld_err']:.4f} | "
                     f"{r['kld_p99']:.3f} | {100 * r['same_top']:.1f}% | {r['ppl']:.3f} ({r['ref_ppl']:.3f}) |")
    stock = {r["label"]: r for r in result["rows"] if r["family"] == "GGUF stock"}
    n_params = result.get("n_params")
    lines += ["", "Budget-targeted against the stock mixture of the same size (every stock mixture from "
              f"{BPW_RANGE[0]} to {BPW_RANGE[1]} bits per weight, and {', '.join(BUDGET_ALWAYS)}):", "",
              "| size of | bpw | stock KLD | budget KLD | budget / stock |", "|---|---:|---:|---:|---:|"]
    for r in sorted((r for r in result["rows"] if r["family"] == "GGUF qwqq budget"), key=lambda r: r["bytes"]):
        s = stock[r["label"].split("@ ")[1].split()[0]]
        bits = f"{8 * s['bytes'] / n_params:.2f}" if n_params else ""
        lines.append(f"| {s['label']} ({s['bytes'] / 1e6:.1f} MB; budget file {r['bytes'] / 1e6:.1f} MB) | {bits} | "
                     f"{s['kld_mean']:.4f} | {r['kld_mean']:.4f} | {r['kld_mean'] / s['kld_mean']:.2f} |")
    pred = [(r["predicted_loss"], r["kld_mean"], r["label"]) for r in result["rows"] if r.get("predicted_loss")]
    if len(pred) >= 3:
        import numpy as np

        rank = lambda xs: np.argsort(np.argsort(xs))  # noqa: E731
        rho = float(np.corrcoef(rank([p for p, _, _ in pred]), rank([k for _, k, _ in pred]))[0, 1])
        pearson = float(np.corrcoef(np.log([p for p, _, _ in pred]), np.log([k for _, k, _ in pred]))[0, 1])
        lines += ["", "The allocator's proxy against measured KLD: its predicted loss (weighted sum of nsr, "
                  "qwqq/budget/sensitivity.py) for every GGUF whose types it measured (stock K-quant mixtures and "
                  f"budget files; IQ types are not on its ladder): Spearman rank correlation {rho:.3f}, Pearson of "
                  f"the logs {pearson:.3f}, over {len(pred)} files.", "",
                  "| file | predicted loss | KLD mean |", "|---|---:|---:|"]
        lines += [f"| {lab} | {p:.5f} | {k:.4f} |" for p, k, lab in sorted(pred)]
    mlx = {r["label"]: r for r in result["rows"] if r["family"] == "MLX"}
    mlx_budget = [r for r in result["rows"] if r["family"] == "MLX qwqq budget"]
    if mlx_budget:
        lines += ["", "MLX bits per module (budget) against uniform MLX of the same size:", "",
                  "| size of | uniform KLD | budget KLD | budget / uniform |", "|---|---:|---:|---:|"]
        for r in mlx_budget:
            u = mlx[f"mlx {r['label'].split('@ ')[1].split()[0]} g64"]
            lines.append(f"| {u['label']} ({u['bytes'] / 1e6:.1f} MB; budget folder {r['bytes'] / 1e6:.1f} MB) | "
                         f"{u['kld_mean']:.4f} | {r['kld_mean']:.4f} | {r['kld_mean'] / u['kld_mean']:.2f} |")
    section = "\n".join(lines) + "\n"
    head = "# Quality against size (issue 6's Pareto benchmark)\n\n"
    old = DOC.read_text() if DOC.exists() else head
    parts = old.split("\n## ")
    kept = [p for p in parts[1:] if not p.startswith(result["model"])]
    DOC.write_text(parts[0].rstrip("\n") + "\n\n" + "".join("## " + p.rstrip("\n") + "\n\n" for p in kept) + section)


if __name__ == "__main__":
    sys.exit(main())

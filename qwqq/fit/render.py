"""qwqq fit for people: the table, the best choice with its commands, the notes.
(Scripts get Report.to_json through --json.)"""

from __future__ import annotations

from qwqq.fit import hardware as hwmod
from qwqq.fit.candidate import Candidate, placement_text, speed_text
from qwqq.fit.constants import backend_constants
from qwqq.fit.gptq import GPTQ_INSTALL, transformers_backend
from qwqq.fit.search import Report
from qwqq.fit.hardware import GiB, Hardware

SOURCE = {"gguf": "file", "catalog": "catalog", "hub": "hub config", "local": "local folder"}


def _num(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def _gpu_mem(c: Candidate) -> str:
    return _num(sum(g.total for g in c.gpus) / GiB) if c.gpus else "-"


def _budgets(hw: Hardware) -> str:
    consts = backend_constants()
    parts = []
    if hw.gpus:
        backend = hw.backend if hw.backend in consts.margin else "cuda"
        each = max(g.vram_bytes for g in hw.gpus) - consts.margin[backend]
        n = f"{len(hw.gpus)} x " if len(hw.gpus) > 1 else ""
        parts.append(f"{'GPU working set' if hw.unified else 'GPU'} {n}{_num(each / GiB)} GiB")
    parts.append(f"RAM {_num(consts.ram_budget(hw.ram_bytes) / GiB)} GiB"
                 + (" (shared with the GPU)" if hw.unified else ""))
    return "GPU / RAM columns: GiB used; budgets (memory less safety margins): " + ", ".join(parts)


def render(report: Report, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    hw = report.hardware
    console.print(f"[bold]{escape(hw.describe())}[/]")
    for n in hw.notes:
        console.print(f"[dim]{escape(n)}[/]")
    if report.model is not None:
        m = report.model
        console.print(f"model: [bold]{escape(m.name)}[/] ({SOURCE[m.source]}, {m.n_params / 1e9:.2f} B parameters, "
                      f"{m.dims.n_layer} layers)" + (" [yellow]approximate shape model[/]" if m.approximate else ""))
    cands = report.candidates
    show_ram = any(c.mode != "gpu" for c in cands) or not hw.gpus
    show_fits = not all(c.fits for c in cands)
    cols = [] if report.model is not None else [("model", "left")]
    cols += [("type", "left"), ("bpw", "right"), ("GB", "right"), ("ctx", "right"), ("KV", "left"), ("on GPU", "left")]
    cols += [("GPU", "right")] if hw.gpus else []
    cols += [("RAM", "right")] if show_ram else []
    cols += [("tok/s", "right")] + ([("fit", "left")] if show_fits else [])
    table = Table(header_style="bold", box=None, pad_edge=False, padding=(0, 1, 0, 0))
    for col, just in cols:
        table.add_column(col, justify=just, no_wrap=True, max_width=17 if col == "model" else None, overflow="ellipsis")
    for c in cands:
        row = [] if report.model is not None else [escape(c.model.name)]
        row += [c.build.type_name, f"{c.build.bits_per_weight:.2f}", f"{c.build.file_bytes / 1e9:.2f}", str(c.ctx), c.kv,
                placement_text(c)]
        row += [_gpu_mem(c)] if hw.gpus else []
        row += [_num(c.host.total / GiB)] if show_ram else []
        row += [f"{c.tokens_per_s:.1f}" if c.tokens_per_s else "-"]
        row += ["[green]yes[/]" if c.fits else "[red]no[/]"] if show_fits else []
        table.add_row(*row)
    console.print(table)
    console.print(f"[dim]{_budgets(hw)}[/]")
    best = next((c for c in cands if c.fits), None)
    if best is not None:
        _print_best(best, console)
    for a in report.advice:
        console.print(f"[yellow]{escape(a)}[/]")
    if any(c.format == "gptq" for c in cands):
        console.print("[dim]GPTQ rows (transformers / vLLM): weights + f16 KV cache + the CUDA context estimate; "
                      "the runtime's own overhead is not measured, so their memory is a lower bound (ranked after "
                      "rows fit accounts for fully). GB: tensor data, headers excluded.[/]")
    consts = backend_constants()
    console.print(f"[dim]tok/s: decode speed from memory bandwidth x {consts.efficiency:.2f} efficiency, context "
                  f"{consts.kv_fill:.0%} full; prompt speed not estimated. GB = 10^9 bytes, GiB = 2^30.[/]")


def _print_best(best: Candidate, console) -> None:
    from rich.markup import escape

    cmd = best.commands()
    split = f" (split {'/'.join(str(g.layers) for g in best.gpus)})" if len(best.gpus) > 1 else ""
    console.print(f"best: [bold]{escape(best.model.name)} {best.build.type_name}[/], ctx {best.ctx}, {best.kv} KV, "
                  f"GPU layers: {placement_text(best)}{split}, {speed_text(best)}")
    if best.tokens_per_s and best.tokens_per_s < 5:
        console.print(f"  [yellow]slow: a 4000-token reasoning answer takes about "
                      f"{4000 / best.tokens_per_s / 60:.0f} minutes[/]")
    if cmd["quantize"]:
        console.print(f"  {escape(cmd['quantize'])}")
    note = ""
    if best.format == "gptq":
        note = "" if transformers_backend() else f"needs torch and transformers: {GPTQ_INSTALL}"
    console.print(f"  {escape(cmd['run'])}" + (f"  [dim]({escape(note)})[/]" if note else ""))
    for key in ("serve", "llama_cpp", "mlx_lm", "vllm"):
        if cmd.get(key):
            console.print(f"  {escape(cmd[key])}")
    for n in best.notes:
        console.print(f"  [dim]{escape(n)}[/]")


def print_profiles(console, as_json: bool = False) -> None:
    hws = hwmod.profiles()
    if as_json:
        import json
        import sys

        sys.stdout.write(json.dumps([h.to_json() for h in hws], indent=1) + "\n")
        return
    from rich.table import Table

    t = Table(header_style="bold")
    for col in ("profile", "hardware", "memory"):
        t.add_column(col)
    for h in hws:
        t.add_row(h.id, h.name, h.describe().split(": ", 1)[1])
    console.print(t)

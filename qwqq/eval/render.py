"""eval's answer for people: one rich table."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from qwqq.eval.harness import EvalResult


def render(r: EvalResult, console: Console) -> None:
    s = r.summary
    t = Table(title=f"{r.model}  vs  {r.ref}", title_justify="left", show_header=True)
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("tokens scored", f"{s.tokens}  ({r.windows} windows of {r.ctx}, second halves)")
    t.add_row("PPL", f"{s.ppl:.4f} ± {s.ppl_err:.4f}")
    t.add_row("PPL of the reference", f"{s.ref_ppl:.4f}")
    t.add_row("KLD mean", f"{s.kld_mean:.6f} ± {s.kld_err:.6f}")
    t.add_row("KLD median", f"{s.kld_median:.6f}")
    t.add_row("KLD p99", f"{s.kld_p99:.6f}")
    t.add_row("KLD max", f"{s.kld_max:.6f}")
    t.add_row("same top token", f"{100 * s.same_top:.2f}% ± {100 * s.same_top_err:.2f}%")
    t.add_row("time", f"{r.seconds:.1f} s (reference {'from cache' if r.ref_cached else f'{r.ref_seconds:.1f} s'})")
    console.print(t)

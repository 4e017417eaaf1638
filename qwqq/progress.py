"""One progress bar for every long job: tensors done / total, bytes processed, elapsed, ETA.

Shown on stderr, only on a terminal; a script or a pipe sees nothing.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator


@contextmanager
def tensor_progress(enabled: bool, total_bytes: int, n_tensors: int,
                    label: str = "quantize") -> Iterator[Callable[[str, int], None] | None]:
    """Yields tick(tensor_name, n_bytes) or None when disabled."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    console = Console(stderr=True)
    columns = [TextColumn("[bold]{task.description}"), TextColumn("{task.fields[count]}"),
               TextColumn("{task.fields[tensor]:<30.30}"), BarColumn(), DownloadColumn(binary_units=True),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    seen: set[str] = set()
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as p:
        task = p.add_task(label, total=total_bytes, tensor="", count=f"0/{n_tensors}")

        def tick(name: str, n_bytes: int) -> None:
            seen.add(name)
            p.update(task, advance=n_bytes, tensor=name, count=f"{len(seen)}/{n_tensors}")

        yield tick


@contextmanager
def step_progress(enabled: bool, total: int, label: str) -> Iterator[Callable[[], None] | None]:
    """A bar over `total` equal steps (windows, blocks); yields tick() or None when disabled."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(stderr=True)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("eta"), TimeRemainingColumn(), console=console, transient=True,
                  disable=not console.is_terminal) as p:
        task = p.add_task(label, total=total)
        yield lambda: p.advance(task)

"""`--tensor-split`: how llama.cpp spreads a model's layers over several GPUs, as its own -ts / --tensor-split.

One number per GPU, in device order, comma- or slash-separated (`3,1`, `40/24`): proportions, so `qwqq fit`
writes the layers it placed on each GPU. llama.cpp's default without it splits by free memory. A build
without GPU offload has nothing to split and ignores it, as llama.cpp does.
"""

from __future__ import annotations

import math
import re

from qwqq.errors import QwqqError

MAX_DEVICES = 16  # llama.h's LLAMA_MAX_DEVICES


def parse(text: str | None) -> list[float] | None:
    """`3,1` -> [3.0, 1.0]; None stays None (fit decides). One clear line for anything else."""
    if text is None:
        return None
    hint = "give one number per GPU, e.g. 3,1 (layers or proportions)"
    try:
        values = [float(part) for part in re.split(r"[,/]", text.strip())]
    except ValueError:
        raise QwqqError(f"--tensor-split {text!r}: {hint}") from None
    if not all(math.isfinite(v) and v >= 0 for v in values) or not any(values):
        raise QwqqError(f"--tensor-split {text!r}: the numbers must be 0 or more and not all 0; {hint}")
    if len(values) > MAX_DEVICES:
        raise QwqqError(f"--tensor-split {text!r}: llama.cpp takes at most {MAX_DEVICES} GPUs")
    return values


def flag(split: list[float]) -> str:
    """The value as the option takes it: 40,24."""
    return ",".join(f"{v:g}" for v in split)


def describe(split: list[float] | None) -> str:
    """For start-up and status lines: "split 40/24 over 2 GPUs"; "" without a split."""
    if not split:
        return ""
    return f"split {'/'.join(f'{v:g}' for v in split)} over {len(split)} GPUs"

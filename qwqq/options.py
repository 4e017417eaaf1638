"""Option records more than one command and format share (so each format's own options can hold them
without depending on the package that acts on them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_TOKENS = 8192  # calibration tokens: CPU-friendly; on a GPU, 32k-128k tokens cost little more
DEFAULT_SEQLEN = 512  # tokens per calibration window: llama-imatrix's default context


@dataclass(frozen=True)
class CalibOptions:
    """What calibrates a run (GPTQ, `qwqq imatrix`, --imatrix auto): the text, how much of it, where."""

    text: Path | None = None  # None: the sample that ships with qwqq
    tokens: int = DEFAULT_TOKENS
    seqlen: int = DEFAULT_SEQLEN
    device: str | None = None  # cuda, mps or cpu; None: the first available

    def kwargs(self) -> dict:
        return dict(calib=self.text, calib_tokens=self.tokens, calib_seqlen=self.seqlen, device=self.device)

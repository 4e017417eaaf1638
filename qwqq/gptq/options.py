"""What `qwqq quantize --format gptq` was asked for, checked as it is made."""

from __future__ import annotations

from dataclasses import dataclass, field

from qwqq.options import CalibOptions
from qwqq.errors import QwqqError
from qwqq.gptq.packing import GPTQ_BITS

# As a fraction of the Hessian's mean diagonal, raised automatically when Cholesky fails. 0.05, GPTQModel's default:
# on Qwen2.5-Coder-1.5B at 8192 tokens it gives KLD 0.0537 against 0.0638 at 0.01 (docs/bench-gptq.md).
DEFAULT_DAMP = 0.05


@dataclass(frozen=True)
class GPTQOptions:
    bits: int = 4
    group_size: int = 128  # -1: one group per output channel
    sym: bool = True
    desc_act: bool = False  # act-order: columns by decreasing Hessian diagonal (g_idx a permutation)
    group_aware: bool = True  # GPTQModel's act_group_aware: groups in priority order, static groups kept
    damp: float = DEFAULT_DAMP
    calib: CalibOptions = field(default_factory=CalibOptions)
    threads: int = 0

    def __post_init__(self):
        check_settings(self.bits, self.group_size, self.damp)


def check_settings(bits: int, group_size: int, damp: float) -> None:
    """--bits, --group-size and --damp for GPTQ, one line for a value it cannot take."""
    if bits not in GPTQ_BITS:
        raise QwqqError(f"unknown --bits {bits} for GPTQ; choose one of {', '.join(map(str, GPTQ_BITS))}")
    if group_size != -1 and (group_size < 16 or group_size & (group_size - 1)):
        raise QwqqError(f"--group-size {group_size}: use -1 (per channel) or a power of two >= 16 (128 is usual)")
    if not 0 < damp < 1:
        raise QwqqError(f"--damp {damp}: a fraction of the Hessian's mean diagonal, 0 < damp < 1 ({DEFAULT_DAMP} is usual)")

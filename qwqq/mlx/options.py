"""What `qwqq quantize --format mlx` was asked for, checked as it is made."""

from __future__ import annotations

from dataclasses import dataclass

from qwqq.errors import QwqqError
from qwqq.mlx.quantize import resolve_mlx_options


@dataclass(frozen=True)
class MLXOptions:
    bits: int | None = None  # 2, 3, 4 (default), 5, 6, 8
    group_size: int | None = None  # 32, 64 (default), 128
    mixed: str | None = None  # mlx-lm's mixed recipes: 2_6, 3_4, 3_6, 4_6
    target_size: str | None = None  # bits per module chosen to fill this size ...
    target_bpw: float | None = None  # ... or this many bits per weight

    def __post_init__(self):
        if self.budgeted and (self.bits is not None or self.mixed is not None):
            raise QwqqError("--target-size and --target-bpw choose the bits themselves: drop --bits / --mixed")
        resolve_mlx_options(self.bits, self.group_size, self.mixed)

    @property
    def budgeted(self) -> bool:
        return self.target_size is not None or self.target_bpw is not None

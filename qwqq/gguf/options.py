"""What `qwqq quantize --format gguf` was asked for, checked as it is made (one line for a bad combination)."""

from __future__ import annotations

from dataclasses import dataclass, field

from qwqq.options import CalibOptions
from qwqq.errors import QwqqError
from qwqq.gguf.quantize import resolve_mixture
from qwqq.gguf.types import Mixture


@dataclass(frozen=True)
class Budget:
    """A budget the allocator fills: a file size, bits per weight, or what a hardware profile leaves."""

    target_size: str | None = None  # "19.5GB", "800MB", "20GiB"
    target_bpw: float | None = None
    fit_profile: str | None = None  # rtx-4090, m4-max-64, ...
    fit_ctx: int = 8192  # with fit_profile: the context to leave room for
    fit_kv: str = "f16"  # ... and its KV cache type

    @property
    def given(self) -> bool:
        return self.target_size is not None or self.target_bpw is not None or self.fit_profile is not None


@dataclass(frozen=True)
class GGUFOptions:
    bits: int | None = None
    type_name: str | None = None
    imatrix: str | None = None  # a llama-imatrix file, or "auto" to compute one
    calibrate: bool = False  # --calib given: compute an imatrix from that text (implies --imatrix auto)
    calib: CalibOptions = field(default_factory=CalibOptions)
    budget: Budget = field(default_factory=Budget)
    resume: bool = False
    mtp: bool = True  # keep a hybrid Qwen's multi-token-prediction block (as llama.cpp's converter does)
    mixture: Mixture | None = field(default=None, init=False)  # None with a budget: it chooses the types

    def __post_init__(self):
        if self.budget.given and (self.bits is not None or self.type_name is not None):
            raise QwqqError("--target-size, --target-bpw and --fit choose the types themselves: drop --bits / --type")
        if self.budget.given and self.resume:
            raise QwqqError("--resume is not offered for budget quantization yet: run it again")
        mixture = resolve_mixture(bits=self.bits, type_name=self.type_name,
                                  has_imatrix=self.imatrix is not None or self.calibrate)
        object.__setattr__(self, "mixture", None if self.budget.given else mixture)

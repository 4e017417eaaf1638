"""The runtimes' memory and speed constants fit works with, read from data/backends.toml: llama.cpp's
batch, KV padding and compute-buffer fragmentation, each backend's overhead and safety margin, the
system RAM left to the OS, and the decode-speed model (bandwidth efficiency, how full the context is)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

from qwqq.fit import hardware as hwmod
from qwqq.fit.hardware import GiB
from qwqq.fit.memory import MiB


@dataclass(frozen=True)
class BackendConstants:
    n_ubatch: int = 512
    pad: int = 256
    fragmentation: float = 0.035
    repack_types: frozenset = frozenset({"Q4_0", "Q4_K", "IQ4_NL", "Q2_K"})
    efficiency: float = 0.6
    kv_fill: float = 0.5
    overhead: dict = field(default_factory=dict)  # backend -> bytes
    margin: dict = field(default_factory=dict)  # backend -> bytes
    reserve_fraction: float = 0.10
    reserve_min: int = 2 * GiB
    partial_offload_layers: int = 1

    def ram_budget(self, ram: int) -> int:
        return ram - max(self.reserve_min, int(ram * self.reserve_fraction))


@cache
def backend_constants() -> BackendConstants:
    d = hwmod.backend_data()
    ll, sp, cpu = d["llama"], d["speed"], d["cpu"]
    return BackendConstants(
        n_ubatch=int(ll["n_ubatch"]), pad=int(ll["kv_cell_pad"]), fragmentation=float(ll["compute_fragmentation"]),
        repack_types=frozenset(ll["cpu_repack_types"]), efficiency=float(sp["efficiency"]), kv_fill=float(sp["kv_fill"]),
        overhead={b: int(d[b]["overhead_mib"] * MiB) for b in ("cpu", "cuda", "metal")},
        margin={b: int(d[b].get("margin_mib", 0) * MiB) for b in ("cpu", "cuda", "metal")},
        reserve_fraction=float(cpu["reserve_fraction"]), reserve_min=int(cpu["reserve_min_gib"] * GiB),
        partial_offload_layers=int(d["cuda"]["partial_offload_layers"]),
    )

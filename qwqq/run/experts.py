"""Where a MoE model's routed experts live: `--n-cpu-moe N` / `--cpu-moe` as llama.cpp's own options mean them.

llama.cpp (common/arg.cpp, common/common.h) turns `--n-cpu-moe N` into one tensor buffer-type override per
layer i < N, the regex `blk\\.<i>\\.ffn_(up|down|gate|gate_up)_(ch|)exps` to the CPU buffer type, and
`--cpu-moe` into the same regex without the layer (every layer). The `\\.` after the layer number keeps
`blk.1.` from matching `blk.11.`. Here: the same patterns, the checks on N, and the words for the
placement; qwqq.run.backends.llamacpp_buft hands the patterns to llama.cpp.
"""

from __future__ import annotations

import re

from qwqq.errors import QwqqError
from qwqq.gguf.reader import read_gguf

EXPS_REGEX = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"
ALL = -1  # LoadOptions.n_cpu_moe: every layer's experts (--cpu-moe)


def expert_patterns(n_cpu_moe: int) -> list[str]:
    """The override patterns for the experts of the first `n_cpu_moe` layers (ALL: every layer)."""
    if n_cpu_moe == ALL:
        return [EXPS_REGEX]
    return [rf"blk\.{i}{EXPS_REGEX}" for i in range(n_cpu_moe)]


def requested(n_cpu_moe: int | None, cpu_moe: bool) -> int | None:
    """--n-cpu-moe N / --cpu-moe as one value (ALL for --cpu-moe; None: neither given, fit decides), checked."""
    if cpu_moe and n_cpu_moe is not None:
        raise QwqqError("give --cpu-moe (every layer's experts in RAM) or --n-cpu-moe N, not both")
    if n_cpu_moe is not None and n_cpu_moe < 0:
        raise QwqqError(f"--n-cpu-moe must be 0 or more layers (got {n_cpu_moe}); --cpu-moe keeps every layer's "
                        "experts in RAM")
    return ALL if cpu_moe else n_cpu_moe


def check_layers(n_cpu_moe: int, n_layers: int, expert_tensors: int, path) -> None:
    """One line when N asks for more layers than the model has, or the model has no routed experts."""
    if n_cpu_moe == 0:
        return
    flag = "--cpu-moe" if n_cpu_moe == ALL else f"--n-cpu-moe {n_cpu_moe}"
    if not expert_tensors:
        raise QwqqError(f"{flag}: this model has no MoE expert tensors (ffn_*_exps) to keep in RAM", path)
    if n_cpu_moe > n_layers:
        raise QwqqError(f"--n-cpu-moe {n_cpu_moe}: the model has {n_layers} layers; give 0 to {n_layers} "
                        "(or --cpu-moe for all)", path)


def check_file(path, n_cpu_moe: int) -> None:
    """check_layers against a GGUF's own block_count and expert tensors (its header only)."""
    if not n_cpu_moe:
        return
    g = read_gguf(path)
    names = re.compile(r"^blk\.\d+" + EXPS_REGEX)
    check_layers(n_cpu_moe, int(g.arch_value("block_count", 0) or 0), sum(1 for t in g.tensors if names.search(t.name)),
                 path)


def describe(n_cpu_moe: int) -> str:
    """The placement in words, for start-up and status lines."""
    if n_cpu_moe == ALL:
        return "experts of every layer in RAM"
    if n_cpu_moe:
        return f"experts of the first {n_cpu_moe} layer{'s' if n_cpu_moe != 1 else ''} in RAM"
    return "experts with their layers"

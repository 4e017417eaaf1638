"""How MoE experts are named and stored, and the one splitter of fused expert tensors every writer shares.

On the hub, Qwen3-MoE ships one tensor per expert and projection (`mlp.experts.{e}.{gate,up,down}_proj`);
transformers 5 fuses them in memory (and some checkpoints on disk) as `mlp.experts.gate_up_proj`
[E, 2*ff, hidden] (each expert's gate rows, then its up rows) and `mlp.experts.down_proj` [E, hidden, ff].
GGUF stacks each projection into one 3-D tensor, mlx-lm into `mlp.switch_mlp.{proj}_proj`, GPTQ keeps a
linear per expert. Each of those is built from `fused_rows`.
"""

from __future__ import annotations

import re

from qwqq.errors import SourceError

PROJ = ("gate", "up", "down")
EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
FUSED_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)(\.weight)?$")
PER_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")  # any tensor of one expert (hub, GPTQ)
FUSED_PARAMS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")  # transformers 5's in-memory parameters
FUSED_ON_DISK = re.compile(r"\.mlp\.experts\.(gate_up|down)_proj$")


def expert_weight(layer: int | str, expert: int, proj: str) -> str:
    """The hub's per-expert weight name; `proj` is gate, up or down."""
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}_proj.weight"


def expert_prefix(layer: int | str) -> str:
    return f"model.layers.{layer}.mlp.experts"


def mlx_stacked(layer: int | str, proj: str) -> str:
    """mlx-lm's stacked expert weight (its `sanitize` stacks the per-expert tensors)."""
    return f"model.layers.{layer}.mlp.switch_mlp.{proj}_proj.weight"


MLX_STACKED = ".switch_mlp."  # in an mlx-lm parameter name: a stacked expert weight


def fused_rows(ref, which: str) -> dict[str, list[tuple[int, int]]]:
    """A fused expert tensor seen as a 2-D [E * rows, cols] matrix: for each projection (gate, up or down)
    the source rows [row0, row1) of each expert, in expert order."""
    if len(ref.shape) != 3:
        raise SourceError(f"fused expert tensor {ref.name} should be 3-D, is {ref.shape}", ref.file)
    e, rows, _ = ref.shape
    if which.startswith("down"):
        return {"down": [(i * rows, (i + 1) * rows) for i in range(e)]}
    ff = rows // 2
    return {proj: [(i * rows + k * ff, i * rows + (k + 1) * ff) for i in range(e)]
            for k, proj in enumerate(("gate", "up"))}


def merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Adjacent row ranges joined (a stacked down_proj reads as one range)."""
    out: list[tuple[int, int]] = []
    for r0, r1 in ranges:
        if out and out[-1][1] == r0:
            out[-1] = (out[-1][0], r1)
        else:
            out.append((r0, r1))
    return out

"""MLX bits per module for a budget: `qwqq quantize --format mlx --target-bpw 3.5` (or `--target-size 900MB`).

mlx-lm's config takes (bits, group size) per module, so an MLX folder can mix 2 to 8 bits freely. Which
modules get which is the GGUF budget's problem again (qwqq.budget.allocate), with MLX's own parts:

- measurement: for every module the plan quantizes (not the MoE router, which mlx-lm pins at 8 bits),
  a strided sample of its rows is quantized and dequantized by mlx's own ``mx.quantize`` /
  ``mx.dequantize`` at 2, 3, 4, 5, 6 and 8 bits with the run's group size, and the relative error
  nsr = |w - w_b|^2 / |w|^2 taken (unweighted: MLX quantization is not calibrated). Cached on disk.
- cost: the bytes the plan stores for the module at those bits (packed weight, scales and biases).
- loss: nsr times the module's category weight (lm_head 32, v_proj and down_proj 2, the rest 1;
  a tied embedding is the output layer), the weights the GGUF budget uses.
- allocation: qwqq.budget.allocate.choose (convex hulls, efficiency-ordered steps).

The result is a dict of plan overrides (module -> (bits, group size)) for quantize_to_mlx; the plan
made with them is the folder written, so its size is known before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwqq.errors import QwqqError
from qwqq.budget.allocate import CATEGORY_WEIGHT, Allocation, choose
from qwqq.mlx.plan import MLX_BITS, MLXPlan, MLXTensorPlan
from qwqq.budget.sensitivity import sample_rows_of
from qwqq.cache import cache_path, identity, read_cached, write_cached
from qwqq.mlx.writer import is_tied, layout, plan_mlx
from qwqq.source import Checkpoint, RowReader, checkpoint_of

SAMPLE_ROWS = 256
VERSION = 1
# mlx-lm module name -> the GGUF category whose weight it takes (first match wins)
MLX_CATEGORY = (("lm_head", "output"), ("embed_tokens", "token_embd"), ("v_proj", "attn_v"), ("down_proj", "ffn_down"))
ROUTER_SUFFIX = "mlp.gate"  # the MoE router: mlx-lm's fixed 8 bits, not the allocator's


def category_weight(module: str, tied: bool) -> float:
    for needle, cat in MLX_CATEGORY:
        if needle in module:
            if cat == "token_embd" and tied:
                cat = "output"
            return CATEGORY_WEIGHT.get(cat, 1.0)
    return 1.0


def mlx_nsr(rows: np.ndarray, group_size: int, bits_ladder=MLX_BITS) -> dict[int, float]:
    """Relative error of these rows after mlx's own affine quantization at each width."""
    import mlx.core as mx

    w = mx.array(rows.astype(np.float32))
    signal = float((rows.astype(np.float64) ** 2).sum()) or 1e-30
    out = {}
    for bits in bits_ladder:
        wq, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
        back = np.array(mx.dequantize(wq, scales, biases, group_size=group_size, bits=bits), dtype=np.float64)
        out[bits] = float(((rows - back) ** 2).sum()) / signal
    return out


def _cache_file(ckpt: Checkpoint, group_size: int, sample_rows: int) -> Path:
    return cache_path({"v": VERSION, "format": "mlx", "model": identity(ckpt.root), "group": group_size,
                       "rows": sample_rows, "ladder": list(MLX_BITS)}, prefix="mlx-")


def allocatable(plan: MLXPlan) -> list[MLXTensorPlan]:
    return [t for t in plan.tensors if t.quantized and not t.module.endswith(ROUTER_SUFFIX)]


def measure_mlx(ckpt: Checkpoint, sources, plan: MLXPlan, *, sample_rows: int = SAMPLE_ROWS,
                use_cache: bool = True, tick=None) -> dict[str, dict[int, float]]:
    """{module: {bits: nsr}} for every module the allocator chooses bits for (cached)."""
    cache = _cache_file(ckpt, plan.group_size, sample_rows)
    data = read_cached(cache) if use_cache else None
    if isinstance(data, dict) and all(isinstance(e, dict) for e in data.values()):
        return {m: {int(b): v for b, v in e.items()} for m, e in data.items()}
    by_name = {s.name: s for s in sources}
    errors = {}
    with RowReader() as reader:
        for t in allocatable(plan):
            rows, _ = sample_rows_of(by_name[t.name], reader, sample_rows)
            errors[t.module] = mlx_nsr(rows, plan.group_size)
            if tick:
                tick()
    if use_cache:
        write_cached(cache, errors)
    return errors


@dataclass
class MLXBudget:
    overrides: dict[str, tuple[int, int]]  # module -> (bits, group size), for quantize_to_mlx
    allocation: Allocation
    plan: MLXPlan  # the plan with the overrides: the folder that will be written
    predicted_bytes: int  # of the safetensors files (headers included)
    note: str

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.plan.tensor_bytes / max(1, self.plan.n_params)


def plan_mlx_budget(source, *, group_size: int = 64, target_bytes: int | None = None,
                    target_bpw: float | None = None, tick=None) -> MLXBudget:
    """Bits per module that fill `target_bytes` (the safetensors files) or `target_bpw` (8 x tensor bytes
    / parameters, as MLXResult.bits_per_weight counts it) with the least predicted loss."""
    if (target_bytes is None) == (target_bpw is None):
        raise QwqqError("give one of --target-size or --target-bpw")
    if target_bpw is not None and not 2 <= target_bpw <= 16:
        raise QwqqError(f"--target-bpw {target_bpw}: MLX stores 2 to 8 bits a weight (plus scales): give 2 to 16")
    ckpt = checkpoint_of(source)
    _, sources, base = plan_mlx(ckpt, 4, group_size)
    errors = measure_mlx(ckpt, sources, base, tick=tick)
    tied = is_tied(ckpt)
    chosen = allocatable(base)
    fixed = sum(t.nbytes for t in base.tensors if t not in chosen)
    options = {}
    for t in chosen:
        k = category_weight(t.module, tied)
        options[t.module] = [(MLXTensorPlan(t.name, t.shape, t.dtype, b, group_size).nbytes, k * err, b)
                             for b, err in errors[t.module].items()]
    if target_bpw is not None:
        budget = int(target_bpw * base.n_params / 8) - fixed
        note = f"{target_bpw} bits per weight"
    else:
        budget = target_bytes - fixed
        note = f"at most {target_bytes / 1e9:.3f} GB of safetensors"
    for _ in range(8):  # target_bytes counts the safetensors headers too: take their size off and try again
        alloc = choose(options, budget, describe=lambda b: f"{b}-bit")
        overrides = {m: (int(b), group_size) for m, b in alloc.types.items()}
        plan = plan_mlx(ckpt, 4, group_size, None, overrides)[2]
        predicted = layout(plan).total_bytes
        over = predicted - target_bytes if target_bytes is not None else 0
        if over <= 0:
            break
        budget = alloc.tensor_bytes - over  # below what was allocated: the next allocation is strictly smaller
    else:
        raise QwqqError(f"could not fit the safetensors headers into --target-size ({target_bytes} bytes)")
    return MLXBudget(overrides, alloc, plan, predicted, note)

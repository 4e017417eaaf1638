"""The MLX plan: which module of an MLX folder gets which (bits, group size), and its bytes.

Which module gets which (bits, group size) in an MLX folder, re-derived from mlx-lm's quantize_model
(mlx_lm/utils.py), its mixed recipes (mixed_quant_predicate_builder in mlx_lm/convert.py) and the
MoE models' own predicate (router gate at 8 bits, group 64). Names are mlx-lm's parameter
names (the Hugging Face names, experts stacked per projection as mlx-lm stacks them).

A quantized module stores three arrays: `weight` (uint32, `bits` values packed per 32-bit word along
the last axis), `scales` and `biases` (one per group of `group_size`, in the weight's float dtype):
w = scale * q + bias per group. Everything else is stored as is, in its float dtype.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from math import prod

MLX_BITS = (2, 3, 4, 5, 6, 8)
MLX_GROUP_SIZES = (32, 64, 128)
MLX_RECIPES = {"2_6": (2, 6), "3_4": (3, 4), "3_6": (3, 6), "4_6": (4, 6)}  # low bits, high bits
MLX_FLOAT_BYTES = {"BF16": 2, "F16": 2, "F32": 4}
MLX_ROUTER = {"group_size": 64, "bits": 8}  # mlx-lm's MoE predicate for the router `mlp.gate` (no "mode" key, as mlx-lm)
MLX_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")  # a decoder layer's index in an mlx-lm module path


@dataclass(frozen=True)
class MLXTensorPlan:
    """One parameter of the mlx-lm model: stored as is (bits None) or as weight/scales/biases."""

    name: str  # e.g. model.layers.0.self_attn.q_proj.weight
    shape: tuple[int, ...]  # logical shape, numpy order: (experts?, out, in)
    dtype: str  # float dtype stored (the tensor itself, or its scales and biases): BF16, F16, F32
    bits: int | None = None
    group_size: int | None = None
    config_entry: dict | None = None  # the per-module override mlx-lm writes to config "quantization"
    counted: bool = True  # in mlx-lm's parameter count (False: held by a module with children, e.g. A_log)

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[0]

    def arrays(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, safetensors dtype, shape) of every array stored for this parameter."""
        if not self.quantized:
            return [(self.name, self.dtype, self.shape)]
        *lead, cols = self.shape
        return [
            (self.name, "U32", (*lead, cols * self.bits // 32)),
            (f"{self.module}.scales", self.dtype, (*lead, cols // self.group_size)),
            (f"{self.module}.biases", self.dtype, (*lead, cols // self.group_size)),
        ]

    @property
    def nbytes(self) -> int:
        return sum(prod(shape) * (4 if dt == "U32" else MLX_FLOAT_BYTES[dt]) for _, dt, shape in self.arrays())


@dataclass
class MLXPlan:
    bits: int
    group_size: int
    recipe: str | None
    tensors: list[MLXTensorPlan] = field(default_factory=list)

    @property
    def tensor_bytes(self) -> int:
        """Bytes of all stored arrays: what the safetensors shards hold besides their headers."""
        return sum(t.nbytes for t in self.tensors)

    @property
    def n_params(self) -> int:
        """Parameters as mlx-lm counts them (get_total_parameters: those of leaf modules)."""
        return sum(prod(t.shape) for t in self.tensors if t.counted)

    @property
    def quantization(self) -> dict:
        """config.json's "quantization" block (mlx-lm mirrors it as "quantization_config")."""
        q: dict = {"group_size": self.group_size, "bits": self.bits, "mode": "affine"}
        for t in self.tensors:
            if t.config_entry is not None:
                q[t.module] = dict(t.config_entry)
        return q

    def arrays(self) -> list[tuple[str, str, tuple[int, ...]]]:
        return [a for t in self.tensors for a in t.arrays()]

    def by_name(self) -> dict[str, MLXTensorPlan]:
        return {t.name: t for t in self.tensors}


def mlx_quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """A Linear, Embedding or SwitchLinear weight (what mlx's nn.quantize reaches): 2-D or 3-D `.weight`.
    Norms and biases are 1-D. Holds for the architectures qwqq supports."""
    return name.endswith(".weight") and len(shape) >= 2


def mlx_more_bits(layer: int, n_layer: int) -> bool:
    """The layers a mixed recipe gives more bits (llama.cpp's use_more_bits, as mlx-lm's recipes use it)."""
    return layer < n_layer // 8 or layer >= 7 * n_layer // 8 or (layer - n_layer // 8) % 3 == 2


def _mlx_recipe_bits(module: str, recipe: str, n_layer: int) -> int:
    low, high = MLX_RECIPES[recipe]
    m = MLX_LAYER.search(module + ".")
    more = mlx_more_bits(int(m.group(1)) if m else 0, n_layer)
    if ("v_proj" in module or "v_a_proj" in module or "v_b_proj" in module) and more:
        return high
    if "down_proj" in module and more:
        return high
    if "lm_head" in module:
        return high
    return low


def make_mlx_plan(
    tensors: list[tuple[str, tuple[int, ...], str]],
    *,
    n_layer: int,
    bits: int = 4,
    group_size: int = 64,
    recipe: str | None = None,
    moe_router: bool = False,
    overrides: dict[str, tuple[int, int] | None] | None = None,
    routers: tuple[str, ...] | None = None,
    unquantized: tuple[str, ...] = (),
    uncounted: tuple[str, ...] = (),
) -> MLXPlan:
    """Per-parameter (bits, group size) for an MLX folder, exactly as mlx_lm.convert decides it.

    `tensors` are (mlx-lm parameter name, logical shape, float dtype stored). `recipe` is one of
    MLX_RECIPES ("3_6" is mlx-lm's mixed_3_6); `moe_router` applies qwen3_moe's rule (router gate at
    8 bits, group 64), which mlx-lm uses only when no recipe is given; `routers` names the modules (by
    suffix) that rule pins instead (the hybrids' predicate adds `shared_expert_gate`). `unquantized`:
    weights (by suffix) of modules mlx's nn.quantize does not reach (a Conv1d); `uncounted`: parameters
    (by suffix) mlx-lm's parameter count leaves out (not a leaf module's). `overrides` maps a
    module path to (bits, group_size), or None to keep it unquantized, ahead of every other rule.

    mlx-lm's rules: a weight whose row length is not a multiple of `group_size` stays unquantized
    (checked against the global group size, whatever the module's own); a rule that returns explicit
    parameters is recorded per module in config.json; the plain default is not.
    """
    if bits not in MLX_BITS:
        raise ValueError(f"MLX bits must be one of {MLX_BITS}, not {bits}")
    if group_size not in MLX_GROUP_SIZES:
        raise ValueError(f"MLX group size must be one of {MLX_GROUP_SIZES}, not {group_size}")
    if recipe is not None and recipe not in MLX_RECIPES:
        raise ValueError(f"MLX recipe must be one of {', '.join(MLX_RECIPES)}, not {recipe!r}")
    plan = MLXPlan(bits, group_size, recipe)
    routers = tuple(routers) if routers is not None else ("mlp.gate",) if moe_router else ()
    for name, shape, dtype in tensors:
        shape = tuple(int(s) for s in shape)
        if dtype not in MLX_FLOAT_BYTES:
            raise ValueError(f"{name}: dtype {dtype} is not one of {', '.join(MLX_FLOAT_BYTES)}")
        module = name.rsplit(".", 1)[0]
        if not mlx_quantizable(name, shape) or shape[-1] % group_size or (unquantized and name.endswith(unquantized)):
            plan.tensors.append(MLXTensorPlan(name, shape, dtype))
            continue
        if overrides and module in overrides:
            o = overrides[module]
            if o is None:
                plan.tensors.append(MLXTensorPlan(name, shape, dtype))
                continue
            b, g = o
            entry = {"group_size": g, "bits": b, "mode": "affine"}
        elif recipe is not None:
            b, g = _mlx_recipe_bits(module, recipe, n_layer), group_size
            entry = {"group_size": g, "bits": b, "mode": "affine"}
        elif routers and module.endswith(routers):
            b, g = MLX_ROUTER["bits"], MLX_ROUTER["group_size"]
            entry = dict(MLX_ROUTER)
        else:
            b, g, entry = bits, group_size, None
        if b not in MLX_BITS or g not in MLX_GROUP_SIZES:
            raise ValueError(f"{module}: {b} bits with group size {g} is not an MLX affine quantization")
        if shape[-1] % g:  # only an override or the router's fixed group can get here
            plan.tensors.append(MLXTensorPlan(name, shape, dtype))
            continue
        plan.tensors.append(MLXTensorPlan(name, shape, dtype, b, g, entry))
    if uncounted:
        plan.tensors = [replace(t, counted=False) if t.name.endswith(uncounted) else t for t in plan.tensors]
    return plan

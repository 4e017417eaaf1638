"""The quantization plan: which GGUF tensor gets which ggml type, and how many bytes it takes.

A pure function of tensor names, shapes and a handful of model hyper-parameters. quantize executes
the plan; fit sums it. It re-derives llama.cpp's per-tensor policy (llama_tensor_get_type in
src/llama-quant.cpp) so that a qwqq Q4_K_M is tensor for tensor the Q4_K_M that llama-quantize
writes, including the fall-backs for rows that are not a multiple of the block size.

Tensors are visited in llama.cpp's order (global tensors by name, then block 0, 1, ... each by name),
because several rules count attn_v / ffn_down tensors in that order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from math import prod

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, LlamaFileType as FT

from qwqq.archs import Arch, cfg

# --------------------------------------------------------------------------- mixtures
# name -> (llama_ftype, default tensor type). The default type is what every quantizable tensor
# gets before the per-category rules below raise or lower it.


@dataclass(frozen=True)
class Mixture:
    name: str
    ftype: FT
    default: T
    needs_imatrix: bool = False  # the mixture's main type refuses to run without an importance matrix
    description: str = ""


_MIXTURES = [
    Mixture("F32", FT.ALL_F32, T.F32, description="full precision"),
    Mixture("F16", FT.MOSTLY_F16, T.F16, description="half precision"),
    Mixture("BF16", FT.MOSTLY_BF16, T.BF16, description="bfloat16, lossless from bf16 sources"),
    Mixture("Q8_0", FT.MOSTLY_Q8_0, T.Q8_0, description="8.5 bpw, near lossless"),
    Mixture("Q6_K", FT.MOSTLY_Q6_K, T.Q6_K, description="6.56 bpw"),
    Mixture("Q5_K_M", FT.MOSTLY_Q5_K_M, T.Q5_K),
    Mixture("Q5_K_S", FT.MOSTLY_Q5_K_S, T.Q5_K),
    Mixture("Q5_1", FT.MOSTLY_Q5_1, T.Q5_1),
    Mixture("Q5_0", FT.MOSTLY_Q5_0, T.Q5_0),
    Mixture("Q4_K_M", FT.MOSTLY_Q4_K_M, T.Q4_K, description="the usual default"),
    Mixture("Q4_K_S", FT.MOSTLY_Q4_K_S, T.Q4_K),
    Mixture("Q4_1", FT.MOSTLY_Q4_1, T.Q4_1),
    Mixture("Q4_0", FT.MOSTLY_Q4_0, T.Q4_0),
    Mixture("IQ4_XS", FT.MOSTLY_IQ4_XS, T.IQ4_XS),
    Mixture("IQ4_NL", FT.MOSTLY_IQ4_NL, T.IQ4_NL),
    Mixture("Q3_K_L", FT.MOSTLY_Q3_K_L, T.Q3_K),
    Mixture("Q3_K_M", FT.MOSTLY_Q3_K_M, T.Q3_K),
    Mixture("Q3_K_S", FT.MOSTLY_Q3_K_S, T.Q3_K),
    Mixture("IQ3_M", FT.MOSTLY_IQ3_M, T.IQ3_S),
    Mixture("IQ3_S", FT.MOSTLY_IQ3_S, T.IQ3_S),
    Mixture("IQ3_XS", FT.MOSTLY_IQ3_XS, T.IQ3_S),
    Mixture("IQ3_XXS", FT.MOSTLY_IQ3_XXS, T.IQ3_XXS, needs_imatrix=True),
    Mixture("Q2_K", FT.MOSTLY_Q2_K, T.Q2_K),
    Mixture("Q2_K_S", FT.MOSTLY_Q2_K_S, T.Q2_K, needs_imatrix=True),
    Mixture("IQ2_M", FT.MOSTLY_IQ2_M, T.IQ2_S, needs_imatrix=True),
    Mixture("IQ2_S", FT.MOSTLY_IQ2_S, T.IQ2_XS, needs_imatrix=True),
    Mixture("IQ2_XS", FT.MOSTLY_IQ2_XS, T.IQ2_XS, needs_imatrix=True),
    Mixture("IQ2_XXS", FT.MOSTLY_IQ2_XXS, T.IQ2_XXS, needs_imatrix=True),
    Mixture("IQ1_M", FT.MOSTLY_IQ1_M, T.IQ1_M, needs_imatrix=True),
    Mixture("IQ1_S", FT.MOSTLY_IQ1_S, T.IQ1_S, needs_imatrix=True),
]
MIXTURES: dict[str, Mixture] = {m.name: m for m in _MIXTURES}

BITS_TO_MIXTURE = {2: "Q2_K", 3: "Q3_K_M", 4: "Q4_K_M", 5: "Q5_K_M", 6: "Q6_K", 8: "Q8_0"}

# Types whose ggml kernel refuses to run without an importance matrix (ggml_quantize_requires_imatrix).
IMATRIX_TYPES = {T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS}

# Where a row length is not a multiple of a type's block, llama.cpp demotes to a 32-wide type
# (tensor_type_fallback); if even that does not divide the row, the tensor is stored F16.
FALLBACK = {
    T.IQ1_S: T.IQ4_NL, T.IQ1_M: T.IQ4_NL, T.IQ2_XXS: T.IQ4_NL, T.IQ2_XS: T.IQ4_NL, T.IQ2_S: T.IQ4_NL,
    T.IQ3_XXS: T.IQ4_NL, T.IQ3_S: T.IQ4_NL, T.IQ4_XS: T.IQ4_NL,
    T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.TQ1_0: T.Q4_0, T.TQ2_0: T.Q4_0,
    T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0,
}

FLOAT_TYPES = {T.F32, T.F16, T.BF16}


def block_size(t: T) -> int:
    return GGML_QUANT_SIZES[t][0]


def row_bytes(t: T, n_per_row: int) -> int:
    """Bytes of one row of n_per_row elements stored as type t (ggml_row_size)."""
    blck, type_size = GGML_QUANT_SIZES[t]
    if n_per_row % blck:
        raise ValueError(f"row of {n_per_row} is not a multiple of the {t.name} block ({blck})")
    return n_per_row // blck * type_size


def tensor_bytes(t: T, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor with numpy-order shape (..., rows, n_per_row) stored as t."""
    return prod(shape[:-1]) * row_bytes(t, shape[-1])


# --------------------------------------------------------------------------- model facts


@dataclass(frozen=True)
class ModelFacts:
    """The few hyper-parameters llama.cpp's policy looks at."""

    arch: str  # GGUF architecture name: qwen2, qwen3, qwen3moe, llama
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0
    is_70b: bool = False  # llama.cpp's LLM_TYPE_70B: 8 heads share attn_v, which it bumps a notch

    @property
    def n_gqa(self) -> int:
        return self.n_head // max(1, self.n_head_kv)


def model_facts(config: dict, arch: Arch) -> ModelFacts:
    n_layer = int(config["num_hidden_layers"])
    n_head = int(config["num_attention_heads"])
    n_kv = int(cfg(config, "num_key_value_heads", default=n_head))
    n_expert = arch.n_expert(config)
    is_70b = arch.seventy_b_layers == n_layer and (not arch.seventy_b_needs_gqa or n_head != n_kv)
    return ModelFacts(arch.name, n_layer, n_head, n_kv, n_expert, is_70b)



@dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...]  # numpy order: (experts?, rows, n_per_row)
    type: T
    nbytes: int
    quantized: bool  # converted by a kernel (not a plain copy / float cast)
    fallback_from: T | None = None  # set when the row length forced a demotion
    needs_imatrix: bool = False


@dataclass
class Plan:
    mixture: Mixture
    tensors: list[TensorPlan] = field(default_factory=list)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def n_params(self) -> int:
        return sum(prod(t.shape) for t in self.tensors)

    def by_name(self) -> dict[str, TensorPlan]:
        return {t.name: t for t in self.tensors}


# --------------------------------------------------------------------------- tensor categories

_BLK = re.compile(r"^blk\.(\d+)\.")


def llama_order(name: str) -> tuple[int, str]:
    """Sort key of llama.cpp's weights_map: by block number (globals first), then by name."""
    m = _BLK.match(name)
    return (int(m.group(1)) if m else -1, name)


def category(name: str) -> str:
    """llama.cpp's broad tensor category (tensor_get_category), first match wins."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for needle, cat in _CATEGORY_NEEDLES:
        if needle in name:
            return cat
    return "other"


_CATEGORY_NEEDLES = [
    ("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"), ("attn_v.weight", "attn_v"),
    ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
    ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down"),
]
_ATTN_V_LIKE = {"attn_v", "attn_qkv", "attn_kv_b"}


def allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    """Which tensors are ever quantized: 2-D/3-D weights, but not norms or the MoE router."""
    return (
        len(shape) >= 2
        and name.endswith("weight")
        and "_norm.weight" not in name
        and "ffn_gate_inp.weight" not in name
    )


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


# --------------------------------------------------------------------------- the policy
class _Counters:
    def __init__(self, n_attn_v: int, n_layer: int, tied: bool):
        self.n_attn_v, self.i_attn_v = n_attn_v, 0
        self.n_ffn = n_layer
        self.i_ffn_down = self.i_ffn_gate = self.i_ffn_up = 0
        self.tied = tied


def _layer(name: str, counter: int, n: int, facts: ModelFacts) -> tuple[int, int]:
    if facts.n_expert > 1:
        m = _BLK.match(name)
        if not m:
            raise ValueError(f"cannot tell the layer of {name}")
        return int(m.group(1)), n
    return counter, n


_IQ2_FAMILY = {FT.MOSTLY_IQ2_XXS, FT.MOSTLY_IQ2_XS, FT.MOSTLY_IQ1_S, FT.MOSTLY_IQ2_S, FT.MOSTLY_IQ2_M, FT.MOSTLY_IQ1_M}


def _policy(name: str, shape, cat: str, t: T, ft: FT, f: ModelFacts, c: _Counters, has_imatrix: bool) -> T:
    """Port of llama_tensor_get_type_impl for the architectures qwqq supports."""
    if cat == "output" or (c.tied and cat == "token_embd"):
        nx = shape[-1]
        if nx % block_size(t):
            return T.Q8_0
        if ft in (FT.MOSTLY_IQ2_XXS, FT.MOSTLY_IQ2_XS, FT.MOSTLY_IQ3_XXS, FT.MOSTLY_IQ1_S, FT.MOSTLY_IQ2_S,
                  FT.MOSTLY_IQ2_M, FT.MOSTLY_IQ1_M):
            return T.Q5_K
        return t if t == T.Q8_0 else T.Q6_K

    if cat == "token_embd":
        if ft in (FT.MOSTLY_IQ2_XXS, FT.MOSTLY_IQ2_XS, FT.MOSTLY_IQ1_S, FT.MOSTLY_IQ1_M):
            return T.Q2_K
        if ft in (FT.MOSTLY_IQ2_S, FT.MOSTLY_IQ2_M, FT.MOSTLY_IQ3_XXS):
            return T.IQ3_S
        return t

    if ft in _IQ2_FAMILY:
        s_or_m = ft in (FT.MOSTLY_IQ2_S, FT.MOSTLY_IQ2_M)
        if cat in _ATTN_V_LIKE:
            t = T.Q4_K if (f.n_gqa >= 4 or f.n_expert >= 4) else (T.IQ3_S if s_or_m else T.Q2_K)
            c.i_attn_v += 1
        elif f.n_expert == 8 and cat == "attn_k":
            t = T.Q4_K
        elif cat == "ffn_down":
            if c.i_ffn_down < c.n_ffn // 8:
                t = T.IQ3_S if s_or_m else T.Q2_K
            c.i_ffn_down += 1
        elif cat == "attn_output":
            if f.n_expert == 8:
                t = T.Q5_K
            elif ft in (FT.MOSTLY_IQ1_S, FT.MOSTLY_IQ1_M):
                t = T.IQ2_XXS
            elif s_or_m:
                t = T.IQ3_S
        return t

    if cat in _ATTN_V_LIKE:
        gqa4 = f.n_gqa >= 4
        if ft == FT.MOSTLY_Q2_K:
            t = T.Q4_K if gqa4 else T.Q3_K
        elif ft == FT.MOSTLY_Q2_K_S and gqa4:
            t = T.Q4_K
        elif ft == FT.MOSTLY_IQ3_XXS:
            t = T.Q4_K if gqa4 else (T.IQ3_S if not has_imatrix else T.IQ3_XXS)
        elif ft in (FT.MOSTLY_IQ3_XS, FT.MOSTLY_IQ3_S) and gqa4:
            t = T.Q4_K
        elif ft == FT.MOSTLY_IQ3_M:
            t = T.Q4_K
        elif ft == FT.MOSTLY_Q3_K_M:
            t = T.Q5_K if c.i_attn_v < 2 else T.Q4_K
        elif ft == FT.MOSTLY_Q3_K_L:
            t = T.Q5_K
        elif ft in (FT.MOSTLY_IQ4_NL, FT.MOSTLY_IQ4_XS) and gqa4:
            t = T.Q5_K
        elif ft in (FT.MOSTLY_Q4_K_M, FT.MOSTLY_Q5_K_M) and _more_bits(c.i_attn_v, c.n_attn_v):
            t = T.Q6_K
        elif ft == FT.MOSTLY_Q4_K_S and c.i_attn_v < 4:
            t = T.Q5_K
        if f.is_70b and t in (T.Q3_K, T.Q4_K):
            t = T.Q5_K
        if f.n_expert == 8:
            t = T.Q8_0
        c.i_attn_v += 1
        return t

    if cat == "attn_k":
        if f.n_expert == 8:
            return T.Q8_0
        if ft == FT.MOSTLY_IQ3_XS:
            return T.IQ3_XXS
        if ft == FT.MOSTLY_IQ3_XXS:
            return T.IQ2_S
        return t

    if cat == "attn_q":
        if ft == FT.MOSTLY_IQ3_XS:
            return T.IQ3_XXS
        if ft == FT.MOSTLY_IQ3_XXS:
            return T.IQ2_S
        return t

    if cat == "ffn_down":
        i, n = _layer(name, c.i_ffn_down, c.n_ffn, f)
        if ft == FT.MOSTLY_Q2_K:
            t = T.Q3_K
        elif ft == FT.MOSTLY_Q2_K_S:
            if i < n // 8:
                t = T.Q4_K
        elif ft == FT.MOSTLY_IQ3_XXS and not has_imatrix:
            t = T.Q4_K if i < n // 8 else T.Q3_K
        elif ft == FT.MOSTLY_Q3_K_M:
            # llama.cpp: i < n/16 ? Q5_K : (arch != FALCON || more_bits) ? Q4_K : Q3_K; no Falcon here
            t = T.Q5_K if i < n // 16 else T.Q4_K
        elif ft == FT.MOSTLY_IQ3_M and (i < n // 8 or (f.n_expert == 8 and _more_bits(i, n))):
            t = T.Q4_K
        elif ft == FT.MOSTLY_Q3_K_L:
            t = T.Q5_K
        elif ft == FT.MOSTLY_Q4_K_M:
            if _more_bits(i, n):
                t = T.Q6_K
        elif i < n // 8 and ft in (FT.MOSTLY_IQ4_NL, FT.MOSTLY_IQ4_XS) and not has_imatrix:
            t = T.Q5_K
        elif ft == FT.MOSTLY_Q5_K_M and _more_bits(i, n):
            t = T.Q6_K
        elif ft == FT.MOSTLY_Q4_K_S and i < n // 8:
            t = T.Q5_K
        elif ft in (FT.MOSTLY_Q4_0, FT.MOSTLY_Q5_0) and has_imatrix and i < n // 8:
            t = T.Q4_1 if ft == FT.MOSTLY_Q4_0 else T.Q5_1
        c.i_ffn_down += 1
        return t

    if cat == "attn_output":
        if f.n_expert == 8:
            if ft in (FT.MOSTLY_Q2_K, FT.MOSTLY_IQ3_XS, FT.MOSTLY_IQ3_XXS, FT.MOSTLY_Q3_K_S, FT.MOSTLY_Q3_K_M,
                      FT.MOSTLY_IQ4_NL, FT.MOSTLY_Q4_K_S, FT.MOSTLY_Q4_K_M, FT.MOSTLY_IQ3_S, FT.MOSTLY_IQ3_M,
                      FT.MOSTLY_IQ4_XS):
                return T.Q5_K
            return t
        return {FT.MOSTLY_Q2_K: T.Q3_K, FT.MOSTLY_IQ3_XXS: T.IQ3_S, FT.MOSTLY_Q3_K_M: T.Q4_K,
                FT.MOSTLY_Q3_K_L: T.Q5_K, FT.MOSTLY_IQ3_M: T.Q4_K}.get(ft, t)

    if cat == "attn_qkv":
        if ft in (FT.MOSTLY_Q3_K_M, FT.MOSTLY_Q3_K_L, FT.MOSTLY_IQ3_M):
            return T.Q4_K
        return {FT.MOSTLY_Q4_K_M: T.Q5_K, FT.MOSTLY_Q5_K_M: T.Q6_K}.get(ft, t)

    if cat in ("ffn_gate", "ffn_up"):
        attr = "i_ffn_gate" if cat == "ffn_gate" else "i_ffn_up"
        i, n = _layer(name, getattr(c, attr), c.n_ffn, f)
        if ft == FT.MOSTLY_IQ3_XS and n // 8 <= i < 7 * n // 8:
            t = T.IQ3_XXS
        setattr(c, attr, getattr(c, attr) + 1)
        return t

    return t


def _fallback(shape, t: T) -> tuple[T, T | None]:
    ncols = shape[-1]
    if ncols % block_size(t) == 0:
        return t, None
    if t in FALLBACK:
        new = FALLBACK[t]
    elif block_size(t) <= 32:
        new = t
    else:
        raise ValueError(f"no fallback type for {t.name}")
    if ncols % block_size(new):
        new = T.F16
    return new, t


def make_plan(
    tensors: list[tuple[str, tuple[int, ...]]],
    facts: ModelFacts,
    mixture: Mixture | str,
    *,
    has_imatrix: bool = False,
    overrides: dict[str, T] | None = None,
) -> Plan:
    """Per-tensor types for one mixture. `tensors` are (GGUF name, numpy-order shape)."""
    mix = MIXTURES[mixture] if isinstance(mixture, str) else mixture
    ordered = sorted(tensors, key=lambda nt: llama_order(nt[0]))
    names = {n for n, _ in ordered}
    counters = _Counters(
        n_attn_v=sum(category(n) in _ATTN_V_LIKE for n in names),
        n_layer=facts.n_layer,
        tied="output.weight" not in names,
    )
    plan = Plan(mix)
    for name, shape in ordered:
        shape = tuple(int(s) for s in shape)
        fallback_from = None
        if mix.default == T.F32 or not allows_quantization(name, shape):
            t, quantized = T.F32, False
        elif mix.default in FLOAT_TYPES:
            t, quantized = mix.default, False
        else:
            t = overrides[name] if overrides and name in overrides else _policy(
                name, shape, category(name), mix.default, mix.ftype, facts, counters, has_imatrix)
            t, fallback_from = _fallback(shape, t)
            quantized = t not in FLOAT_TYPES
        needs = quantized and t in IMATRIX_TYPES and category(name) not in ("token_embd", "output")
        if quantized and t == T.Q2_K and mix.ftype == FT.MOSTLY_Q2_K_S and category(name) not in ("token_embd", "output"):
            needs = True
        plan.tensors.append(TensorPlan(name, shape, t, tensor_bytes(t, shape), quantized, fallback_from, needs))
    return plan


# =========================================================================== MLX (mlx-lm's layout)
# Which module gets which (bits, group size) in an MLX folder, re-derived from mlx-lm's quantize_model
# (mlx_lm/utils.py), its mixed recipes (mixed_quant_predicate_builder in mlx_lm/convert.py) and the
# qwen3_moe model's own predicate (router gate at 8 bits, group 64). Names are mlx-lm's parameter
# names (the Hugging Face names, experts stacked per projection as mlx-lm stacks them).
#
# A quantized module stores three arrays: `weight` (uint32, `bits` values packed per 32-bit word along
# the last axis), `scales` and `biases` (one per group of `group_size`, in the weight's float dtype):
# w = scale * q + bias per group. Everything else is stored as is, in its float dtype.

MLX_BITS = (2, 3, 4, 5, 6, 8)
MLX_GROUP_SIZES = (32, 64, 128)
MLX_RECIPES = {"2_6": (2, 6), "3_4": (3, 4), "3_6": (3, 6), "4_6": (4, 6)}  # low bits, high bits
MLX_FLOAT_BYTES = {"BF16": 2, "F16": 2, "F32": 4}
MLX_ROUTER = {"group_size": 64, "bits": 8}  # qwen3_moe's predicate for `mlp.gate` (no "mode" key, as mlx-lm)

_MLX_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class MLXTensorPlan:
    """One parameter of the mlx-lm model: stored as is (bits None) or as weight/scales/biases."""

    name: str  # e.g. model.layers.0.self_attn.q_proj.weight
    shape: tuple[int, ...]  # logical shape, numpy order: (experts?, out, in)
    dtype: str  # float dtype stored (the tensor itself, or its scales and biases): BF16, F16, F32
    bits: int | None = None
    group_size: int | None = None
    config_entry: dict | None = None  # the per-module override mlx-lm writes to config "quantization"

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
        return sum(prod(t.shape) for t in self.tensors)

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
    m = _MLX_LAYER.match(module + ".")
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
) -> MLXPlan:
    """Per-parameter (bits, group size) for an MLX folder, exactly as mlx_lm.convert decides it.

    `tensors` are (mlx-lm parameter name, logical shape, float dtype stored). `recipe` is one of
    MLX_RECIPES ("3_6" is mlx-lm's mixed_3_6); `moe_router` applies qwen3_moe's rule (router gate at
    8 bits, group 64), which mlx-lm uses only when no recipe is given. `overrides` maps a module path
    to (bits, group_size), or None to keep it unquantized, ahead of every other rule.

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
    for name, shape, dtype in tensors:
        shape = tuple(int(s) for s in shape)
        if dtype not in MLX_FLOAT_BYTES:
            raise ValueError(f"{name}: dtype {dtype} is not one of {', '.join(MLX_FLOAT_BYTES)}")
        module = name.rsplit(".", 1)[0]
        if not mlx_quantizable(name, shape) or shape[-1] % group_size:
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
        elif moe_router and module.endswith("mlp.gate"):
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
    return plan

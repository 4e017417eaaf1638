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

from gguf import GGMLQuantizationType as T, LlamaFileType as FT

from qwqq.archs import Arch, cfg, hparams
from qwqq.gguf.types import FALLBACK, FLOAT_TYPES, IMATRIX_TYPES, MIXTURES, Mixture, block_size, tensor_bytes

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
    config = hparams(config)
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


def ggml_n_dims(shape: tuple[int, ...]) -> int:
    """ggml_n_dims of a numpy-order shape: dimensions up to the last (in ggml's order) larger than 1."""
    leading_ones = next((i for i, s in enumerate(shape) if int(s) != 1), len(shape))
    return max(1, len(shape) - leading_ones)


def allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    """Which tensors are ever quantized (tensor_allows_quantization): weights of two or more dimensions as
    ggml counts them (leading 1s do not count: the shared-expert gate [1, hidden] is a vector), but not
    norms, the MoE router or the recurrent layers' depthwise conv."""
    return (
        ggml_n_dims(shape) >= 2
        and name.endswith("weight")
        and "_norm.weight" not in name
        and "ffn_gate_inp.weight" not in name
        and "ssm_conv1d" not in name
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
    blocks = {int(m.group(1)) for n in names if (m := _BLK.match(n))}
    counters = _Counters(
        n_attn_v=sum(category(n) in _ATTN_V_LIKE for n in names),
        n_layer=max(blocks) + 1 if blocks else facts.n_layer,  # llama.cpp's n_layer_all: MTP blocks too
        tied="output.weight" not in names,
    )
    plan = Plan(mix)
    for name, shape in ordered:
        shape = tuple(int(s) for s in shape)
        shape = shape[len(shape) - ggml_n_dims(shape):]  # llama-quantize writes ggml's dims: [1, n] is [n]
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

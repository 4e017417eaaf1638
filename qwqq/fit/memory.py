"""The memory model: what llama.cpp allocates for one GGUF file, context and KV type. Pure arithmetic.

    weights   the per-tensor plan that quantize executes (or the tensors of an existing file),
              split per layer so that layers can be placed on different devices
    KV cache  cells x (row_bytes(type_k, n_embd_k) + row_bytes(type_v, n_embd_v)) per layer,
              cells = context rounded up to 256 (llama.cpp's padding)
    compute   the graph allocator's peak for one n_ubatch-token batch: the largest of the logits,
              the attention scores (without flash attention) and the FFN activations, plus a
              fragmentation allowance calibrated against llama.cpp's own reports
    speed     bytes read per generated token over each device's bandwidth, times an efficiency

Formulas and calibration evidence: docs/fit.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import ceil

from gguf import GGMLQuantizationType as T

from qwqq.archs import Dims
from qwqq.gguf.types import row_bytes

MiB = 2**20
GiB = 2**30
ALIGN = 32  # GGUF tensor data alignment (general.alignment default)

KV_TYPES: dict[str, T] = {"f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "f32": T.F32}
KV_NEEDS_FLASH_ATTN = {"q8_0", "q4_0"}  # llama.cpp refuses a quantized V cache without flash attention


def kv_cells(ctx: int, pad: int = 256) -> int:
    return -(-max(1, ctx) // pad) * pad


def kv_bytes(d: Dims, ctx: int, kv: str = "f16", n_layers: int | None = None, pad: int = 256) -> int:
    """llama_kv_cache: size — K and V for `n_layers` layers (default: every layer that has a KV cache)."""
    t = KV_TYPES[kv]
    per_cell = row_bytes(t, d.n_embd_k) + row_bytes(t, d.n_embd_v)
    return (d.kv_layers if n_layers is None else n_layers) * kv_cells(ctx, pad) * per_cell


def kv_bytes_per_token(d: Dims, kv: str = "f16") -> int:
    t = KV_TYPES[kv]
    return d.kv_layers * (row_bytes(t, d.n_embd_k) + row_bytes(t, d.n_embd_v))


def recurrent_bytes(d: Dims, n_seq: int = 1) -> int:
    """llama_memory_recurrent's size: every recurrent layer's state for `n_seq` sequences (0 for a transformer)."""
    return n_seq * sum(d.recurrent) * d.recurrent_layer_bytes


def state_bytes(d: Dims, ctx: int, kv: str = "f16", pad: int = 256, n_seq: int = 1) -> list[int]:
    """Per layer, what the context keeps: its KV cache, or (a hybrid's linear-attention layer) the recurrent
    state of `n_seq` sequences (llama_memory_recurrent: conv + delta-net state, float32, any context)."""
    kv = kv_bytes(d, ctx, kv, n_layers=1, pad=pad)
    return [kv if d.has_kv(i) else n_seq * d.recurrent_layer_bytes for i in range(d.n_layer)]


def ubatch(ctx: int, n_ubatch: int = 512) -> int:
    """llama.cpp: n_batch = min(n_ctx, n_batch), n_ubatch = min(n_batch, n_ubatch)."""
    return max(1, min(n_ubatch, ctx))


@dataclass(frozen=True)
class ComputeParts:
    logits: int  # vocab x ubatch f32 and what is live beside it
    attention: int
    ffn: int

    def peak(self, with_output: bool = True) -> int:
        return max(self.logits if with_output else 0, self.attention, self.ffn)


def compute_parts(d: Dims, ctx: int, flash_attn: bool, n_ubatch: int = 512, pad: int = 256) -> ComputeParts:
    ub = ubatch(ctx, n_ubatch)
    cells = kv_cells(ctx, pad)
    f32 = 4
    act = 3 * d.n_embd + 2 * d.n_q + 2 * d.n_embd_k  # residual, norm, Q (+rope), K, V activations
    logits = f32 * ub * (d.n_vocab + 3 * d.n_embd)
    if flash_attn:  # the f16 mask [cells, ubatch] and the activations; no n_head x cells scores
        attention = 2 * cells * ub + f32 * ub * act
    else:  # scores [cells, ubatch, n_head] (softmax in place) + the f32 mask [cells, ubatch]
        attention = f32 * ub * (cells * (d.n_head + 1) + act)
    n_ff = max(d.n_ff if not d.moe else 0, d.n_ff_exp * d.n_expert_used)
    ffn = f32 * ub * (3 * n_ff + 2 * d.n_embd + 2 * d.n_expert)
    return ComputeParts(logits, attention, ffn)


def compute_bytes(d: Dims, ctx: int, flash_attn: bool, *, n_ubatch: int = 512, fragmentation: float = 0.035,
                  with_output: bool = True, pad: int = 256) -> int:
    """The compute buffer llama.cpp reserves ("compute buffer size") on the device running the graph."""
    peak = compute_parts(d, ctx, flash_attn, n_ubatch, pad).peak(with_output)
    return ceil(peak * (1 + fragmentation))


def output_buffer_bytes(d: Dims) -> int:
    """llama_context's host output buffer: the logits of one token (it grows for more outputs)."""
    return 4 * d.n_vocab


# --------------------------------------------------------------------------- weights


def padded(n: int) -> int:
    return n + (-n) % ALIGN


@dataclass(frozen=True)
class WeightTensor:
    name: str
    shape: tuple[int, ...]  # numpy order: (experts?, rows, n_per_row)
    type: T
    nbytes: int

    @property
    def layer(self) -> int | None:
        if self.name.startswith("blk."):
            return int(self.name.split(".")[1])
        return None

    @property
    def is_expert(self) -> bool:
        return "_exps." in self.name


@dataclass
class Weights:
    """Tensor bytes of one GGUF, grouped the way llama.cpp places them on devices."""

    n_layer: int
    token_embd: int = 0  # always in host memory (llama.cpp runs get_rows on the CPU)
    output: int = 0  # output.weight + output_norm: with the last layer's device
    output_dup: int = 0  # tied embeddings: llama.cpp loads a copy of token_embd as the output
    layers: list[int] = field(default_factory=list)
    experts: list[int] = field(default_factory=list)  # the ffn_*_exps part of each layer
    unloaded: int = 0  # in the file, not loaded: MTP blocks

    @property
    def total(self) -> int:
        """Bytes of tensor data in the file (with alignment padding)."""
        return self.token_embd + self.output + sum(self.layers) + self.unloaded

    def layer_range(self, start: int, stop: int, experts: bool = True) -> int:
        return sum(self.layers[start:stop]) - (0 if experts else sum(self.experts[start:stop]))

    def active_per_token(self, start: int, stop: int, n_expert: int, n_used: int, experts: bool = True,
                         dense: bool = True) -> float:
        """Bytes read per generated token from layers [start, stop): every dense tensor, and for
        MoE layers only the routed experts' share (n_used of n_expert)."""
        out = 0.0
        for i in range(start, stop):
            e = self.experts[i]
            if dense:
                out += self.layers[i] - e
            if experts and e:
                out += e * (n_used / n_expert if n_expert else 1.0)
        return out


def split_weights(tensors: list[WeightTensor], n_layer: int) -> Weights:
    """Bytes per layer of the tensors llama.cpp loads: blocks past `n_layer` (a hybrid's MTP block) it leaves
    on disk unless asked for speculative decoding (llama_model_loader: TENSOR_SKIP)."""
    w = Weights(n_layer, layers=[0] * n_layer, experts=[0] * n_layer)
    names = {t.name for t in tensors}
    for t in tensors:
        b = padded(t.nbytes)
        if t.layer is not None and t.layer >= n_layer:
            w.unloaded += b
        elif t.layer is not None:
            w.layers[t.layer] += b
            if t.is_expert:
                w.experts[t.layer] += b
        elif t.name == "token_embd.weight":
            w.token_embd += b
        else:  # output.weight, output_norm.weight, rope_freqs, ...
            w.output += b
    if "output.weight" not in names:
        w.output_dup = sum(padded(t.nbytes) for t in tensors if t.name == "token_embd.weight")
    return w


def cpu_repack_bytes(tensors: list[WeightTensor], repack_types: set[str]) -> int:
    """Bytes llama.cpp's CPU backend copies into its REPACK buffer: weights of the repackable
    types used by matrix products (not the token embedding), with a row count divisible by 8."""
    return sum(
        t.nbytes
        for t in tensors
        if t.type.name in repack_types and t.name != "token_embd.weight" and len(t.shape) >= 2 and t.shape[-2] % 8 == 0
    )


# --------------------------------------------------------------------------- speed


def tokens_per_second(reads: list[tuple[float, float]], efficiency: float = 0.6) -> float | None:
    """reads: (bytes read per token, bandwidth in GB/s) for each device the token passes through."""
    seconds = sum(b / (bw * 1e9 * efficiency) for b, bw in reads if b > 0 and bw > 0)
    return 1.0 / seconds if seconds > 0 else None

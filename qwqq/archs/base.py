"""What every architecture module fills in: the Arch record, config.json's metadata keys and checks,
and the runtime shape facts (Dims) that fit's memory model reads.

Nothing here names an architecture; each family's module under qwqq/archs/ does, as data.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable

import gguf

from qwqq.errors import SourceError

Shapes = list[tuple[str, tuple[int, ...]]]  # (GGUF tensor name, numpy-order shape)
MetaValue = tuple[str, str, object]  # (key after "{arch}.", kind: u32 | f32 | str | bool | ints | bools, value)


@dataclass(frozen=True)
class Meta:
    """One `{arch}.<key>` metadata entry read from config.json."""

    key: str
    fields: tuple[str, ...]  # config fields, first present wins
    kind: str  # "u32" | "f32"
    required: bool = True


COMMON = (
    Meta("context_length", ("max_position_embeddings",), "u32"),
    Meta("embedding_length", ("hidden_size",), "u32"),
    Meta("block_count", ("num_hidden_layers",), "u32"),
    Meta("feed_forward_length", ("intermediate_size",), "u32"),
    Meta("attention.head_count", ("num_attention_heads",), "u32"),
    Meta("attention.head_count_kv", ("num_key_value_heads", "num_attention_heads"), "u32"),
    Meta("attention.layer_norm_rms_epsilon", ("rms_norm_eps",), "f32"),
    Meta("attention.key_length", ("head_dim",), "u32", required=False),
    Meta("attention.value_length", ("head_dim",), "u32", required=False),
)
MOE = (
    Meta("expert_count", ("num_experts", "num_local_experts"), "u32"),
    Meta("expert_used_count", ("num_experts_per_tok",), "u32"),
    Meta("expert_feed_forward_length", ("moe_intermediate_size",), "u32"),
)


@dataclass(frozen=True)
class Dims:
    """The model hyper-parameters the KV cache and compute buffer depend on (what a runtime keeps per
    token and per layer), as fit's memory model reads them."""

    arch: str  # GGUF architecture name
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_embd_k: int  # K elements per token per layer (n_head_kv x head_dim; MLA: kv_lora_rank + rope dims)
    n_embd_v: int
    n_q: int  # query width (n_head x head_dim)
    n_ff: int
    n_vocab: int
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    ctx_train: int = 0
    recurrent: tuple[bool, ...] = ()  # hybrids: which layers keep a recurrent state instead of a KV cache
    n_embd_r: int = 0  # recurrent conv state per sequence and recurrent layer, float32 elements
    n_embd_s: int = 0  # recurrent delta-net state per sequence and recurrent layer, float32 elements
    mla: bool = False  # DeepSeek's MLA: the cache holds one latent (n_embd_k); llama.cpp also keeps n_embd_v of it

    @property
    def moe(self) -> bool:
        return self.n_expert > 1

    def has_kv(self, layer: int) -> bool:
        return not (self.recurrent and self.recurrent[layer])

    @property
    def kv_layers(self) -> int:
        """Layers with a KV cache (a hybrid's full-attention layers; every layer otherwise)."""
        return self.n_layer - sum(self.recurrent)

    @property
    def recurrent_layer_bytes(self) -> int:
        """One recurrent layer's state for one sequence: float32, whatever the context."""
        return 4 * (self.n_embd_r + self.n_embd_s)


def name_key(*names: str) -> str:
    """Model names as the records' `pattern`s (Sampling, VllmParsers) are matched against: joined, lower-cased,
    with spaces, "-", "_", "." and "/" removed."""
    return re.sub(r"[\s\-_./]", "", " ".join(names).lower())


@dataclass(frozen=True)
class Sampling:
    """A published sampling recommendation (the model card's), for models whose name matches `pattern`
    (lower-cased, spaces, "-", "_", "." and "/" removed; "": any model of the family itself, never one of
    another family), with thinking on (`thinking` True: also the default, when no --think/--no-think is
    given), off (False: --no-think) or either (None: a model that always or never thinks)."""

    pattern: str
    label: str
    values: dict  # temperature, top_p, top_k (0: off), min_p (0: off), presence_penalty (absent: 0, off)
    thinking: bool | None = None


@dataclass(frozen=True)
class VllmParsers:
    """vLLM's --reasoning-parser and --tool-call-parser for the family's models whose name matches `pattern`
    (matched as Sampling's; "": any model of the family); None: that model does not think / has no parser."""

    pattern: str
    reasoning: str | None
    tool_call: str | None


@dataclass(frozen=True)
class Arch:
    """Everything qwqq knows about one model family. Each module under qwqq/archs/ builds one."""

    hf_class: str  # the architectures[0] of config.json
    model_types: tuple[str, ...]  # config.json model_type values it answers to
    gguf_arch: gguf.MODEL_ARCH
    shapes: Callable[[dict, bool], Shapes]  # the GGUF tensors a config implies (what fit sizes)
    dims: Callable[[dict, "Arch"], Dims]  # what a runtime keeps per token and layer
    meta: tuple[Meta, ...] = COMMON
    moe: bool = False
    expert_count: tuple[str, ...] = ("num_experts", "num_local_experts")  # config fields, first present wins
    permute_qk: bool = False  # llama: HF rotate-half layout -> GGUF interleaved pairs
    rope_dims_key: bool = False  # llama writes rope.dimension_count and vocab_size
    seventy_b_layers: int | None = None  # llama.cpp's LLM_TYPE_70B: layer count that makes it
    seventy_b_needs_gqa: bool = False
    quantizable: bool = True  # False: fit sizes it from its shapes, quantize refuses it
    sampling: tuple[Sampling, ...] = field(default=())
    # Families whose hub names, tensors or keys go beyond the llama-style decoder (archs/hybrid.py):
    rename: Callable[[str, int], str | None] | None = None  # hub name, num_hidden_layers -> canonical name, None: skip
    tensor_hook: Callable | None = None  # (canonical name, ref, hparams, name_map) -> [GGUFTensor] or None (default)
    extra_meta: Callable[[dict, int], list[MetaValue]] | None = None  # (hparams, block count) -> more metadata
    jobs: tuple[str, ...] = ("gguf", "mlx", "gptq", "calibrate")  # what qwqq does with it (see archs.arch_of)
    also_classes: tuple[str, ...] = ()  # other architectures[0] values of the family (a text-only form)
    left_out_note: str = ""  # quantize's note when `rename` leaves tensors out ({n}: how many)
    has_mtp: bool = False  # may carry multi-token-prediction blocks after its decoder layers
    gated_attention: bool = False  # q_proj holds each head's query rows, then its sigmoid output gate's
    check: Callable[[dict, object], None] | None = None  # (hparams, where): the family's own config checks
    # Latent attention (MLA): (GGUF tensor kind, the statistic calibration records as its input, under the block:
    # "<attention module>.q_nope" | "<attention module>.latent_out", qwqq/calib/latent.py), for the absorbed
    # matrices llama.cpp multiplies at run time and transformers never does
    absorbed_inputs: tuple[tuple[str, str], ...] = ()
    hub_tensors: Callable[[dict], dict] | None = None  # config -> the release's tensors (hub name -> shape), for
    # fit's GPTQ sizes; None: the GGUF shapes mapped back (tensors.release_shapes)
    vllm: tuple[VllmParsers, ...] = ()  # `qwqq serve --engine vllm`: its parsers by model name, first match wins
    release_bytes_per_param: float = 2.0  # the published checkpoints' weights (bf16; an FP8 release: 1), when a
    # config sized without its files does not say (no quantization_config)

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    def n_expert(self, config: dict) -> int:
        return int(cfg(config, *self.expert_count, default=0)) if self.moe else 0


def hparams(config: dict) -> dict:
    """config.json's hyper-parameters with a nested text_config's over them (the language tower of a
    multimodal release: Qwen3.5), as llama.cpp's converter merges them; a flat config comes back as it is."""
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, dict) else config


def cfg(config: dict, *fields, default=None):
    for f in fields:
        if config.get(f) is not None:
            return config[f]
    return default


def head_dim(config: dict) -> int:
    """Never derived from hidden/heads when config gives it (Qwen3: 128 whatever the width)."""
    hd = cfg(config, "head_dim")
    return int(hd) if hd else int(config["hidden_size"]) // int(config["num_attention_heads"])


def rope_params(config: dict) -> dict:
    """transformers < 5 writes rope_theta + rope_scaling; 5 writes rope_parameters. Merge both views."""
    scaling, params = config.get("rope_scaling"), config.get("rope_parameters")
    rp = dict(scaling) if isinstance(scaling, dict) else {}
    rp.update(params if isinstance(params, dict) else {})
    if "full_attention" in rp and isinstance(rp["full_attention"], dict):
        rp = dict(rp["full_attention"])
    rp.setdefault("rope_theta", cfg(config, "rope_theta", default=10000.0))
    rp["rope_type"] = rp.get("rope_type") or rp.get("type") or "default"
    if "original_max_position_embeddings" not in rp and config.get("original_max_position_embeddings"):
        rp["original_max_position_embeddings"] = config["original_max_position_embeddings"]
    return rp


def short(value, width: int = 60) -> str:
    """A config value for an error message: one line, bounded."""
    text = value if isinstance(value, str) and value.isprintable() and len(value) <= width else repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


U32_MAX = 2**32 - 1
F32_MAX = 3.4028234663852886e38
MAX_LAYERS = 4096  # far above any real model; bounds the work a hostile config can ask for


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_config(config: dict, arch: Arch, where) -> None:
    """Every config.json value the plan and the writer use, checked for type and range up front,
    so a malformed config is one clear error naming the field, never a crash half-way."""
    config = hparams(config)

    def bad(field_: str, value, want: str):
        raise SourceError(f"{field_} is {short(value)}, expected {want}", where)

    for m in arch.meta:
        v = cfg(config, *m.fields)
        if v is None:
            if m.required:
                raise SourceError(f"lacks {' or '.join(m.fields)}", where)
            continue
        name = next(f for f in m.fields if config.get(f) is not None)
        if m.kind == "u32" and not (_is_int(v) and 1 <= v <= U32_MAX):
            bad(name, v, "a positive integer")
        if m.kind == "f32" and not (_is_num(v) and math.isfinite(v) and 0 < v <= F32_MAX):
            bad(name, v, "a positive number")
    if config["num_hidden_layers"] > MAX_LAYERS:
        bad("num_hidden_layers", config["num_hidden_layers"], f"at most {MAX_LAYERS}")
    n_head, n_kv = config["num_attention_heads"], cfg(config, "num_key_value_heads", "num_attention_heads")
    if n_head % n_kv:
        raise SourceError(f"num_attention_heads {n_head} is not a multiple of num_key_value_heads {n_kv}", where)
    if arch.moe and config["num_experts_per_tok"] > cfg(config, *arch.expert_count):
        raise SourceError(f"num_experts_per_tok {config['num_experts_per_tok']} is more than the "
                          f"{cfg(config, *arch.expert_count)} experts", where)
    vocab = config.get("vocab_size")
    if vocab is not None and not (_is_int(vocab) and 1 <= vocab < 2**31):
        bad("vocab_size", vocab, "a positive integer")
    if config.get("head_dim") is not None and not (_is_int(config["head_dim"]) and config["head_dim"] >= 1):
        bad("head_dim", config["head_dim"], "a positive integer")
    step = config.get("decoder_sparse_step")
    if step is not None and not _is_int(step):
        bad("decoder_sparse_step", step, "an integer")
    for key in ("rope_scaling", "rope_parameters"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            bad(key, config[key], "an object")
    rp = rope_params(config)
    if not (_is_num(rp["rope_theta"]) and math.isfinite(rp["rope_theta"]) and 0 < rp["rope_theta"] <= F32_MAX):
        bad("rope_theta", rp["rope_theta"], "a positive number")
    if not isinstance(rp["rope_type"], str):
        bad("rope_type", rp["rope_type"], "a name")
    factor = rp.get("factor")
    if factor is not None and not (_is_num(factor) and math.isfinite(factor) and 0 < factor <= F32_MAX):
        bad("rope factor", factor, "a positive number")
    orig = rp.get("original_max_position_embeddings")
    if orig is not None and not (_is_int(orig) and 1 <= orig <= U32_MAX):
        bad("original_max_position_embeddings", orig, "a positive integer")
    if arch.check is not None:
        arch.check(config, where)


# --------------------------------------------------------------------------- the llama-style decoder
def decoder_shapes(config: dict, *, attn_bias: bool, attn_out_bias: bool, qk_norm: bool, mlp_bias: bool,
                   moe: bool = False, output_tensor: bool = False) -> Shapes:
    """The GGUF tensors of a llama-style decoder (attention + SwiGLU MLP or stacked experts with a router),
    the block every family here but DeepSeek shares; each family says which of the optional parts it has."""
    c = config
    hidden, n_layer = int(c["hidden_size"]), int(c["num_hidden_layers"])
    out = embedding_shapes(c, output_tensor)
    n_head = int(c["num_attention_heads"])
    n_kv = int(cfg(c, "num_key_value_heads", default=n_head))
    hd = head_dim(c)
    ff = int(c["intermediate_size"])
    n_expert = int(cfg(c, "num_experts", "num_local_experts", default=0))
    for i in range(n_layer):
        p = f"blk.{i}."
        out += [(p + "attn_norm.weight", (hidden,)), (p + "ffn_norm.weight", (hidden,)),
                (p + "attn_q.weight", (n_head * hd, hidden)), (p + "attn_k.weight", (n_kv * hd, hidden)),
                (p + "attn_v.weight", (n_kv * hd, hidden)), (p + "attn_output.weight", (hidden, n_head * hd))]
        if attn_bias:
            out += [(p + "attn_q.bias", (n_head * hd,)), (p + "attn_k.bias", (n_kv * hd,)), (p + "attn_v.bias", (n_kv * hd,))]
            if attn_out_bias:
                out.append((p + "attn_output.bias", (hidden,)))
        if qk_norm:
            out += [(p + "attn_q_norm.weight", (hd,)), (p + "attn_k_norm.weight", (hd,))]
        if moe:
            mff = int(c["moe_intermediate_size"])
            out += [(p + "ffn_gate_inp.weight", (n_expert, hidden)),
                    (p + "ffn_gate_exps.weight", (n_expert, mff, hidden)),
                    (p + "ffn_up_exps.weight", (n_expert, mff, hidden)),
                    (p + "ffn_down_exps.weight", (n_expert, hidden, mff))]
        else:
            out += [(p + "ffn_gate.weight", (ff, hidden)), (p + "ffn_up.weight", (ff, hidden)),
                    (p + "ffn_down.weight", (hidden, ff))]
            if mlp_bias:
                out += [(p + "ffn_gate.bias", (ff,)), (p + "ffn_up.bias", (ff,)), (p + "ffn_down.bias", (hidden,))]
    return out


def embedding_shapes(config: dict, output_tensor: bool = False) -> Shapes:
    """token_embd, output_norm and (untied, or shipped anyway: `output_tensor`) output."""
    hidden, vocab = int(config["hidden_size"]), int(config["vocab_size"])
    out: Shapes = [("token_embd.weight", (vocab, hidden)), ("output_norm.weight", (hidden,))]
    if output_tensor or not config.get("tie_word_embeddings", False):  # output_tensor: the checkpoint ships
        out.append(("output.weight", (vocab, hidden)))  # lm_head.weight although config.json says tied
    return out


def decoder_dims(config: dict, arch: Arch) -> Dims:
    """Dims of a grouped-query-attention decoder: K and V of n_head_kv x head_dim per token and layer."""
    c = config
    n_layer, hidden, n_head = int(c["num_hidden_layers"]), int(c["hidden_size"]), int(c["num_attention_heads"])
    n_kv = int(cfg(c, "num_key_value_heads", default=n_head))
    hd = head_dim(c)
    return Dims(arch.name, n_layer, hidden, n_head, n_kv, n_kv * hd, n_kv * hd, n_head * hd, int(c["intermediate_size"]),
                int(c["vocab_size"]), arch.n_expert(c), int(c.get("num_experts_per_tok") or 0) if arch.moe else 0,
                int(c.get("moe_intermediate_size") or 0) if arch.moe else 0, int(c.get("max_position_embeddings") or 0))

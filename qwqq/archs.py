"""Supported architectures, as data: HF class -> GGUF architecture, metadata keys, tensor layout.

Tensor names come from gguf-py's own TensorNameMap (the table llama.cpp's converter uses), so no
GGUF tensor name is typed here. What is arch-specific lives in the ARCHS table; the functions below
only interpret it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from math import prod

import gguf

from qwqq.errors import SourceError, UnsupportedError
from qwqq.source import FLOAT_DTYPES, Checkpoint, TensorRef


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
class Arch:
    hf_class: str
    gguf_arch: gguf.MODEL_ARCH
    family: str  # for sampling defaults and file names
    meta: tuple[Meta, ...] = COMMON
    moe: bool = False
    permute_qk: bool = False  # llama: HF rotate-half layout -> GGUF interleaved pairs
    rope_dims_key: bool = False  # llama writes rope.dimension_count and vocab_size
    seventy_b_layers: int | None = None  # llama.cpp's LLM_TYPE_70B: layer count that makes it
    seventy_b_needs_gqa: bool = False
    extra_skip: tuple[str, ...] = field(default=())

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


ARCHS: dict[str, Arch] = {
    a.hf_class: a
    for a in (
        Arch("Qwen2ForCausalLM", gguf.MODEL_ARCH.QWEN2, "qwen2", seventy_b_layers=80),
        Arch("Qwen3ForCausalLM", gguf.MODEL_ARCH.QWEN3, "qwen3"),
        Arch("Qwen3MoeForCausalLM", gguf.MODEL_ARCH.QWEN3MOE, "qwen3", meta=COMMON + MOE, moe=True),
        Arch("LlamaForCausalLM", gguf.MODEL_ARCH.LLAMA, "llama", permute_qk=True, rope_dims_key=True,
             seventy_b_layers=80, seventy_b_needs_gqa=True),
    )
}

SKIPPED = re.compile(r"(rotary_emb\.inv_freq|\.attention\.masked_bias|\.attention\.bias)$")
EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
LAYER = re.compile(r"^model\.layers\.(\d+)\.")
FUSED_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)(\.weight)?$")


def arch_of(config: dict, where=None) -> Arch:
    names = config.get("architectures")
    if not names:
        raise UnsupportedError(f"config.json names no architecture; supported: {', '.join(ARCHS)}", where)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise SourceError(f"malformed architectures {_short(names)}: expected a list of class names", where)
    if names[0] not in ARCHS:
        raise UnsupportedError(f"architecture {_short(names[0])} is not supported; supported: {', '.join(ARCHS)}", where)
    return ARCHS[names[0]]


def _short(value, width: int = 60) -> str:
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
    def bad(field_: str, value, want: str):
        raise SourceError(f"{field_} is {_short(value)}, expected {want}", where)

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
    if arch.moe and config["num_experts_per_tok"] > cfg(config, "num_experts", "num_local_experts"):
        raise SourceError(f"num_experts_per_tok {config['num_experts_per_tok']} is more than the "
                          f"{cfg(config, 'num_experts', 'num_local_experts')} experts", where)
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


# --------------------------------------------------------------------------- GGUF tensors
@dataclass(frozen=True)
class Part:
    """Rows [row0, row1) of a source tensor seen as a 2-D [rows, cols] matrix."""

    ref: TensorRef
    row0: int
    row1: int


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # numpy order, e.g. (rows, cols) or (experts, rows, cols)
    parts: tuple[Part, ...]  # concatenated along rows
    permute_heads: int = 0  # llama q/k: number of heads to re-order rows within (0: none)

    @property
    def rows(self) -> int:
        return prod(self.shape[:-1]) if len(self.shape) > 1 else 1

    @property
    def cols(self) -> int:
        return self.shape[-1]


def gguf_tensors(ckpt: Checkpoint, arch: Arch) -> list[GGUFTensor]:
    """Every tensor the GGUF will hold, mapped from the checkpoint's names, experts stacked."""
    c = ckpt.config
    check_config(c, arch, ckpt.root / "config.json")
    for ref in ckpt.tensors.values():
        if ref.dtype not in FLOAT_DTYPES and not SKIPPED.search(ref.name):
            raise SourceError(f"tensor {ref.name}: dtype {ref.dtype} is not a float type qwqq can quantize", ref.file)
    n_layer = int(c["num_hidden_layers"])
    layers = {int(m.group(1)) for n in ckpt.tensors if (m := LAYER.match(n))}
    if layers != set(range(n_layer)):  # checked before any per-layer work a hostile count could make huge
        held = len(layers) if layers == set(range(len(layers))) else f"layers {_short(sorted(layers))}"
        raise SourceError(f"says {n_layer} layers, the weights hold {held}", ckpt.root / "config.json")
    name_map = gguf.get_tensor_name_map(arch.gguf_arch, n_layer)
    out: list[GGUFTensor] = []
    experts: dict[tuple[int, str], dict[int, TensorRef]] = {}
    n_head = int(c["num_attention_heads"])
    n_kv = int(cfg(c, "num_key_value_heads", default=n_head))
    if arch.moe and (c.get("mlp_only_layers") or (c.get("decoder_sparse_step") or 1) != 1):
        raise UnsupportedError("Qwen3-MoE with dense layers (mlp_only_layers / decoder_sparse_step) is not supported", ckpt.root)

    for hf_name, ref in ckpt.tensors.items():
        if SKIPPED.search(hf_name):
            continue
        if arch.moe and (m := EXPERT.match(hf_name)):
            experts.setdefault((int(m.group(1)), m.group(3)), {})[int(m.group(2))] = ref
            continue
        if arch.moe and (m := FUSED_EXPERT.match(hf_name)):
            out.extend(_fused_experts(name_map, int(m.group(1)), m.group(2), ref))
            continue
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise SourceError(f"unexpected tensor {hf_name} for {arch.hf_class}", ref.file)
        heads = 0
        if arch.permute_qk and (".self_attn.q_proj." in hf_name or ".self_attn.k_proj." in hf_name):
            heads = n_head if ".q_proj." in hf_name else n_kv
        out.append(GGUFTensor(name, ref.shape, (Part(ref, 0, ref.rows),), heads))

    n_expert = int(cfg(c, "num_experts", "num_local_experts", default=0)) if arch.moe else 0
    for (layer, proj), by_id in sorted(experts.items()):
        if len(by_id) != n_expert or sorted(by_id) != list(range(n_expert)):  # len first: n_expert may be huge
            raise SourceError(f"layer {layer} {proj}_proj has experts {len(by_id)} of {n_expert}", ckpt.root)
        refs = [by_id[e] for e in range(n_expert)]
        shape0 = refs[0].shape
        if any(r.shape != shape0 for r in refs):
            raise SourceError(f"layer {layer} {proj}_proj experts disagree on shape", ckpt.root)
        name = name_map.get_name(f"model.layers.{layer}.mlp.experts.{proj}_proj.weight", try_suffixes=(".weight",))
        out.append(GGUFTensor(name, (n_expert, *shape0), tuple(Part(r, 0, r.rows) for r in refs)))
    _check_shapes(out, c, arch, ckpt)
    return out


def _fused_experts(name_map, layer: int, which: str, ref: TensorRef) -> list[GGUFTensor]:
    """transformers 5 layout: gate_up_proj [E, 2*ff, hidden] (gate rows first), down_proj [E, hidden, ff]."""
    if len(ref.shape) != 3:
        raise SourceError(f"fused expert tensor {ref.name} should be 3-D, is {ref.shape}", ref.file)
    e, rows, cols = ref.shape
    if which == "down_proj":
        name = name_map.get_name(f"model.layers.{layer}.mlp.experts.down_proj.weight", try_suffixes=(".weight",))
        return [GGUFTensor(name, ref.shape, (Part(ref, 0, e * rows),))]
    ff = rows // 2
    out = []
    for k, proj in enumerate(("gate", "up")):
        name = name_map.get_name(f"model.layers.{layer}.mlp.experts.{proj}_proj.weight", try_suffixes=(".weight",))
        parts = tuple(Part(ref, i * rows + k * ff, i * rows + (k + 1) * ff) for i in range(e))
        out.append(GGUFTensor(name, (e, ff, cols), parts))
    return out


def _check_shapes(tensors: list[GGUFTensor], c: dict, arch: Arch, ckpt: Checkpoint) -> None:
    """Catch a config that does not match its tensors before writing anything."""
    by = {t.name: t for t in tensors}
    where = ckpt.root / "config.json"
    hidden, vocab = int(c["hidden_size"]), int(c.get("vocab_size") or 0)
    emb = by.get("token_embd.weight")
    if emb is None:
        raise SourceError("no token embedding (model.embed_tokens.weight)", ckpt.root)
    if emb.shape[-1] != hidden or (vocab and emb.shape[0] != vocab):
        raise SourceError(f"tensor {emb.parts[0].ref.name} is {list(emb.shape)} but config.json says vocab {vocab} x "
                          f"hidden {hidden}", ckpt.root)
    n_head, hd = int(c["num_attention_heads"]), head_dim(c)
    n_kv = int(cfg(c, "num_key_value_heads", default=n_head))
    for key, heads in (("attn_q", n_head), ("attn_k", n_kv), ("attn_v", n_kv)):
        t = by.get(f"blk.0.{key}.weight")
        if t is not None and t.shape[0] != heads * hd:
            raise SourceError(f"tensor {t.parts[0].ref.name} is {list(t.shape)} but config.json says {heads} heads x "
                              f"head_dim {hd}", where)
    n_layer = int(c["num_hidden_layers"])
    blocks = {int(n.split(".")[1]) for n in by if n.startswith("blk.")}
    if blocks != set(range(n_layer)):
        raise SourceError(f"says {n_layer} layers, the weights hold {len(blocks)}", where)

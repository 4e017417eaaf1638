"""Supported architectures, as data: HF class -> GGUF architecture, metadata keys, tensor layout.

Tensor names come from gguf-py's own TensorNameMap (the table llama.cpp's converter uses), so no
GGUF tensor name is typed here. What is arch-specific lives in the ARCHS table; the functions below
only interpret it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from math import prod

import gguf

from qwqq.errors import SourceError, UnsupportedError
from qwqq.source import Checkpoint, TensorRef


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
FUSED_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)(\.weight)?$")


def arch_of(config: dict, where=None) -> Arch:
    names = config.get("architectures") or []
    if not isinstance(names, list) or not names:
        raise UnsupportedError(f"config.json names no architecture; supported: {', '.join(ARCHS)}", where)
    if names[0] not in ARCHS:
        raise UnsupportedError(f"architecture {names[0]} is not supported; supported: {', '.join(ARCHS)}", where)
    return ARCHS[names[0]]


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
    rp = dict(config.get("rope_scaling") or {})
    rp.update(config.get("rope_parameters") or {})
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
    n_layer = int(c["num_hidden_layers"])
    name_map = gguf.get_tensor_name_map(arch.gguf_arch, n_layer)
    out: list[GGUFTensor] = []
    experts: dict[tuple[int, str], dict[int, TensorRef]] = {}
    n_head = int(c["num_attention_heads"])
    n_kv = int(cfg(c, "num_key_value_heads", default=n_head))
    if arch.moe and (c.get("mlp_only_layers") or int(c.get("decoder_sparse_step", 1) or 1) != 1):
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

    n_expert = int(cfg(c, "num_experts", "num_local_experts", default=0))
    for (layer, proj), by_id in sorted(experts.items()):
        if sorted(by_id) != list(range(n_expert)):
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
    hidden, vocab = int(c["hidden_size"]), int(c.get("vocab_size") or 0)
    emb = by.get("token_embd.weight")
    if emb is None:
        raise SourceError("no token embedding (model.embed_tokens.weight)", ckpt.root)
    if emb.shape[-1] != hidden or (vocab and emb.shape[0] != vocab):
        raise SourceError(f"token embedding is {emb.shape} but config says vocab {vocab} x hidden {hidden}", ckpt.root)
    q = by.get("blk.0.attn_q.weight")
    if q is not None and q.shape[0] != int(c["num_attention_heads"]) * head_dim(c):
        raise SourceError(f"attn_q is {q.shape} but config says {c['num_attention_heads']} heads x head_dim {head_dim(c)}",
                          ckpt.root)
    n_layer = int(c["num_hidden_layers"])
    blocks = {int(n.split(".")[1]) for n in by if n.startswith("blk.")}
    if blocks != set(range(n_layer)):
        raise SourceError(f"config says {n_layer} layers, the weights hold {len(blocks)}", ckpt.root)

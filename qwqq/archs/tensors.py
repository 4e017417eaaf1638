"""A checkpoint's tensors under GGUF names: mapped with gguf-py's TensorNameMap (the table llama.cpp's
converter uses, so no GGUF tensor name is typed here), experts stacked, shapes checked against config.json."""

from __future__ import annotations

import re
from dataclasses import dataclass
from math import prod

import gguf

from qwqq.archs.base import Arch, cfg, check_config, head_dim, hparams, short
from qwqq.archs.experts import EXPERT, FUSED_EXPERT, expert_prefix, expert_weight, fused_rows, merged
from qwqq.errors import SourceError, UnsupportedError
from qwqq.source import Checkpoint, TensorRef

SKIPPED = re.compile(r"(rotary_emb\.inv_freq|\.attention\.masked_bias|\.attention\.bias)$")
LAYER = re.compile(r"^model\.layers\.(\d+)\.")
# The Hugging Face weights that are linears of a decoder block (what GPTQ quantizes): attention, MLP,
# per-expert and shared-expert MLP projections. The MoE router `mlp.gate`, shared_expert_gate, embeddings
# and lm_head are not.
LINEAR = re.compile(r"^model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj"
                    r"|mlp\.experts\.\d+\.(?:gate|up|down)_proj|mlp\.shared_expert\.(?:gate|up|down)_proj)\.weight$")
# The hybrid decoder's (archs/hybrid.py) Gated DeltaNet linears GPTQ quantizes, as GPTQModel's Qwen3.5 / Qwen3-Next
# definitions do; in_proj_a / in_proj_b / in_proj_ba (a row per value head), conv1d and shared_expert_gate stay float.
LINEAR_ATTN = re.compile(r"^model\.layers\.(\d+)\.linear_attn\.(?:in_proj_qkvz|in_proj_qkv|in_proj_z|out_proj)\.weight$")
EMBEDDING = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"


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
    col_perm: tuple[int, ...] | None = None  # column j of the GGUF tensor is source column col_perm[j]
    op: str | None = None  # element-wise, in float32 (float16 for a float16 source): plus_one | neg_exp
    transposed: bool = False  # each part (rows x cols of the source) is written transposed (cols x rows): MLA's k_b

    @property
    def rows(self) -> int:
        return prod(self.shape[:-1]) if len(self.shape) > 1 else 1

    @property
    def cols(self) -> int:
        return self.shape[-1]


def gguf_tensors(ckpt: Checkpoint, arch: Arch, mtp: bool = True) -> list[GGUFTensor]:
    """Every tensor the GGUF will hold, mapped from the checkpoint's names, experts stacked. A family with
    multi-token-prediction blocks keeps them after the decoder layers unless `mtp` is False."""
    c = hparams(ckpt.config)
    check_config(c, arch, ckpt.root / "config.json")
    named = _canonical(ckpt, arch)
    for ref in named.values():
        if ref.dtype.startswith("F8") and not ref.quantizable:
            raise SourceError(f"tensor {ref.name} is {ref.dtype} without block scales ({ref.name}_scale_inv and "
                              "config.json's fp8 quantization_config)", ref.file)
        if not ref.quantizable and not SKIPPED.search(ref.name):
            raise SourceError(f"tensor {ref.name}: dtype {ref.dtype} is not a float type qwqq can quantize", ref.file)
    n_layer = int(c["num_hidden_layers"])
    layers = {int(m.group(1)) for n in named if (m := LAYER.match(n))}
    n_mtp = len(layers - set(range(n_layer))) if arch.has_mtp else 0
    if not mtp:
        if not n_mtp:
            raise SourceError("has no multi-token-prediction (MTP) layers to leave out: drop --no-mtp", ckpt.root)
        named = {n: r for n, r in named.items() if not ((m := LAYER.match(n)) and int(m.group(1)) >= n_layer)}
        layers, n_mtp = layers & set(range(n_layer)), 0
    n_block = n_layer + n_mtp
    if layers != set(range(n_block)):  # checked before any per-layer work a hostile count could make huge
        held = len(layers) if layers == set(range(len(layers))) else f"layers {short(sorted(layers))}"
        raise SourceError(f"says {n_layer} layers, the weights hold {held}", ckpt.root / "config.json")
    name_map = gguf.get_tensor_name_map(arch.gguf_arch, n_block)
    out: list[GGUFTensor] = []
    experts: dict[tuple[int, str], dict[int, TensorRef]] = {}
    n_head = int(c["num_attention_heads"])
    n_kv = int(cfg(c, "num_key_value_heads", default=n_head))
    if arch.moe and (c.get("mlp_only_layers") or (c.get("decoder_sparse_step") or 1) != 1):
        raise UnsupportedError(f"{arch.hf_class} with dense layers (mlp_only_layers / decoder_sparse_step) is not "
                               "supported", ckpt.root)

    def stacked(layer: int, proj: str) -> str:
        return name_map.get_name(f"{expert_prefix(layer)}.{proj}_proj.weight", try_suffixes=(".weight",))

    for hf_name, ref in named.items():
        if SKIPPED.search(hf_name):
            continue
        if arch.moe and (m := EXPERT.match(hf_name)):
            experts.setdefault((int(m.group(1)), m.group(3)), {})[int(m.group(2))] = ref
            continue
        if arch.moe and (m := FUSED_EXPERT.match(hf_name)):
            for proj, ranges in fused_rows(ref, m.group(2)).items():
                shape = (ref.shape[0], ranges[0][1] - ranges[0][0], ref.shape[2])
                parts = tuple(Part(ref, r0, r1) for r0, r1 in merged(ranges))
                out.append(GGUFTensor(stacked(int(m.group(1)), proj), shape, parts))
            continue
        if arch.tensor_hook and (special := arch.tensor_hook(hf_name, ref, c, name_map)) is not None:
            out += special
            continue
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise SourceError(f"unexpected tensor {ref.name} for {arch.hf_class}", ref.file)
        heads = 0
        if arch.permute_qk and (".self_attn.q_proj." in hf_name or ".self_attn.k_proj." in hf_name):
            heads = n_head if ".q_proj." in hf_name else n_kv
        out.append(GGUFTensor(name, ref.shape, (Part(ref, 0, ref.rows),), heads))

    n_expert = arch.n_expert(c)
    for (layer, proj), by_id in sorted(experts.items()):
        if len(by_id) != n_expert or sorted(by_id) != list(range(n_expert)):  # len first: n_expert may be huge
            raise SourceError(f"layer {layer} {proj}_proj has experts {len(by_id)} of {n_expert}", ckpt.root)
        refs = [by_id[e] for e in range(n_expert)]
        shape0 = refs[0].shape
        if any(r.shape != shape0 for r in refs):
            raise SourceError(f"layer {layer} {proj}_proj experts disagree on shape", ckpt.root)
        out.append(GGUFTensor(stacked(layer, proj), (n_expert, *shape0), tuple(Part(r, 0, r.rows) for r in refs)))
    _check_shapes(out, c, ckpt, arch, n_block)
    return out


def _canonical(ckpt: Checkpoint, arch: Arch) -> dict[str, TensorRef]:
    """The checkpoint's tensors under the names the family's text model gives them (a multimodal release's
    language tower renamed, its vision tower left out: one note), in the checkpoint's order."""
    if arch.rename is None:
        return ckpt.tensors
    n_layer = int(hparams(ckpt.config)["num_hidden_layers"])
    out: dict[str, TensorRef] = {}
    for name, ref in ckpt.tensors.items():
        new = arch.rename(name, n_layer)
        if new is not None:
            out[new] = ref
    if not any(LAYER.match(n) or n == EMBEDDING for n in out):
        raise SourceError(f"holds no text-model weights ({EMBEDDING}, model.layers.* or model.language_model.*), only "
                          f"{len(ckpt.tensors)} other tensors (a vision tower?)", ckpt.root)
    return out


def left_out(ckpt: Checkpoint, arch: Arch) -> int:
    """How many of the checkpoint's tensors the text model does not use (a vision tower)."""
    if arch.rename is None:
        return 0
    n_layer = int(hparams(ckpt.config)["num_hidden_layers"])
    return sum(arch.rename(name, n_layer) is None for name in ckpt.tensors)


def block_count(tensors: list[GGUFTensor]) -> int:
    """The GGUF's blocks: decoder layers plus any multi-token-prediction blocks after them."""
    return 1 + max((int(t.name.split(".")[1]) for t in tensors if t.name.startswith("blk.")), default=-1)


def _check_shapes(tensors: list[GGUFTensor], c: dict, ckpt: Checkpoint, arch: Arch, n_block: int) -> None:
    """Catch a config that does not match its tensors before writing anything."""
    by = {t.name: t for t in tensors}
    blocks = {int(n.split(".")[1]) for n in by if n.startswith("blk.")}
    where = ckpt.root / "config.json"
    hidden, vocab = int(c["hidden_size"]), int(c.get("vocab_size") or 0)
    emb = by.get("token_embd.weight")
    if emb is None:
        raise SourceError(f"no token embedding ({EMBEDDING})", ckpt.root)
    if emb.shape[-1] != hidden or (vocab and emb.shape[0] != vocab):
        raise SourceError(f"tensor {emb.parts[0].ref.name} is {list(emb.shape)} but config.json says vocab {vocab} x "
                          f"hidden {hidden}", ckpt.root)
    n_head, hd = int(c["num_attention_heads"]), head_dim(c)
    n_kv = int(cfg(c, "num_key_value_heads", default=n_head))
    gate = 2 if arch.gated_attention else 1  # each query head's rows, then its output gate's
    for key, heads in (("attn_q", n_head * gate), ("attn_k", n_kv), ("attn_v", n_kv)):
        t = next((by[n] for n in (f"blk.{i}.{key}.weight" for i in sorted(blocks)) if n in by), None)
        if t is not None and t.shape[0] != heads * hd:
            raise SourceError(f"tensor {t.parts[0].ref.name} is {list(t.shape)} but config.json says {heads} heads x "
                              f"head_dim {hd}", where)
    if blocks != set(range(n_block)):
        raise SourceError(f"says {c['num_hidden_layers']} layers, the weights hold {len(blocks)}", where)


# --------------------------------------------------------------------------- GGUF names -> Hugging Face names
# For a model known only by its config (fit): the llama-style block's GGUF tensors under the names mlx-lm
# and the hub give them, so MLX and GPTQ sizes can be planned from the same shapes.
GLOBAL_HF = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
BLOCK_HF = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj", "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.switch_mlp.gate_proj", "ffn_up_exps": "mlp.switch_mlp.up_proj",
    "ffn_down_exps": "mlp.switch_mlp.down_proj",
}
STACKED_EXPERTS = {"ffn_gate_exps": "gate", "ffn_up_exps": "up", "ffn_down_exps": "down"}
_BLK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def mlx_name(gguf_name: str) -> str:
    """The mlx-lm parameter a GGUF tensor of a llama-style decoder comes from."""
    if m := _BLK.match(gguf_name):
        return f"model.layers.{m.group(1)}.{BLOCK_HF[m.group(2)]}.{m.group(3)}"
    base, suffix = gguf_name.rsplit(".", 1)
    return f"{GLOBAL_HF[base]}.{suffix}"


def hub_shapes(shapes) -> dict[str, tuple[int, ...]]:
    """GGUF (name, shape)s mapped back to the hub's tensors: stacked experts split into per-expert weights."""
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes:
        parts = name.split(".")
        if parts[0] == "blk" and parts[2] in STACKED_EXPERTS:
            for e in range(shape[0]):
                out[expert_weight(parts[1], e, STACKED_EXPERTS[parts[2]])] = tuple(shape[1:])
        else:
            out[mlx_name(name)] = tuple(shape)
    return out


def release_shapes(arch: Arch, config: dict, gguf_shapes) -> dict[str, tuple[int, ...]]:
    """The hub's tensors (name -> shape) of a model known by its config: the family's own list where its
    releases differ from the GGUF beyond names (Arch.hub_tensors: the hybrids), else the GGUF shapes mapped back."""
    return arch.hub_tensors(config) if arch.hub_tensors is not None else hub_shapes(gguf_shapes)

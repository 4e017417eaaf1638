"""The hybrid Qwen decoder (Qwen3-Next, Qwen3.5 / 3.6 / 3.8): Gated DeltaNet layers with one gated
full-attention layer in every `full_attention_interval`, and a multi-token-prediction (MTP) block.

What the three families share, re-derived from llama.cpp's converter (conversion/qwen.py: Qwen3NextModel,
_LinearAttentionVReorderBase, _QwenMtpMixin) so the GGUF holds the same tensors and values:

- names: a multimodal release's `model.language_model.*` is the text model, its vision tower is skipped;
  `mtp.*` becomes block `num_hidden_layers` (+ i) under llama.cpp's nextn names;
- values: every zero-centred RMSNorm weight w is stored as 1 + w (all `*norm.weight` but the gated
  `linear_attn.norm`), A_log as -exp(A_log), dt_bias as `ssm_dt.bias`, the depthwise conv1d squeezed to
  [channels, kernel]; each computed in float32 (in float16 for a float16 source, as the converter does);
- Qwen3-Next's fused `in_proj_qkvz` (per key head: q, k, v, z) regrouped into attn_qkv (all q, all k, all v)
  and attn_gate (all z); Qwen3.5's value heads (when there are more value than key heads) reordered from
  grouped-by-key-head to tiled order in every tensor that holds them, so ggml's broadcast pairs them;
- metadata: the ssm.* sizes, which layers are recurrent, the partial rotary dimension count, the MTP count.

Row reorders become `Part`s (row ranges); column reorders (out_proj, A_log, dt_bias) a `col_perm`.
"""

from __future__ import annotations

import re

import gguf

from qwqq.archs.base import Dims, MetaValue, cfg, embedding_shapes, head_dim, rope_params
from qwqq.archs.experts import merged
from qwqq.archs.tensors import GGUFTensor, Part
from qwqq.errors import SourceError

LANGUAGE_PREFIX = "model.language_model."
VISION_PREFIXES = ("model.visual.", "visual.", "model.vision_tower.", "vision_tower.")
MTP_GLOBALS = {"fc": "eh_proj", "pre_fc_norm_embedding": "enorm", "pre_fc_norm_hidden": "hnorm",
               "norm": "shared_head.norm"}  # mtp.<key>.weight -> model.layers.<n_layer>.<value>.weight
NEXTN = {"eh_proj": gguf.MODEL_TENSOR.NEXTN_EH_PROJ, "enorm": gguf.MODEL_TENSOR.NEXTN_ENORM,
         "hnorm": gguf.MODEL_TENSOR.NEXTN_HNORM, "shared_head.norm": gguf.MODEL_TENSOR.NEXTN_SHARED_HEAD_NORM}
RECURRENT_LAYERS_KEY = "attention.recurrent_layers"  # llama.cpp's LLM_KV_ATTENTION_RECURRENT_LAYERS (not in gguf 0.19)
LAYER_REST = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
LINEAR_ATTN = "linear_attn."


def rename(name: str, n_layer: int) -> str | None:
    """A hub tensor name as the text model's canonical name (MTP as extra layers), None for the vision tower."""
    if name.startswith(VISION_PREFIXES):
        return None
    if name.startswith(LANGUAGE_PREFIX):
        name = "model." + name[len(LANGUAGE_PREFIX):]
    if name.startswith("model.mtp."):
        name = name[len("model."):]
    if not name.startswith("mtp."):
        return name
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[1] == "layers" and parts[2].isdecimal():
        return f"model.layers.{n_layer + int(parts[2])}.{parts[3]}"
    if len(parts) == 3 and parts[1] in MTP_GLOBALS:
        return f"model.layers.{n_layer}.{MTP_GLOBALS[parts[1]]}.{parts[2]}"
    return name  # unknown mtp tensor: the name map refuses it by name


def layer_types(hp: dict) -> list[str]:
    """Each decoder layer's kind: config's `layer_types`, else every `full_attention_interval`-th full."""
    types = hp.get("layer_types")
    if isinstance(types, list):
        return types
    every = int(hp.get("full_attention_interval") or 4)
    return ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(int(hp["num_hidden_layers"]))]


def linear_dims(hp: dict) -> tuple[int, int, int, int, int]:
    """(key heads, value heads, key head dim, value head dim, conv kernel) of the Gated DeltaNet layers."""
    return (int(hp["linear_num_key_heads"]), int(hp["linear_num_value_heads"]), int(hp["linear_key_head_dim"]),
            int(hp["linear_value_head_dim"]), int(hp["linear_conv_kernel_dim"]))


def partial_rotary(hp: dict) -> float:
    return float(cfg(rope_params(hp), "partial_rotary_factor", default=cfg(hp, "partial_rotary_factor", default=0.25)))


def check(hp: dict, where) -> None:
    """The linear-attention sizes every plan and writer uses: positive integers, value heads a multiple
    of key heads, layer_types one per layer."""
    for key in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
                "linear_conv_kernel_dim"):
        v = hp.get(key)
        if not (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 2**20):
            raise SourceError(f"{key} is {v!r}, expected a positive integer", where)
    nk, nv = hp["linear_num_key_heads"], hp["linear_num_value_heads"]
    if nv % nk:
        raise SourceError(f"linear_num_value_heads {nv} is not a multiple of linear_num_key_heads {nk}", where)
    types = hp.get("layer_types")
    if types is not None and (not isinstance(types, list) or len(types) != hp["num_hidden_layers"]
                              or not set(types) <= {"linear_attention", "full_attention"}):
        raise SourceError(f"layer_types should list linear_attention / full_attention for each of the "
                          f"{hp['num_hidden_layers']} layers", where)


def meta(hp: dict, n_block: int, sections: bool) -> list[MetaValue]:
    """The keys llama.cpp's converter adds for these families (`sections`: Qwen3.5's M-RoPE sections)."""
    nk, nv, dk, dv, kernel = linear_dims(hp)
    n_layer = int(hp["num_hidden_layers"])
    out: list[MetaValue] = [("block_count", "u32", n_block)]
    if n_block > n_layer:
        out.append(("nextn_predict_layers", "u32", n_block - n_layer))
    out += [("ssm.conv_kernel", "u32", kernel), ("ssm.state_size", "u32", dk), ("ssm.group_count", "u32", nk),
            ("ssm.time_step_rank", "u32", nv), ("ssm.inner_size", "u32", dv * nv),
            (RECURRENT_LAYERS_KEY, "bools", [t == "linear_attention" for t in layer_types(hp)] + [False] * (n_block - n_layer)),
            ("full_attention_interval", "u32", int(hp.get("full_attention_interval") or 4)),
            ("rope.dimension_count", "u32", int(head_dim(hp) * partial_rotary(hp)))]
    if sections:
        mrope = rope_params(hp).get("mrope_section") or [11, 11, 10]
        out.append(("rope.dimension_sections", "ints", (list(mrope) + [0, 0, 0, 0])[:4]))
    return out


# --------------------------------------------------------------------------- tensors
def _v_heads(base: int, nk: int, nv: int, hd: int) -> list[tuple[int, int]]:
    """Rows [base, base + nv*hd) of value heads grouped by key head, as (row0, row1) in tiled order."""
    r = nv // nk
    return [(base + (g * r + j) * hd, base + (g * r + j + 1) * hd) for j in range(r) for g in range(nk)]


def _cols(ranges) -> tuple[int, ...]:
    return tuple(c for a, b in ranges for c in range(a, b))


def hybrid_tensors(name: str, ref, hp: dict, name_map, *, tiled_v: bool):
    """The GGUF tensors of one canonical hub tensor where these families differ from the plain decoder,
    else None (then the generic name map applies). `tiled_v`: reorder value heads (Qwen3.5)."""
    m = LAYER_REST.match(name)
    if m is None:
        return [_norm(name, ref, name_map)] if name.endswith("norm.weight") else None
    bid, rest = int(m.group(1)), m.group(2)
    if rest.rsplit(".", 1)[0] in NEXTN:
        key = rest.rsplit(".", 1)[0]
        op = "plus_one" if rest.endswith("norm.weight") else None
        return [GGUFTensor(gguf.TENSOR_NAMES[NEXTN[key]].format(bid=bid) + ".weight", ref.shape,
                           (Part(ref, 0, ref.rows),), op=op)]
    if not rest.startswith(LINEAR_ATTN):
        return [_norm(name, ref, name_map)] if rest.endswith("norm.weight") else None

    nk, nv, dk, dv, _ = linear_dims(hp)
    tile = tiled_v and nk != nv
    key = rest[len(LINEAR_ATTN):]
    mapped = lambda n: name_map.get_name(n, try_suffixes=(".weight", ".bias"))
    whole = (Part(ref, 0, ref.rows),)

    def rows(ranges):
        return tuple(Part(ref, a, b) for a, b in merged(ranges))

    if key == "in_proj_qkvz.weight":  # Qwen3-Next: per key head [q, k, v, z] -> attn_qkv (q.., k.., v..), attn_gate
        r = nv // nk
        s = 2 * dk + 2 * r * dv
        q = [(g * s, g * s + dk) for g in range(nk)]
        k = [(g * s + dk, g * s + 2 * dk) for g in range(nk)]
        v = [(g * s + 2 * dk, g * s + 2 * dk + r * dv) for g in range(nk)]
        z = [(g * s + 2 * dk + r * dv, (g + 1) * s) for g in range(nk)]
        _expect(ref, (nk * s, None))
        qkv_rows = 2 * nk * dk + nv * dv
        return [GGUFTensor(f"blk.{bid}.attn_qkv.weight", (qkv_rows, ref.shape[-1]), rows(q + k + v)),
                GGUFTensor(f"blk.{bid}.attn_gate.weight", (nv * dv, ref.shape[-1]), rows(z))]
    if key == "in_proj_qkv.weight":
        qk = 2 * nk * dk
        _expect(ref, (qk + nv * dv, None))
        parts = rows([(0, qk)] + _v_heads(qk, nk, nv, dv)) if tile else whole
        return [GGUFTensor(mapped(name), ref.shape, parts)]
    if key == "in_proj_z.weight":
        _expect(ref, (nv * dv, None))
        return [GGUFTensor(mapped(name), ref.shape, rows(_v_heads(0, nk, nv, dv)) if tile else whole)]
    if key in ("in_proj_a.weight", "in_proj_b.weight"):
        _expect(ref, (nv, None))
        return [GGUFTensor(mapped(name), ref.shape, rows(_v_heads(0, nk, nv, 1)) if tile else whole)]
    if key in ("A_log", "dt_bias"):
        _expect(ref, (nv,))
        gname = mapped(name if key == "A_log" else name.rpartition(".dt_bias")[0] + ".dt_proj.bias")
        perm = _cols(_v_heads(0, nk, nv, 1)) if tile else None
        return [GGUFTensor(gname, ref.shape, whole, col_perm=perm, op="neg_exp" if key == "A_log" else None)]
    if key == "conv1d.weight":  # [channels, 1, kernel] -> [channels, kernel]
        if len(ref.shape) != 3 or ref.shape[1] != 1:
            raise SourceError(f"tensor {ref.name} is {list(ref.shape)}, expected [channels, 1, kernel]", ref.file)
        qk = 2 * nk * dk
        _expect(ref, (qk + nv * dv, 1, None))
        parts = rows([(0, qk)] + _v_heads(qk, nk, nv, dv)) if tile else whole
        return [GGUFTensor(mapped(name), (ref.shape[0], ref.shape[2]), parts)]
    if key == "out_proj.weight":
        _expect(ref, (None, nv * dv))
        return [GGUFTensor(mapped(name), ref.shape, whole, col_perm=_cols(_v_heads(0, nk, nv, dv)) if tile else None)]
    return None  # norm.weight (the gated norm, stored as is), in_proj_ba: the generic map


def _norm(name: str, ref, name_map) -> GGUFTensor:
    """A zero-centred RMSNorm weight: stored as 1 + w."""
    gname = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
    if gname is None:
        raise SourceError(f"unexpected tensor {ref.name}", ref.file)
    return GGUFTensor(gname, ref.shape, (Part(ref, 0, ref.rows),), op="plus_one")


def _expect(ref, shape: tuple) -> None:
    """The tensor's shape as config.json implies it (None: any size there)."""
    if len(ref.shape) != len(shape) or any(w is not None and w != s for w, s in zip(shape, ref.shape)):
        want = "x".join("*" if w is None else str(w) for w in shape)
        raise SourceError(f"tensor {ref.name} is {list(ref.shape)} but config.json implies {want}", ref.file)


# --------------------------------------------------------------------------- what a config implies (fit)
def n_mtp(hp: dict) -> int:
    """MTP blocks a release ships: config's mtp_num_hidden_layers (Qwen3-Next's config does not say: its
    releases ship one, which `mtp_layers` in a catalog entry states)."""
    return int(cfg(hp, "mtp_num_hidden_layers", "mtp_layers", default=0))


def shapes(config: dict, output_tensor: bool = False, *, moe: bool, split_ba: bool, mtp: bool = True):
    """The GGUF tensors of a hybrid model, MTP blocks included unless `mtp` is False. `split_ba`:
    Qwen3.5's separate in_proj_a / in_proj_b (Qwen3-Next: one in_proj_ba)."""
    hp = config
    hidden, n_layer = int(hp["hidden_size"]), int(hp["num_hidden_layers"])
    nk, nv, dk, dv, kernel = linear_dims(hp)
    n_head, hd = int(hp["num_attention_heads"]), head_dim(hp)
    n_kv = int(cfg(hp, "num_key_value_heads", default=n_head))
    out = embedding_shapes(hp, output_tensor)
    kinds = layer_types(hp) + ["full_attention"] * (n_mtp(hp) if mtp else 0)
    for i, kind in enumerate(kinds):
        p = f"blk.{i}."
        out += [(p + "attn_norm.weight", (hidden,)), (p + "post_attention_norm.weight", (hidden,))]
        if kind == "linear_attention":
            out += [(p + "attn_qkv.weight", (2 * nk * dk + nv * dv, hidden)), (p + "attn_gate.weight", (nv * dv, hidden)),
                    (p + "ssm_conv1d.weight", (2 * nk * dk + nv * dv, kernel)), (p + "ssm_dt.bias", (nv,)),
                    (p + "ssm_a", (nv,)), (p + "ssm_norm.weight", (dv,)), (p + "ssm_out.weight", (hidden, nv * dv))]
            out += ([(p + "ssm_alpha.weight", (nv, hidden)), (p + "ssm_beta.weight", (nv, hidden))] if split_ba
                    else [(p + "ssm_ba.weight", (2 * nv, hidden))])
        else:
            out += [(p + "attn_q.weight", (2 * n_head * hd, hidden)), (p + "attn_k.weight", (n_kv * hd, hidden)),
                    (p + "attn_v.weight", (n_kv * hd, hidden)), (p + "attn_output.weight", (hidden, n_head * hd)),
                    (p + "attn_q_norm.weight", (hd,)), (p + "attn_k_norm.weight", (hd,))]
        if moe:
            e, mff, sff = int(hp["num_experts"]), int(hp["moe_intermediate_size"]), int(hp["shared_expert_intermediate_size"])
            out += [(p + "ffn_gate_inp.weight", (e, hidden)), (p + "ffn_gate_exps.weight", (e, mff, hidden)),
                    (p + "ffn_up_exps.weight", (e, mff, hidden)), (p + "ffn_down_exps.weight", (e, hidden, mff)),
                    (p + "ffn_gate_inp_shexp.weight", (1, hidden)), (p + "ffn_gate_shexp.weight", (sff, hidden)),
                    (p + "ffn_up_shexp.weight", (sff, hidden)), (p + "ffn_down_shexp.weight", (hidden, sff))]
        else:
            ff = int(hp["intermediate_size"])
            out += [(p + "ffn_gate.weight", (ff, hidden)), (p + "ffn_up.weight", (ff, hidden)), (p + "ffn_down.weight", (hidden, ff))]
        if i >= n_layer:
            out += [(gguf.TENSOR_NAMES[t].format(bid=i) + ".weight", (hidden, 2 * hidden) if key == "eh_proj" else (hidden,))
                    for key, t in NEXTN.items()]
    return out


def dims(config: dict, arch) -> Dims:
    """What llama.cpp keeps per token (K and V on the full-attention layers only) and per sequence (the
    conv and delta-net state of each linear-attention layer, float32, whatever the context)."""
    hp = config
    nk, nv, dk, dv, kernel = linear_dims(hp)
    n_layer, hidden, n_head = int(hp["num_hidden_layers"]), int(hp["hidden_size"]), int(hp["num_attention_heads"])
    n_kv = int(cfg(hp, "num_key_value_heads", default=n_head))
    hd = head_dim(hp)
    return Dims(arch.name, n_layer, hidden, n_head, n_kv, n_kv * hd, n_kv * hd, n_head * hd,
                int(hp.get("intermediate_size") or 0), int(hp["vocab_size"]), arch.n_expert(hp),
                int(hp.get("num_experts_per_tok") or 0) if arch.moe else 0,
                int(hp.get("moe_intermediate_size") or 0) if arch.moe else 0, int(hp.get("max_position_embeddings") or 0),
                recurrent=tuple(k == "linear_attention" for k in layer_types(hp)),
                n_embd_r=(kernel - 1) * (nv * dv + 2 * nk * dk), n_embd_s=dk * dv * nv)

"""DeepSeek-V3 / R1 (671B; also V3-0324, R1-0528, V3.1): MLA attention, 256 routed experts + 1 shared, the
first `first_k_dense_replace` layers dense, sigmoid group-limited routing; released as block-scaled FP8
(qwqq/fp8.py reads it). llama.cpp's deepseek2 layout, re-derived from its converter (conversion/deepseek.py,
DeepseekV2Model): MLA with the absorption split (kv_b_proj viewed per head as [nope + v, kv_lora] and split
into attn_k_b, each head's block transposed, and attn_v_b), head_count_kv 1 and the *_mla lengths, routed
experts stacked, the router and its correction bias kept float, the multi-token-prediction layer (index
num_hidden_layers) left out."""

import re

import gguf

from qwqq.archs.base import COMMON, Arch, Dims, VllmParsers, Meta, MetaValue, Shapes, embedding_shapes, rope_params
from qwqq.archs.tensors import GGUFTensor, Part
from qwqq.errors import SourceError

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
META = tuple(m for m in COMMON if m.key not in ("attention.head_count_kv", "attention.key_length",
                                                "attention.value_length")) + (
    Meta("expert_count", ("n_routed_experts",), "u32"), Meta("expert_used_count", ("num_experts_per_tok",), "u32"),
    Meta("expert_feed_forward_length", ("moe_intermediate_size",), "u32"))


def rename(name: str, n_layer: int) -> str | None:
    """The MTP layer (index >= num_hidden_layers) is left out, as llama.cpp's converter does; the router's
    correction bias named as gguf-py maps it."""
    m = _LAYER.match(name)
    if m and int(m.group(1)) >= n_layer:
        return None
    return name.replace("e_score_correction_bias", "e_score_correction.bias")


def mla(hp: dict) -> tuple[int, int, int, int, int]:
    """(heads, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim)."""
    return (int(hp["num_attention_heads"]), int(hp["kv_lora_rank"]), int(hp["qk_nope_head_dim"]),
            int(hp["qk_rope_head_dim"]), int(hp["v_head_dim"]))


def tensors(name: str, ref, hp: dict, name_map):
    """kv_b_proj [heads x (nope + v), kv_lora] -> attn_k_b [heads, kv_lora, nope] (each head's nope rows,
    transposed) and attn_v_b [heads, v, kv_lora]; everything else through the generic name map."""
    if not name.endswith(".self_attn.kv_b_proj.weight"):
        return None
    h, kv_lora, nope, _, v = mla(hp)
    if ref.shape != (h * (nope + v), kv_lora):
        raise SourceError(f"tensor {ref.name} is {list(ref.shape)} but config.json implies {h * (nope + v)}x{kv_lora}",
                          ref.file)
    bid = int(_LAYER.match(name).group(1))
    step = nope + v
    k_b = tuple(Part(ref, i * step, i * step + nope) for i in range(h))
    v_b = tuple(Part(ref, i * step + nope, (i + 1) * step) for i in range(h))
    fmt = lambda t: gguf.TENSOR_NAMES[t].format(bid=bid) + ".weight"
    return [GGUFTensor(fmt(gguf.MODEL_TENSOR.ATTN_K_B), (h, kv_lora, nope), k_b, transposed=True),
            GGUFTensor(fmt(gguf.MODEL_TENSOR.ATTN_V_B), (h, v, kv_lora), v_b)]


def meta(hp: dict, n_block: int) -> list[MetaValue]:
    """The keys llama.cpp's converter writes for deepseek2 beyond the common ones."""
    h, kv_lora, nope, rope, v = mla(hp)
    out: list[MetaValue] = [
        ("attention.head_count_kv", "u32", 1),  # MLA runs as MQA over the latent
        ("leading_dense_block_count", "u32", int(hp.get("first_k_dense_replace") or 0)),
        ("vocab_size", "u32", int(hp["vocab_size"])),
        ("attention.kv_lora_rank", "u32", kv_lora),
        ("attention.key_length", "u32", kv_lora + rope), ("attention.value_length", "u32", kv_lora),
        ("attention.key_length_mla", "u32", nope + rope), ("attention.value_length_mla", "u32", v),
        ("expert_shared_count", "u32", int(hp.get("n_shared_experts") or 0)),
        ("rope.dimension_count", "u32", rope),
    ]
    if hp.get("q_lora_rank") is not None:
        out.append(("attention.q_lora_rank", "u32", int(hp["q_lora_rank"])))
    if hp.get("routed_scaling_factor") is not None:
        out.append(("expert_weights_scale", "f32", float(hp["routed_scaling_factor"])))
    if hp.get("norm_topk_prob"):
        out.append(("expert_weights_norm", "bool", True))
    if hp.get("n_group") is not None:
        out.append(("expert_group_count", "u32", int(hp["n_group"])))
    if hp.get("topk_group") is not None:
        out.append(("expert_group_used_count", "u32", int(hp["topk_group"])))
    gating = {"sigmoid": gguf.ExpertGatingFuncType.SIGMOID, "softmax": gguf.ExpertGatingFuncType.SOFTMAX}
    if hp.get("scoring_func") in gating:
        out.append(("expert_gating_func", "u32", int(gating[hp["scoring_func"]])))
    rp = rope_params(hp)
    if rp.get("mscale_all_dim") is not None:  # llama.cpp's legacy deepseek2 yarn_log_multiplier
        out.append(("rope.scaling.yarn_log_multiplier", "f32", 0.1 * float(rp["mscale_all_dim"])))
    return out


def check(hp: dict, where) -> None:
    for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "moe_intermediate_size",
                "n_routed_experts"):
        v = hp.get(key)
        if not (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 2**20):
            raise SourceError(f"{key} is {v!r}, expected a positive integer", where)
    if hp.get("n_group") and hp.get("topk_group") and not hp["topk_group"] < hp["n_group"] \
            and hp["n_group"] > 1:  # llama.cpp's loader: topk_group < n_group when routing by groups
        raise SourceError(f"topk_group {hp['topk_group']} is not below n_group {hp['n_group']}", where)


def shapes(c: dict, output_tensor: bool = False) -> Shapes:
    hidden, n_layer = int(c["hidden_size"]), int(c["num_hidden_layers"])
    h, kv_lora, nope, rope, v = mla(c)
    q_lora = c.get("q_lora_rank")
    ff, mff = int(c["intermediate_size"]), int(c["moe_intermediate_size"])
    n_expert, n_shared = int(c["n_routed_experts"]), int(c.get("n_shared_experts") or 0)
    dense = int(c.get("first_k_dense_replace") or 0)
    out = embedding_shapes(c, output_tensor)
    for i in range(n_layer):
        p = f"blk.{i}."
        out += [(p + "attn_norm.weight", (hidden,)), (p + "ffn_norm.weight", (hidden,)),
                (p + "attn_kv_a_norm.weight", (kv_lora,)), (p + "attn_kv_a_mqa.weight", (kv_lora + rope, hidden)),
                (p + "attn_k_b.weight", (h, kv_lora, nope)), (p + "attn_v_b.weight", (h, v, kv_lora)),
                (p + "attn_output.weight", (hidden, h * v))]
        if q_lora:
            out += [(p + "attn_q_a_norm.weight", (int(q_lora),)), (p + "attn_q_a.weight", (int(q_lora), hidden)),
                    (p + "attn_q_b.weight", (h * (nope + rope), int(q_lora)))]
        else:
            out.append((p + "attn_q.weight", (h * (nope + rope), hidden)))
        if i < dense:
            out += [(p + "ffn_gate.weight", (ff, hidden)), (p + "ffn_up.weight", (ff, hidden)),
                    (p + "ffn_down.weight", (hidden, ff))]
            continue
        out += [(p + "ffn_gate_inp.weight", (n_expert, hidden)), (p + "exp_probs_b.bias", (n_expert,)),
                (p + "ffn_gate_exps.weight", (n_expert, mff, hidden)), (p + "ffn_up_exps.weight", (n_expert, mff, hidden)),
                (p + "ffn_down_exps.weight", (n_expert, hidden, mff))]
        if n_shared:
            sff = mff * n_shared
            out += [(p + "ffn_gate_shexp.weight", (sff, hidden)), (p + "ffn_up_shexp.weight", (sff, hidden)),
                    (p + "ffn_down_shexp.weight", (hidden, sff))]
    return out


def dims(c: dict, arch: Arch) -> Dims:
    """MLA: the cache holds the compressed latent (kv_lora_rank) and the rope part, once per token and layer."""
    n_layer, hidden, n_head = int(c["num_hidden_layers"]), int(c["hidden_size"]), int(c["num_attention_heads"])
    kv_lora, rope = int(c["kv_lora_rank"]), int(c["qk_rope_head_dim"])
    return Dims(arch.name, n_layer, hidden, n_head, 1, kv_lora + rope, kv_lora, n_head * (kv_lora + rope),
                int(c["intermediate_size"]), int(c["vocab_size"]), int(c["n_routed_experts"]),
                int(c["num_experts_per_tok"]), int(c["moe_intermediate_size"]), int(c.get("max_position_embeddings") or 0),
                mla=True)


# Calibration. transformers' DeepseekV3DecoderLayer runs each block (every nn.Linear's input observed; the routed
# experts per expert under the hub's per-expert names, archs/experts.py). llama.cpp runs MLA absorbed, so
# llama-imatrix records what attn_k_b and attn_v_b multiply (src/models/deepseek2.cpp: wk_b x q_nope per head;
# llama-graph.cpp build_attn_mha: v_mla x the attention output over the latent per head), not kv_b_proj's input.
ABSORBED_INPUTS = (("attn_k_b", "self_attn.q_nope"), ("attn_v_b", "self_attn.latent_out"))

ARCH = Arch(
    hf_class="DeepseekV3ForCausalLM",
    model_types=("deepseek_v3",),
    gguf_arch=gguf.MODEL_ARCH.DEEPSEEK2,
    shapes=shapes,
    dims=dims,
    meta=META,
    moe=True,
    expert_count=("n_routed_experts",),
    rename=rename,
    tensor_hook=tensors,
    extra_meta=meta,
    check=check,
    jobs=("gguf", "mlx", "calibrate"),
    absorbed_inputs=ABSORBED_INPUTS,
    left_out_note="the multi-token-prediction layer ({n} tensors) is left out, as llama.cpp's converter does",
    # vLLM: R1 thinks (deepseek_r1); V3 does not; both write DeepSeek's own tool-call tokens (deepseek_v3)
    vllm=(VllmParsers("r1", "deepseek_r1", "deepseek_v3"), VllmParsers("", None, "deepseek_v3")),
    release_bytes_per_param=1.0,  # V3, R1, R1-0528, V3.1 are published in FP8 (block scales: under 0.1% more)
)

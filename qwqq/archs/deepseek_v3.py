"""DeepSeek-V3 / R1 (671B): MLA attention, 256 routed experts + 1 shared, the first layers dense.

Sized by fit from its config (llama.cpp's deepseek2 layout, attn_kv_b unsplit, no MTP layer): an
approximate shape model. qwqq cannot quantize it yet."""

import gguf

from qwqq.archs.base import Arch, Dims, Shapes, embedding_shapes


def shapes(c: dict, output_tensor: bool = False) -> Shapes:
    hidden, n_layer = int(c["hidden_size"]), int(c["num_hidden_layers"])
    n_head = int(c["num_attention_heads"])
    q_lora, kv_lora = int(c["q_lora_rank"]), int(c["kv_lora_rank"])
    nope, rope, v_dim = int(c["qk_nope_head_dim"]), int(c["qk_rope_head_dim"]), int(c["v_head_dim"])
    ff, mff = int(c["intermediate_size"]), int(c["moe_intermediate_size"])
    n_expert, n_shared = int(c["n_routed_experts"]), int(c.get("n_shared_experts") or 0)
    dense = int(c.get("first_k_dense_replace") or 0)
    out = embedding_shapes(c, output_tensor)
    for i in range(n_layer):
        p = f"blk.{i}."
        out += [(p + "attn_norm.weight", (hidden,)), (p + "ffn_norm.weight", (hidden,)),
                (p + "attn_q_a_norm.weight", (q_lora,)), (p + "attn_kv_a_norm.weight", (kv_lora,)),
                (p + "attn_q_a.weight", (q_lora, hidden)), (p + "attn_q_b.weight", (n_head * (nope + rope), q_lora)),
                (p + "attn_kv_a_mqa.weight", (kv_lora + rope, hidden)),
                (p + "attn_kv_b.weight", (n_head * (nope + v_dim), kv_lora)),
                (p + "attn_output.weight", (hidden, n_head * v_dim))]
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
                int(c["num_experts_per_tok"]), int(c["moe_intermediate_size"]), int(c.get("max_position_embeddings") or 0))


ARCH = Arch(
    hf_class="DeepseekV3ForCausalLM",
    model_types=("deepseek_v3",),
    gguf_arch=gguf.MODEL_ARCH.DEEPSEEK2,
    shapes=shapes,
    dims=dims,
    moe=True,
    expert_count=("n_routed_experts",),
    quantizable=False,
)

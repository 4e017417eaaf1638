"""Qwen3.5 MoE (35B-A3B, 122B-A10B, 397B-A17B) and Qwen3.6-35B-A3B: the hybrid decoder (archs/hybrid.py)
with routed experts stored fused (mlp.experts.gate_up_proj / down_proj) plus a shared expert behind a
sigmoid gate, as a multimodal release (Qwen3_5MoeForConditionalGeneration) or its text-only form."""

import functools

import gguf

from qwqq.archs import hybrid, hybrid_hub, qwen3_5
from qwqq.archs.base import COMMON, MOE, Arch, Meta

META = tuple(m for m in COMMON if m.key not in ("block_count", "feed_forward_length")) + MOE + (
    Meta("expert_shared_feed_forward_length", ("shared_expert_intermediate_size",), "u32"),)

ARCH = Arch(
    hf_class="Qwen3_5MoeForConditionalGeneration",
    also_classes=("Qwen3_5MoeForCausalLM",),
    model_types=("qwen3_5_moe", "qwen3_5_moe_text"),
    gguf_arch=gguf.MODEL_ARCH.QWEN35MOE,
    shapes=lambda config, output_tensor=False: hybrid.shapes(config, output_tensor, moe=True, split_ba=True),
    dims=hybrid.dims,
    meta=META,
    moe=True,
    rename=hybrid.rename,
    tensor_hook=functools.partial(hybrid.hybrid_tensors, tiled_v=True),
    extra_meta=lambda hp, n_block: hybrid.meta(hp, n_block, sections=True),
    has_mtp=True,
    left_out_note="the vision tower ({n} tensors) is left out: this GGUF is the language model (an mmproj file for "
                  "images is not written yet)",
    jobs=("gguf", "mlx", "gptq", "calibrate"),
    hub_tensors=functools.partial(hybrid_hub.hub_tensors, moe=True, split_ba=True, fused_experts=True),
    gated_attention=True,
    check=hybrid.check,
    sampling=qwen3_5.SAMPLING,  # Qwen3.5 / 3.6 MoE: the same cards
    vllm=qwen3_5.VLLM,
)

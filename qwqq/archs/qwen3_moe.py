"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention, every layer a router over routed experts.

Experts ship one tensor per expert and projection (or fused, as transformers 5 saves them); GGUF stacks
them per projection, mlx-lm into switch_mlp, GPTQ keeps a linear per expert (see archs/experts.py)."""

import gguf

from qwqq.archs import qwen3
from qwqq.archs.base import COMMON, MOE, Arch, decoder_dims, decoder_shapes

ARCH = Arch(
    hf_class="Qwen3MoeForCausalLM",
    model_types=("qwen3_moe",),
    gguf_arch=gguf.MODEL_ARCH.QWEN3MOE,
    shapes=lambda config, output_tensor=False: decoder_shapes(
        config, attn_bias=bool(config.get("attention_bias")), attn_out_bias=True, qk_norm=True,
        mlp_bias=bool(config.get("mlp_bias")), moe=True, output_tensor=output_tensor),
    dims=decoder_dims,
    meta=COMMON + MOE,
    moe=True,
    sampling=qwen3.SAMPLING,  # Qwen3-30B-A3B / 235B-A22B and their 2507 releases: the same cards
    vllm=qwen3.VLLM,  # Qwen3-Coder-30B-A3B / 480B-A35B are this family
)

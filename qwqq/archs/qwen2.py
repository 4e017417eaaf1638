"""Qwen2 (QwQ-32B, Qwen2.5, DeepSeek-R1-Distill-Qwen): q/k/v biases, no output bias, grouped-query attention."""

import gguf

from qwqq.archs.base import Arch, Sampling, VllmParsers, decoder_dims, decoder_shapes

ARCH = Arch(
    hf_class="Qwen2ForCausalLM",
    model_types=("qwen2",),
    gguf_arch=gguf.MODEL_ARCH.QWEN2,
    shapes=lambda config, output_tensor=False: decoder_shapes(
        config, attn_bias=True, attn_out_bias=False, qk_norm=False, mlp_bias=bool(config.get("mlp_bias")),
        output_tensor=output_tensor),
    dims=decoder_dims,
    seventy_b_layers=80,
    # The models people run on this architecture, first match wins (QwQ's card: top_k 20-40).
    sampling=(
        Sampling("qwq", "QwQ", dict(temperature=0.6, top_p=0.95, top_k=40, min_p=0.0)),
        Sampling("r1distill|deepseekr1", "DeepSeek-R1-Distill", dict(temperature=0.6, top_p=0.95, top_k=0, min_p=0.0)),
    ),
    # vLLM: QwQ and the R1 distills think in <think> blocks (deepseek_r1); Qwen2.5 does not. All write JSON tool calls.
    vllm=(
        VllmParsers("qwq|r1distill|deepseekr1", "deepseek_r1", "hermes"),
        VllmParsers("", None, "hermes"),
    ),
)

"""Qwen3 dense (0.6B to 32B): q/k RMS norms per head, an explicit head_dim (128 whatever the width), no biases."""

import gguf

from qwqq.archs.base import Arch, Sampling, VllmParsers, decoder_dims, decoder_shapes

THINKING = dict(temperature=0.6, top_p=0.95, top_k=20, min_p=0.0)
INSTRUCT = dict(temperature=0.7, top_p=0.8, top_k=20, min_p=0.0)
# The model cards: Qwen3 with thinking on / off (enable_thinking); Qwen3-2507 ships apart as Instruct (never
# thinks) and Thinking (always does), so those two go by name whatever --think says. Qwen3-MoE shares them.
SAMPLING = (
    Sampling("thinking2507", "Qwen3-2507 Thinking", THINKING),
    Sampling("instruct2507", "Qwen3-2507 Instruct", INSTRUCT),
    Sampling("qwen3", "Qwen3 thinking", THINKING, thinking=True),
    Sampling("qwen3", "Qwen3 non-thinking", INSTRUCT, thinking=False),
)
# vLLM: Qwen3-Coder writes XML tool calls and does not think; Qwen3-2507 Instruct never thinks; the rest think
# (the qwen3 parser, which also takes an answer without a <think> block) and write JSON calls (hermes).
VLLM = (
    VllmParsers("coder", None, "qwen3_coder"),
    VllmParsers("instruct2507|instruct", None, "hermes"),
    VllmParsers("", "qwen3", "hermes"),
)

ARCH = Arch(
    hf_class="Qwen3ForCausalLM",
    model_types=("qwen3",),
    gguf_arch=gguf.MODEL_ARCH.QWEN3,
    shapes=lambda config, output_tensor=False: decoder_shapes(
        config, attn_bias=bool(config.get("attention_bias")), attn_out_bias=True, qk_norm=True,
        mlp_bias=bool(config.get("mlp_bias")), output_tensor=output_tensor),
    dims=decoder_dims,
    sampling=SAMPLING,
    vllm=VLLM,
)

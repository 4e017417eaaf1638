"""Llama (SmolLM2, DeepSeek-R1-Distill-Llama): HF's rotate-half q/k rows permuted to GGUF's interleaved
pairs; optional attention and MLP biases; rope.dimension_count and vocab_size written as llama.cpp's
converter does."""

import gguf

from qwqq.archs.base import Arch, VllmParsers, decoder_dims, decoder_shapes

ARCH = Arch(
    hf_class="LlamaForCausalLM",
    model_types=("llama",),
    gguf_arch=gguf.MODEL_ARCH.LLAMA,
    shapes=lambda config, output_tensor=False: decoder_shapes(
        config, attn_bias=bool(config.get("attention_bias")), attn_out_bias=True, qk_norm=False,
        mlp_bias=bool(config.get("mlp_bias")), output_tensor=output_tensor),
    dims=decoder_dims,
    permute_qk=True,
    rope_dims_key=True,
    seventy_b_layers=80,
    seventy_b_needs_gqa=True,
    vllm=(VllmParsers("r1distill|deepseekr1", "deepseek_r1", None),),  # DeepSeek-R1-Distill-Llama thinks
)

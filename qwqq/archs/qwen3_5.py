"""Qwen3.5 dense (0.8B to 27B), Qwen3.6-27B, Qwen3.8-27B: the hybrid decoder (archs/hybrid.py) with a dense
SwiGLU MLP, as a multimodal release (Qwen3_5ForConditionalGeneration: text_config, model.language_model.*,
a vision tower qwqq leaves out) or its text-only form (Qwen3_5ForCausalLM). Separate in_proj_a / in_proj_b,
value heads reordered to tiled order, interleaved M-RoPE sections, one MTP block."""

import functools

import gguf

from qwqq.archs import hybrid, hybrid_hub
from qwqq.archs.base import COMMON, Arch, Sampling, VllmParsers

META = tuple(m for m in COMMON if m.key != "block_count")  # block_count counts the MTP blocks: hybrid.meta
# The Qwen3.5 / 3.6 / 3.8 cards (general tasks): thinking (the default) 1.0 / 0.95 / 20 / 0 with presence
# penalty 1.5; non-thinking (--no-think; the card's "instruct" values, Qwen3.5's) 0.7 / 0.8 / 20 / 0, 1.5.
SAMPLING = (
    Sampling("", "Qwen3.5+ thinking", dict(temperature=1.0, top_p=0.95, top_k=20, min_p=0.0, presence_penalty=1.5),
             thinking=True),
    Sampling("", "Qwen3.5+ non-thinking", dict(temperature=0.7, top_p=0.8, top_k=20, min_p=0.0, presence_penalty=1.5),
             thinking=False),
)
# vLLM: Qwen3.5 and later think (qwen3 parser) and write XML tool calls (qwen3_coder).
VLLM = (VllmParsers("", "qwen3", "qwen3_coder"),)

ARCH = Arch(
    hf_class="Qwen3_5ForConditionalGeneration",
    also_classes=("Qwen3_5ForCausalLM",),
    model_types=("qwen3_5", "qwen3_5_text"),
    gguf_arch=gguf.MODEL_ARCH.QWEN35,
    shapes=lambda config, output_tensor=False: hybrid.shapes(config, output_tensor, moe=False, split_ba=True),
    dims=hybrid.dims,
    meta=META,
    rename=hybrid.rename,
    tensor_hook=functools.partial(hybrid.hybrid_tensors, tiled_v=True),
    extra_meta=lambda hp, n_block: hybrid.meta(hp, n_block, sections=True),
    has_mtp=True,
    left_out_note="the vision tower ({n} tensors) is left out: this GGUF is the language model (an mmproj file for "
                  "images is not written yet)",
    jobs=("gguf", "mlx", "gptq", "calibrate"),
    hub_tensors=functools.partial(hybrid_hub.hub_tensors, moe=False, split_ba=True),
    gated_attention=True,
    check=hybrid.check,
    sampling=SAMPLING,
    vllm=VLLM,
)

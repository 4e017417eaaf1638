"""Qwen3-Next (80B-A3B, Qwen3-Coder-Next): the hybrid decoder (archs/hybrid.py), a flat config, experts
stored one tensor per expert, 512 routed plus a shared expert; in_proj_qkvz regrouped into attn_qkv and
attn_gate, one in_proj_ba; value heads kept in their stored order; the MTP block its config does not
declare (counted from the tensors)."""

import functools

import gguf

from qwqq.archs import hybrid, hybrid_hub
from qwqq.archs.qwen3 import INSTRUCT, THINKING, VLLM
from qwqq.archs.base import COMMON, MOE, Arch, Meta, Sampling

META = tuple(m for m in COMMON if m.key != "block_count") + MOE + (
    Meta("expert_shared_feed_forward_length", ("shared_expert_intermediate_size",), "u32"),)
# Qwen3-Next-80B-A3B ships as Instruct (never thinks) and Thinking (always does): by name, else by --think /
# --no-think (a model named neither: Thinking's values unless thinking is switched off).
SAMPLING = (
    Sampling("qwen3next.*thinking", "Qwen3-Next Thinking", THINKING),
    Sampling("qwen3next.*instruct", "Qwen3-Next Instruct", INSTRUCT),
    Sampling("", "Qwen3-Next Thinking", THINKING, thinking=True),
    Sampling("", "Qwen3-Next Instruct", INSTRUCT, thinking=False),
)

ARCH = Arch(
    hf_class="Qwen3NextForCausalLM",
    model_types=("qwen3_next",),
    gguf_arch=gguf.MODEL_ARCH.QWEN3NEXT,
    shapes=lambda config, output_tensor=False: hybrid.shapes(config, output_tensor, moe=True, split_ba=False),
    dims=hybrid.dims,
    meta=META,
    moe=True,
    rename=hybrid.rename,
    tensor_hook=functools.partial(hybrid.hybrid_tensors, tiled_v=False),
    extra_meta=lambda hp, n_block: hybrid.meta(hp, n_block, sections=False),
    has_mtp=True,
    jobs=("gguf", "mlx", "gptq", "calibrate"),
    hub_tensors=functools.partial(hybrid_hub.hub_tensors, moe=True, split_ba=False),
    gated_attention=True,
    check=hybrid.check,
    sampling=SAMPLING,
    vllm=VLLM,  # Qwen3-Next Thinking / Instruct as Qwen3's, Qwen3-Coder-Next as Qwen3-Coder's
)

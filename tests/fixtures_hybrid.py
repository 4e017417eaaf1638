"""Tiny random checkpoints of the hybrid Qwen architectures (Gated DeltaNet + gated attention).

One public builder, ``tiny_hybrid_dir(arch, ...)``, for

* ``qwen3_5``      Qwen3.5 dense    (``Qwen3_5ForConditionalGeneration``, or ``Qwen3_5ForCausalLM``)
* ``qwen3_5_moe``  Qwen3.5 MoE      (``Qwen3_5MoeForConditionalGeneration``, or ``Qwen3_5MoeForCausalLM``)
* ``qwen3_next``   Qwen3-Next (MoE) (``Qwen3NextForCausalLM``)

Each is seeded and deterministic, built once into the fixture cache (see
``tests/fixtures.py``), and laid out on disk as the real Hugging Face releases
are, which is *not* always what ``save_pretrained`` writes:

* Qwen3.5-MoE stores its routed experts fused, ``mlp.experts.gate_up_proj``
  ``[E, 2*ff, hidden]`` and ``mlp.experts.down_proj`` ``[E, hidden, ff]``
  (transformers 5.25 saves them split per expert; they are fused again here).
  Qwen3-Next stores them per expert, ``mlp.experts.{e}.{gate,up,down}_proj.weight``
  (as transformers saves them).
* The releases carry one multi-token-prediction (MTP) block, which transformers
  neither builds nor saves: ``mtp.fc.weight`` ``[hidden, 2*hidden]``,
  ``mtp.pre_fc_norm_embedding.weight``, ``mtp.pre_fc_norm_hidden.weight``,
  ``mtp.norm.weight`` and ``mtp.layers.0.*``, one full-attention decoder layer
  named like a model layer (MLP or MoE as the model's).  Added here when
  ``mtp=True``.  Qwen3.5 declares it (``mtp_num_hidden_layers: 1``); the
  Qwen3-Next release does not (llama.cpp's converter counts the tensors).
* Qwen3.5 keeps ``linear_attn.A_log`` and ``linear_attn.norm.weight`` in float32
  whatever the checkpoint dtype (as the published Qwen3.5 checkpoints do).
* config.json carries the release's extra keys: Qwen3.5's ``full_attention_interval``,
  ``attn_output_gate``, ``mamba_ssm_dtype``, ``mtp_*``; Qwen3-Next's legacy flat
  layout (``rope_theta``, ``partial_rotary_factor``, ``full_attention_interval``
  and ``torch_dtype`` at top level, no ``layer_types``, no ``rope_parameters``),
  as its transformers-4.57 era release has.

Shapes (all three): vocab 4096 with the cut Qwen tokenizer (``tests.fixtures.tiny_tokenizer_dir``), hidden 256,
4 layers = 3 Gated DeltaNet (``linear_attention``) + 1 ``full_attention``,
untied ``lm_head``, rms_norm_eps 1e-6, max_position_embeddings 4096.

* Gated DeltaNet: 2 key heads, 4 value heads (K != V, so converters must
  reorder V heads), head dims 32, conv kernel 4.
* Gated attention: 4 query heads, 2 KV heads, head_dim 64; ``q_proj`` has
  2 * 4 * 64 rows (query and output gate interleaved per head); partial RoPE
  over 16 of 64 dims, theta 1e7 (Qwen3.5: interleaved M-RoPE, sections [3, 3, 2]).
* MLP: dense 512 (qwen3_5); MoE (qwen3_5_moe, qwen3_next): 8 experts, top-2,
  expert ff 128, one shared expert (ff 128) with a sigmoid gate
  ``mlp.shared_expert_gate``, router ``mlp.gate``.  qwen3_next also sets
  ``intermediate_size`` 512 (unused: every layer is sparse).
* Vision tower (Qwen3.5 with ``vision=True``): depth 1, hidden 32, 2 heads,
  patch 16, a 4x4 position grid, merger out 256: present so tests can prove a
  text-only pipeline skips ``model.visual.*``.

Weights: ``tests.fixtures._randomize`` (N(0, 0.05) matrices), then the
parameters it cannot know about: the zero-centred RMSNorms (computing
``x * (1 + w)``: decoder norms, q/k norms, final and MTP norms) get
``0.1 N(0, 1)``; the gated RMSNorm ``linear_attn.norm`` (``x * w``) and vision
LayerNorms keep ``1 + 0.1 N(0, 1)``; ``A_log`` is log-uniform over the modeling
code's A range [0.01, 16] (so some heads remember, some forget fast);
``dt_bias`` is ``1 + 0.5 N(0, 1)`` (modeling init: ones; distinct per head, so
head order matters); the depthwise ``conv1d`` is N(0, 0.3) (near PyTorch's
default init) so its SiLU does real work.  The language model (and the MTP
block) of one seed is the same whatever ``mtp`` and ``vision``: the text-only
and multimodal forms give the same logits.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from tests.fixtures import (QWEN_VOCAB_SIZE, TINY_VOCAB_SIZE, _build, _randomize, _torch_dtype, cache_root,
                            qwen_tokenizer_dir, tiny_tokenizer_dir)

HYBRID_ARCHS = ("qwen3_5", "qwen3_5_moe", "qwen3_next")

# Bump when the output of tiny_hybrid_dir changes, so stale caches are not reused (2: the tiny models take the cut
# tokenizer of tests.fixtures.tiny_tokenizer_dir, vocab 4096; the benchmark sizes keep the real one).
RECIPE = 2
BENCH_RECIPE = 1  # the same for the benchmark sizes (SIZES other than "tiny")

STD = 0.05  # initializer_range, as tiny_model_dir's
ROUTER_GAIN = 3.0  # routers drawn wider: llama.cpp and transformers route alike (see tests.fixtures_deepseek)

_TEXT = dict(
    vocab_size=TINY_VOCAB_SIZE,
    hidden_size=256,
    num_hidden_layers=4,  # layer_types from full_attention_interval 4: linear x3, full
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=32,
    linear_value_head_dim=32,
    linear_conv_kernel_dim=4,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    initializer_range=STD,
    tie_word_embeddings=False,
)
# Larger shapes for benchmarks (bench/), named by the release they copy; "tiny" is the tests' default.
SIZES = {
    "tiny": {},
    "tiny-qwen-vocab": dict(vocab_size=QWEN_VOCAB_SIZE),  # the tiny shapes with the real tokenizer and vocabulary
    "0.8b": dict(vocab_size=QWEN_VOCAB_SIZE, hidden_size=1024, num_hidden_layers=24, num_attention_heads=8, num_key_value_heads=2, head_dim=256,
                 linear_num_key_heads=16, linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
                 intermediate_size=3584, tie_word_embeddings=True, max_position_embeddings=262144),  # Qwen3.5-0.8B
}
_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, shared_expert_intermediate_size=128)
_ROPE_THETA = 1e7
_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
               temporal_patch_size=2, num_position_embeddings=16, out_hidden_size=_TEXT["hidden_size"])

_CLASSES = {  # arch -> (multimodal class, text-only class)
    "qwen3_5": ("Qwen3_5ForConditionalGeneration", "Qwen3_5ForCausalLM"),
    "qwen3_5_moe": ("Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeForCausalLM"),
    "qwen3_next": (None, "Qwen3NextForCausalLM"),
}


# ---------------------------------------------------------------- config


def _tokenizer_dir(size: str) -> Path:
    """The tiny models' cut tokenizer; the benchmark sizes keep the real one (and the real vocabulary)."""
    return tiny_tokenizer_dir() if size == "tiny" else qwen_tokenizer_dir()


def _token_ids(size: str) -> dict[str, int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(_tokenizer_dir(size) / "tokenizer.json"))
    names = {"bos": "<|endoftext|>", "eos": "<|im_end|>", "vision_start": "<|vision_start|>",
             "vision_end": "<|vision_end|>", "image": "<|image_pad|>", "video": "<|video_pad|>"}
    return {key: tok.token_to_id(text) for key, text in names.items()}


def _config(arch: str, vision: bool, size: str = "tiny"):
    """The transformers config object of the model to build (before config.json is patched)."""
    import transformers

    ids = _token_ids(size)
    sizes = dict(SIZES[size])
    ff = sizes.pop("intermediate_size", 512)
    text = dict(_TEXT, **sizes, bos_token_id=ids["bos"], eos_token_id=ids["eos"])
    rope_dims = int(text["head_dim"] * 0.25) // 2  # M-RoPE sections cover half the rotary dims
    sections = [rope_dims // 3 + (i < rope_dims % 3) for i in range(3)]  # 8 -> [3, 3, 2], 32 -> [11, 11, 10]
    if arch == "qwen3_next":
        return transformers.Qwen3NextConfig(
            intermediate_size=ff,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
            rope_parameters={"rope_type": "default", "rope_theta": _ROPE_THETA, "partial_rotary_factor": 0.25},
            **_MOE,
            **text,
        )
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": _ROPE_THETA, "partial_rotary_factor": 0.25,
                               "mrope_section": sections, "mrope_interleaved": True}
    if arch == "qwen3_5":
        text_config = transformers.Qwen3_5TextConfig(intermediate_size=ff, **text)
        outer = transformers.Qwen3_5Config
    else:
        text_config = transformers.Qwen3_5MoeTextConfig(**_MOE, **text)
        outer = transformers.Qwen3_5MoeConfig
    if not vision:
        return text_config
    return outer(
        text_config=text_config.to_dict(),
        vision_config=_VISION,
        image_token_id=ids["image"],
        video_token_id=ids["video"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
        tie_word_embeddings=False,
    )


def _patch_config_json(path: Path, arch: str, mtp: bool) -> None:
    """Give config.json the keys (and, for Qwen3-Next, the layout) of the real release's."""
    config = json.loads(path.read_text())
    if arch == "qwen3_next":
        # transformers 4.57 layout: flat rope keys, the layer pattern as an interval, torch_dtype, no MTP key
        rope = config.pop("rope_parameters")
        config.pop("layer_types")
        config.update(full_attention_interval=4, rope_theta=rope["rope_theta"],
                      partial_rotary_factor=rope["partial_rotary_factor"], rope_scaling=None,
                      torch_dtype=config.pop("dtype"))
    else:
        text = config.get("text_config", config)
        text.update(full_attention_interval=4, attn_output_gate=True, mamba_ssm_dtype="float32",
                    mtp_num_hidden_layers=1 if mtp else 0, mtp_use_dedicated_embeddings=False)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------- weights


def _init_weights(module, seed: int) -> None:
    """Seeded weights for ``module``: ``_randomize``, then the hybrid-specific parameters fixed up
    (see the module docstring)."""
    import math

    import torch

    _randomize(module, seed, STD)
    gen = torch.Generator().manual_seed(seed + 7919)  # a stream apart from _randomize's
    randn = lambda p: torch.randn(p.shape, generator=gen, dtype=torch.float32)
    with torch.no_grad():
        for _, sub in module.named_modules():
            kind = type(sub).__name__
            if kind.endswith("RMSNorm"):  # Qwen3_5RMSNorm & co: x * (1 + w), stored zero-centred
                sub.weight.copy_(0.1 * randn(sub.weight))
            elif kind.endswith("RMSNormGated"):  # linear_attn.norm: x * w * silu(z)
                sub.weight.copy_(1 + 0.1 * randn(sub.weight))
            elif isinstance(sub, torch.nn.LayerNorm):  # vision tower
                sub.weight.copy_(1 + 0.1 * randn(sub.weight))
            elif kind.endswith("SparseMoeBlock"):  # router margins above float noise, as tests.fixtures_deepseek
                sub.gate.weight.mul_(ROUTER_GAIN)
            elif kind.endswith("GatedDeltaNet"):
                lo, hi = math.log(0.01), math.log(16.0)
                sub.A_log.copy_(lo + (hi - lo) * torch.rand(sub.A_log.shape, generator=gen))
                sub.dt_bias.copy_(1 + 0.5 * randn(sub.dt_bias))
                sub.conv1d.weight.copy_(0.3 * randn(sub.conv1d.weight))


def _mtp_block(model):
    """The release's MTP block as a module whose state_dict keys are the checkpoint's ``mtp.*`` names
    (less the prefix): fc, the two pre-fc norms, one full-attention decoder layer, the final norm."""
    import torch

    text_model = model.model.language_model if hasattr(model.model, "language_model") else model.model
    config = text_model.config
    hidden = config.hidden_size
    norm_cls = type(text_model.norm)
    layer_idx = config.layer_types.index("full_attention")
    mtp = torch.nn.Module()
    mtp.fc = torch.nn.Linear(2 * hidden, hidden, bias=False)  # [embedding norm | hidden norm] -> hidden
    mtp.pre_fc_norm_embedding = norm_cls(hidden, eps=config.rms_norm_eps)
    mtp.pre_fc_norm_hidden = norm_cls(hidden, eps=config.rms_norm_eps)
    mtp.layers = torch.nn.ModuleList([type(text_model.layers[layer_idx])(config, layer_idx)])
    mtp.norm = norm_cls(hidden, eps=config.rms_norm_eps)
    return mtp


_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def _fuse_experts(state: dict) -> dict:
    """Per-expert tensors ``...experts.{e}.{gate,up,down}_proj.weight`` -> ``...experts.gate_up_proj``
    ``[E, 2*ff, hidden]`` (gate rows first) and ``...experts.down_proj`` ``[E, hidden, ff]``."""
    import torch

    out, groups = {}, {}
    for name, tensor in state.items():
        m = _EXPERT.match(name)
        if m:
            groups.setdefault(m[1], {}).setdefault(m[3], {})[int(m[2])] = tensor
        else:
            out[name] = tensor
    for prefix, parts in groups.items():
        stack = lambda part: torch.stack([parts[part][e] for e in sorted(parts[part])])
        out[f"{prefix}.gate_up_proj"] = torch.cat([stack("gate_proj"), stack("up_proj")], dim=1).contiguous()
        out[f"{prefix}.down_proj"] = stack("down_proj").contiguous()
    return out


def _split_experts(state: dict) -> dict:
    """The inverse of ``_fuse_experts``: fused ``gate_up_proj`` / ``down_proj`` -> per-expert ``.weight``s."""
    out = {}
    for name, tensor in state.items():
        if name.endswith(".mlp.experts.gate_up_proj"):
            prefix, ff = name.removesuffix(".gate_up_proj"), tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                out[f"{prefix}.{e}.gate_proj.weight"] = tensor[e, :ff].contiguous()
                out[f"{prefix}.{e}.up_proj.weight"] = tensor[e, ff:].contiguous()
        elif name.endswith(".mlp.experts.down_proj"):
            prefix = name.removesuffix(".down_proj")
            for e in range(tensor.shape[0]):
                out[f"{prefix}.{e}.down_proj.weight"] = tensor[e].contiguous()
        else:
            out[name] = tensor
    return out


def _release_layout(path: Path, arch: str, mtp_state: dict | None, torch_dtype) -> None:
    """Rewrite save_pretrained's model.safetensors into the release's tensor layout (see the module
    docstring), adding the MTP tensors."""
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    if mtp_state is not None:
        state.update({f"mtp.{k}": v.to(torch_dtype) for k, v in mtp_state.items()})
    state = _fuse_experts(_split_experts(state)) if arch == "qwen3_5_moe" else _split_experts(state)
    if arch != "qwen3_next":  # Qwen3.5 releases keep these two in float32
        state = {k: v.float() if k.endswith(("linear_attn.A_log", "linear_attn.norm.weight")) else v
                 for k, v in state.items()}
    if any(t.dtype not in (torch_dtype, torch.float32) for t in state.values()):
        raise RuntimeError(f"unexpected dtypes in {path}")
    save_file({k: state[k].contiguous() for k in sorted(state)}, str(path), metadata={"format": "pt"})


# ---------------------------------------------------------------- the builder


def tiny_hybrid_dir(arch: str, dtype: str = "bfloat16", mtp: bool = True, vision: bool = True, seed: int = 0,
                    size: str = "tiny") -> Path:
    """A tiny seeded random hybrid Qwen checkpoint in the real release's on-disk layout.

    ``arch``: ``qwen3_5``, ``qwen3_5_moe`` or ``qwen3_next`` (shapes, layouts and
    weight statistics in the module docstring).  ``dtype``: ``bfloat16``,
    ``float16`` or ``float32`` for the safetensors (Qwen3.5's ``A_log`` and
    ``linear_attn.norm.weight`` stay float32).  ``mtp``: add the release's
    multi-token-prediction tensors ``mtp.*``.  ``vision``: for Qwen3.5, the
    release form ``*ForConditionalGeneration`` (nested ``text_config``, weights
    ``model.language_model.*`` beside a tiny vision tower ``model.visual.*``);
    with ``vision=False`` the text-only ``Qwen3_5ForCausalLM`` /
    ``Qwen3_5MoeForCausalLM`` form (flat config, model_type ``qwen3_5_text`` /
    ``qwen3_5_moe_text``, weights ``model.*``).  Ignored for ``qwen3_next``,
    which has no vision tower (always ``Qwen3NextForCausalLM``, flat config,
    ``model.*``).  ``lm_head.weight`` is always its own tensor.

    The folder holds config.json (``architectures`` set), model.safetensors,
    generation_config.json and the cut Qwen tokenizer (``tiny_tokenizer_dir``, vocab 4096; a benchmark
    size: the real one, vocab 151936).  About 5 MB in bfloat16.  Builds in a few seconds.

    Note: llama.cpp's converter (llama-cpp-python 0.3.36) fails an assertion on a
    Qwen3-Next / Qwen3.5 checkpoint without MTP tensors unless given ``--no-mtp``.
    """
    import torch

    if arch not in HYBRID_ARCHS:
        raise ValueError(f"arch must be one of {HYBRID_ARCHS}, not {arch!r}")
    torch_dtype = _torch_dtype(dtype)
    vision = vision and arch != "qwen3_next"
    name = f"tiny-{arch}-{dtype}-{'mtp' if mtp else 'nomtp'}-{'vision' if vision else 'text'}-seed{seed}-r{RECIPE}"
    if size != "tiny":  # a benchmark's shape (SIZES), text-only
        if vision:
            raise ValueError(f"size {size!r} is built text-only: pass vision=False")
        name = f"random-{arch}-{size}-{dtype}-{'mtp' if mtp else 'nomtp'}-seed{seed}-r{BENCH_RECIPE}"

    def build(tmp: Path) -> None:
        import transformers
        from transformers import GenerationConfig

        cls = getattr(transformers, _CLASSES[arch][0 if vision else 1])
        config = _config(arch, vision, size)
        model = cls(config)  # float32; every parameter is overwritten below
        block = _mtp_block(model) if mtp else None
        # One pass, in this order, so the language model's weights do not depend on ``mtp`` or ``vision``
        # (the text-only and multimodal forms of one seed hold the same language model).
        inner = model.model
        parts = {"text": getattr(inner, "language_model", inner), "lm_head": model.lm_head}
        parts.update({"mtp": block} if mtp else {})
        parts.update({"visual": inner.visual} if vision else {})
        parts = torch.nn.ModuleDict(parts)
        if {id(p) for p in model.parameters()} - {id(p) for p in parts.parameters()}:
            raise RuntimeError(f"{cls.__name__} has parameters outside {list(parts)}")
        _init_weights(parts, seed)
        model = model.to(torch_dtype)
        model.config.architectures = [cls.__name__]
        model.save_pretrained(str(tmp))
        written = sorted(p.name for p in tmp.glob("*.safetensors"))
        if written != ["model.safetensors"]:
            raise RuntimeError(f"save_pretrained wrote {written}, not one model.safetensors")
        _release_layout(tmp / "model.safetensors", arch, block.state_dict() if mtp else None, torch_dtype)
        _patch_config_json(tmp / "config.json", arch, mtp)
        text_config = getattr(config, "text_config", config)
        GenerationConfig(
            bos_token_id=text_config.bos_token_id,
            eos_token_id=[text_config.eos_token_id, text_config.bos_token_id],  # <|im_end|>, <|endoftext|>
            pad_token_id=text_config.bos_token_id,
        ).save_pretrained(str(tmp))
        for f in _tokenizer_dir(size).iterdir():
            shutil.copy2(f, tmp / f.name)

    return _build(cache_root() / name, build)

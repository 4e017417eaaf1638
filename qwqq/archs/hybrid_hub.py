"""The hybrid families' tensors as a release names and stores them, from its config alone (fit).

A GPTQ folder keeps the release's own names and copies what it does not quantize as floats: the vision tower,
the MTP block (its fused experts included), in_proj_a / in_proj_b / in_proj_ba, conv1d, norms, routers. So fit
sizes a hybrid's GPTQ folder from the release's tensor list, not from the GGUF shapes mapped back (the GGUF
splits Qwen3-Next's in_proj_qkvz, squeezes conv1d, renames MTP as nextn and leaves the vision tower out). Held
equal to the tiny checkpoints' own tensor lists (tests/test_fit_gptq.py).

- names: a multimodal release (architectures[0] a *ForConditionalGeneration) keeps its text model under
  `model.language_model.`, a text-only one under `model.`; the MTP block is `mtp.*` (hybrid.MTP_GLOBALS);
- experts: fused on disk (`mlp.experts.gate_up_proj` [E, 2*ff, hidden], `mlp.experts.down_proj`) or one
  tensor per expert, as the family's releases store them;
- vision tower: from config.json's `vision_config` (transformers' Qwen3_5VisionModel); a config without one
  (a catalog entry summarising the language model) has none.
"""

from __future__ import annotations

from qwqq.archs.base import cfg, head_dim, hparams
from qwqq.archs.hybrid import LANGUAGE_PREFIX, MTP_GLOBALS, layer_types, linear_dims, n_mtp

Shape = tuple[int, ...]
# transformers' Qwen3_5VisionConfig defaults (Qwen3.5-MoE's are the same), for keys a vision_config leaves out
VISION_DEFAULTS = dict(depth=27, hidden_size=1152, intermediate_size=4304, in_channels=3, patch_size=16,
                       temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=3584, num_position_embeddings=2304)
VISION_PREFIX = "model.visual."
MULTIMODAL_SUFFIX = "ForConditionalGeneration"  # transformers' class naming: a language tower beside a vision one


def _attention(hp: dict, hidden: int) -> list[tuple[str, Shape]]:
    n_head, hd = int(hp["num_attention_heads"]), head_dim(hp)
    n_kv = int(cfg(hp, "num_key_value_heads", default=n_head))
    return [("self_attn.q_proj.weight", (2 * n_head * hd, hidden)), ("self_attn.k_proj.weight", (n_kv * hd, hidden)),
            ("self_attn.v_proj.weight", (n_kv * hd, hidden)), ("self_attn.o_proj.weight", (hidden, n_head * hd)),
            ("self_attn.q_norm.weight", (hd,)), ("self_attn.k_norm.weight", (hd,))]


def _linear_attention(hp: dict, hidden: int, split_ba: bool) -> list[tuple[str, Shape]]:
    nk, nv, dk, dv, kernel = linear_dims(hp)
    conv = 2 * nk * dk + nv * dv
    proj = ([("in_proj_qkv.weight", (conv, hidden)), ("in_proj_z.weight", (nv * dv, hidden)),
             ("in_proj_a.weight", (nv, hidden)), ("in_proj_b.weight", (nv, hidden))] if split_ba else
            [("in_proj_qkvz.weight", (conv + nv * dv, hidden)), ("in_proj_ba.weight", (2 * nv, hidden))])
    rest = [("conv1d.weight", (conv, 1, kernel)), ("dt_bias", (nv,)), ("A_log", (nv,)), ("norm.weight", (dv,)),
            ("out_proj.weight", (hidden, nv * dv))]
    return [("linear_attn." + n, s) for n, s in proj + rest]


def _mlp(hp: dict, hidden: int, moe: bool, fused_experts: bool) -> list[tuple[str, Shape]]:
    if not moe:
        ff = int(hp["intermediate_size"])
        return [("mlp.gate_proj.weight", (ff, hidden)), ("mlp.up_proj.weight", (ff, hidden)),
                ("mlp.down_proj.weight", (hidden, ff))]
    e, mff, sff = int(hp["num_experts"]), int(hp["moe_intermediate_size"]), int(hp["shared_expert_intermediate_size"])
    if fused_experts:
        experts = [("mlp.experts.gate_up_proj", (e, 2 * mff, hidden)), ("mlp.experts.down_proj", (e, hidden, mff))]
    else:
        experts = [(f"mlp.experts.{i}.{p}_proj.weight", (hidden, mff) if p == "down" else (mff, hidden))
                   for i in range(e) for p in ("gate", "up", "down")]
    return [("mlp.gate.weight", (e, hidden)), *experts,
            ("mlp.shared_expert.gate_proj.weight", (sff, hidden)), ("mlp.shared_expert.up_proj.weight", (sff, hidden)),
            ("mlp.shared_expert.down_proj.weight", (hidden, sff)), ("mlp.shared_expert_gate.weight", (1, hidden))]


def vision_tensors(vc: dict) -> dict[str, Shape]:
    """transformers' Qwen3_5VisionModel: patch embedding, learned positions, `depth` blocks, the patch merger."""
    v = {k: int(vc.get(k) or d) for k, d in VISION_DEFAULTS.items()}
    h, ff = v["hidden_size"], v["intermediate_size"]
    merged = h * v["spatial_merge_size"] ** 2
    out = {"patch_embed.proj.weight": (h, v["in_channels"], v["temporal_patch_size"], v["patch_size"], v["patch_size"]),
           "patch_embed.proj.bias": (h,), "pos_embed.weight": (v["num_position_embeddings"], h)}
    for i in range(v["depth"]):
        b = f"blocks.{i}."
        out.update({b + "norm1.weight": (h,), b + "norm1.bias": (h,), b + "norm2.weight": (h,), b + "norm2.bias": (h,),
                    b + "attn.qkv.weight": (3 * h, h), b + "attn.qkv.bias": (3 * h,), b + "attn.proj.weight": (h, h),
                    b + "attn.proj.bias": (h,), b + "mlp.linear_fc1.weight": (ff, h), b + "mlp.linear_fc1.bias": (ff,),
                    b + "mlp.linear_fc2.weight": (h, ff), b + "mlp.linear_fc2.bias": (h,)})
    out.update({"merger.norm.weight": (h,), "merger.norm.bias": (h,), "merger.linear_fc1.weight": (merged, merged),
                "merger.linear_fc1.bias": (merged,), "merger.linear_fc2.weight": (v["out_hidden_size"], merged),
                "merger.linear_fc2.bias": (v["out_hidden_size"],)})
    return {VISION_PREFIX + n: s for n, s in out.items()}


def hub_tensors(config: dict, *, moe: bool, split_ba: bool, fused_experts: bool = False) -> dict[str, Shape]:
    """Every tensor (hub name -> shape) a release of this config ships: text model, MTP block, vision tower.
    `split_ba`: Qwen3.5's in_proj_qkv / in_proj_z / in_proj_a / in_proj_b (Qwen3-Next: in_proj_qkvz, in_proj_ba);
    `fused_experts`: the routed experts stored fused (Qwen3.5-MoE)."""
    hp = hparams(config)
    hidden, vocab = int(hp["hidden_size"]), int(hp["vocab_size"])
    names = config.get("architectures") or [""]
    text = LANGUAGE_PREFIX if str(names[0]).endswith(MULTIMODAL_SUFFIX) else "model."
    tied = bool(hp.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
    out: dict[str, Shape] = {text + "embed_tokens.weight": (vocab, hidden)}
    norms = [("input_layernorm.weight", (hidden,)), ("post_attention_layernorm.weight", (hidden,))]
    mlp = _mlp(hp, hidden, moe, fused_experts)
    for i, kind in enumerate(layer_types(hp)):
        mixer = _linear_attention(hp, hidden, split_ba) if kind == "linear_attention" else _attention(hp, hidden)
        out.update({f"{text}layers.{i}.{n}": s for n, s in norms + mixer + mlp})
    out[text + "norm.weight"] = (hidden,)
    if not tied:
        out["lm_head.weight"] = (vocab, hidden)
    for i in range(n_mtp(hp)):
        out.update({f"mtp.layers.{i}.{n}": s for n, s in norms + _attention(hp, hidden) + mlp})
    if n_mtp(hp):
        out.update({f"mtp.{key}.weight": (hidden, 2 * hidden) if key == "fc" else (hidden,) for key in MTP_GLOBALS})
    if isinstance(config.get("vision_config"), dict):
        out.update(vision_tensors(config["vision_config"]))
    return out

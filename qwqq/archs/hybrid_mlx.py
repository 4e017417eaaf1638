"""The hybrid Qwen families as mlx-lm 0.32 holds them (its models/qwen3_5.py, qwen3_5_moe.py, qwen3_next.py:
sanitize, quant_predicate, cast_predicate, and convert.py), beside archs/hybrid.py's GGUF story: the rules
qwqq/mlx/writer.py and fit's MLX rows apply generically."""

from __future__ import annotations

from dataclasses import dataclass

from qwqq.archs.base import short
from qwqq.archs.hybrid import LAYER_REST
from qwqq.archs.tensors import mlx_name
from qwqq.errors import UnsupportedError

# What mlx-lm 0.32 holds for these families, re-derived from models/qwen3_5.py, qwen3_5_moe.py and
# qwen3_next.py (sanitize, quant_predicate, cast_predicate) and convert.py:
# - names: the hub's text-model names; Qwen3.5's multimodal Model puts its text tower under
#   `language_model.` (model.language_model.X -> language_model.model.X, lm_head -> language_model.lm_head);
#   the vision tower and every `mtp.` tensor are dropped; Qwen3-Next's experts stacked into switch_mlp,
#   Qwen3.5-MoE's fused gate_up_proj split into switch_mlp gate/up (as every MoE here);
# - values: the zero-centred decoder, final and q/k norms stored as w + 1 (in the source dtype, before
#   convert's cast); the depthwise conv1d [C, 1, K] stored as [C, K, 1] (its moveaxis: the same bytes);
#   nothing else is reordered (mlx-lm splits in_proj_qkvz and pairs the value heads at run time);
# - quantized: every Linear and the embedding (not conv1d, not 1-D), the router `mlp.gate` and the
#   `shared_expert_gate` at 8 bits, group 64 when the model has experts (unless a recipe replaces the
#   predicate); Qwen3.5's cast_predicate keeps A_log in its own dtype (float32 in the releases).
# Qwen3.5's sanitize adds the 1 only when the conv1d weights are still in the hub's layout, which is
# always so for the checkpoints qwqq reads (gguf_tensors checks conv1d is [C, 1, K]).
MLX_PLUS_ONE = (".input_layernorm.weight", ".post_attention_layernorm.weight", "model.norm.weight",
                ".q_norm.weight", ".k_norm.weight")
MLX_CONV = ".linear_attn.conv1d.weight"
MLX_FROM_GGUF = {  # GGUF block tensor (less blk.N.) -> mlx-lm parameter (less model.layers.N.), beyond BLOCK_HF's
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "attn_qkv.weight": "linear_attn.in_proj_qkv.weight", "attn_gate.weight": "linear_attn.in_proj_z.weight",
    "ssm_conv1d.weight": "linear_attn.conv1d.weight", "ssm_dt.bias": "linear_attn.dt_bias",
    "ssm_a": "linear_attn.A_log", "ssm_norm.weight": "linear_attn.norm.weight",
    "ssm_out.weight": "linear_attn.out_proj.weight", "ssm_alpha.weight": "linear_attn.in_proj_a.weight",
    "ssm_beta.weight": "linear_attn.in_proj_b.weight", "ssm_ba.weight": "linear_attn.in_proj_ba.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
}


@dataclass(frozen=True)
class MLXRules:
    """How mlx-lm's model of one family holds the text model's (canonical) tensors."""

    prefix: str  # before every parameter name: "language_model." (Qwen3.5's multimodal Model), else ""
    model_types: tuple[str, ...]  # config.json model_type values mlx-lm has this model for
    classes: tuple[str, ...]  # architectures[0] of the checkpoints mlx_lm.convert makes it of
    routers: tuple[str, ...] = ("mlp.gate", "mlp.shared_expert_gate")  # pinned at 8 bits / 64 (with experts)
    unquantized: tuple[str, ...] = (MLX_CONV,)  # weights of modules nn.quantize does not reach (a Conv1d)
    uncounted: tuple[str, ...] = ("linear_attn.A_log", "linear_attn.dt_bias")  # GatedDeltaNet's own parameters:
    # not a leaf module's, so not in mlx-lm's total_parameters
    keep_dtype: tuple[str, ...] = ()  # parameters convert's cast leaves in their own dtype (cast_predicate)
    release_f32: tuple[str, ...] = ()  # parameters the releases ship in float32 (fit, a model known by config)
    fused_qkvz: bool = False  # Qwen3-Next: GGUF attn_qkv + attn_gate are the one in_proj_qkvz
    rope_type_as_type: bool = False  # TextModelArgs renames text_config's rope_parameters rope_type -> type in
    # place, and convert saves that config

    def param(self, name: str, n_layer: int) -> str | None:
        """The mlx-lm parameter of a canonical text-model tensor (see `rename`), None for an MTP block."""
        m = LAYER_REST.match(name)
        if "mtp." in name or (m and int(m.group(1)) >= n_layer):
            return None
        return self.prefix + name

    def tensor(self, name: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], str | None]:
        """(shape stored, element-wise op) of a parameter as mlx-lm's sanitize leaves it."""
        if name.endswith(MLX_CONV) and len(shape) == 3:
            return (shape[0], shape[2], shape[1]), None
        if len(shape) == 1 and name.endswith(MLX_PLUS_ONE):
            return shape, "plus_one"
        return shape, None

    def hub_value(self, name: str, w):
        """A parameter as `tensor` says mlx-lm stores it (float32, dequantized), back in the hub's layout and
        values, which transformers' modules compute with (eval's block engine reads an MLX folder so). Each of
        `tensor`'s changes is its own inverse in shape (the conv1d's [C, 1, K] <-> [C, K, 1] moves an axis of
        1: the same bytes, so a reshape); a plus-one norm loses its 1 again, exactly in float32 (the 1 was
        rounded into the stored dtype, so this is the weight mlx computes with)."""
        shape, op = self.tensor(name, tuple(w.shape))
        w = w.reshape(shape)
        return w - 1 if op == "plus_one" else w

    def cast(self, name: str) -> bool:
        return not name.endswith(self.keep_dtype)

    def check(self, config: dict, where) -> None:
        """A checkpoint mlx-lm has no model for (Qwen3.5's text-only form): one line."""
        mt = config.get("model_type")
        if mt not in self.model_types:
            raise UnsupportedError(f"mlx-lm has no model for model_type {short(mt)} (mlx_lm.convert takes "
                                   f"{' / '.join(self.classes)}, model_type {' / '.join(self.model_types)})", where)

    def config(self, config: dict) -> dict:
        """config.json as mlx_lm.convert saves it, where its model classes changed it on loading."""
        text = config.get("text_config")
        rp = text.get("rope_parameters") if isinstance(text, dict) else None
        if self.rope_type_as_type and isinstance(rp, dict) and rp and "type" not in rp and "rope_type" in rp:
            rp = {k: v for k, v in rp.items() if k != "rope_type"} | {"type": rp["rope_type"]}
            config = {**config, "text_config": {**text, "rope_parameters": rp}}
        return config

    def from_gguf(self, shapes, hp: dict, dtype: str, cast: bool) -> list[tuple[str, tuple[int, ...], str]]:
        """mlx-lm's (parameter, shape, dtype) for a model known by its config (fit): its GGUF tensors mapped
        back, MTP blocks dropped. `dtype`: what convert casts to (`cast`) or what the release holds."""
        n_layer = int(hp["num_hidden_layers"])
        nv, dv = int(hp["linear_num_value_heads"]), int(hp["linear_value_head_dim"])
        out = []
        for gname, shape in shapes:
            parts = gname.split(".", 2)
            if parts[0] == "blk":
                if int(parts[1]) >= n_layer:
                    continue
                rest = parts[2]
                if self.fused_qkvz and rest == "attn_gate.weight":
                    continue  # its rows are in_proj_qkvz's, counted with attn_qkv
                if self.fused_qkvz and rest == "attn_qkv.weight":
                    name, shape = f"model.layers.{parts[1]}.linear_attn.in_proj_qkvz.weight", (shape[0] + nv * dv, shape[1])
                elif rest in MLX_FROM_GGUF:
                    name = f"model.layers.{parts[1]}.{MLX_FROM_GGUF[rest]}"
                else:
                    name = mlx_name(gname)
                if rest == "ssm_conv1d.weight":
                    shape = (*shape, 1)
            else:
                name = mlx_name(gname)
            name = self.prefix + name
            keep = not (cast and self.cast(name))
            out.append((name, tuple(shape), "F32" if keep and name.endswith(self.release_f32) else dtype))
        return out


_QWEN3_5_MLX = dict(prefix="language_model.", keep_dtype=("linear_attn.A_log",),
                    release_f32=("linear_attn.A_log", "linear_attn.norm.weight"), rope_type_as_type=True)
MLX_RULES = {
    "Qwen3_5ForConditionalGeneration": MLXRules(model_types=("qwen3_5",), classes=("Qwen3_5ForConditionalGeneration",),
                                                **_QWEN3_5_MLX),
    "Qwen3_5MoeForConditionalGeneration": MLXRules(model_types=("qwen3_5_moe",),
                                                   classes=("Qwen3_5MoeForConditionalGeneration",), **_QWEN3_5_MLX),
    "Qwen3NextForCausalLM": MLXRules(prefix="", model_types=("qwen3_next",), classes=("Qwen3NextForCausalLM",),
                                     fused_qkvz=True),
}


def mlx_rules(arch) -> MLXRules | None:
    """The family's MLX rules (None: a llama-style decoder, named as on the hub). Keyed by class here, as
    base.py's Arch has no field for them yet."""
    return MLX_RULES.get(arch.hf_class)

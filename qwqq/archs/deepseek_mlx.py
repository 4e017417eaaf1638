"""DeepSeek-V3 / R1 as mlx-lm 0.32 holds it (its models/deepseek_v3.py: sanitize, cast_predicate, and
convert.py), beside archs/deepseek_v3.py's GGUF story: the rules qwqq/mlx/writer.py and fit's MLX rows apply
generically (the same MLXRules as the hybrids', archs/hybrid_mlx.py, plus the hooks qwqq/mlx/rules.py names).

What mlx-lm 0.32.2 does, re-derived from models/deepseek_v3.py, mla.py, utils.py and convert.py:
- FP8 (the release): load_model leaves a `quant_method: fp8` checkpoint whose scales are not ue8m0 over
  32x32 blocks to the model's sanitize, whose `dequant` reads each float8_e4m3fn weight as bfloat16 (exact),
  multiplies it by its float32 `weight_scale_inv` blocks (bf16 x f32 -> float32: float32(q x scale), the
  product llama.cpp's converter and DeepSeek's fp8_cast_bf16.py also form) and stores `.astype(bfloat16)`.
  So convert turns the FP8 release into exactly the model of DeepSeek's bfloat16 cast (fp8_cast_bf16.py
  rounds the same float32 product to bfloat16): qwqq reads the FP8 rows in float32 (qwqq/fp8.py) and rounds
  them to bfloat16 with mlx, and the folders of the two forms are the same bytes. convert then casts to
  config torch_dtype (bfloat16 in every release: a no-op) and rewrites `quantization_config` with its own
  block (the fp8 one is gone).
- names: the hub's, experts stacked into `mlp.switch_mlp.{gate,up,down}_proj`; the router's correction bias
  keeps the hub's name `mlp.gate.e_score_correction_bias` (archs/deepseek_v3.py renames it for gguf-py);
  `self_attn.kv_b_proj` [heads x (nope + v), kv_lora] is split per head into the MultiLinear weights
  `self_attn.embed_q` [heads, kv_lora, nope] (each head's nope rows, transposed: the GGUF's attn_k_b) and
  `self_attn.unembed_out` [heads, v, kv_lora] (each head's v rows: attn_v_b); kv_b_proj itself is gone.
- quantized: every Linear, the embedding, the stacked experts and both MultiLinears (they have
  to_quantized) whose last axis is a multiple of the group size (embed_q's is qk_nope_head_dim: 128 in the
  releases, so quantized at group 32/64/128; the fixture's 32 stays bfloat16); not the router `mlp.gate`
  (MoEGate is a plain Module: no to_quantized, and the model has no quant_predicate, so nothing is pinned at
  8 bits). cast_predicate keeps e_score_correction_bias in its own dtype (float32 in the releases).
- the multi-token-prediction layer: sanitize drops keys starting with the literal `model.layers.61`, the MTP
  layer of every DeepSeek-V3/R1 release (num_hidden_layers 61). A checkpoint with fewer layers keeps its MTP
  layer through sanitize (its experts unstacked, its kv_b_proj unsplit) and mlx_lm.convert fails in
  load_weights ("Received 44 parameters not in model" for tests/fixtures_deepseek.py's layer 4). qwqq drops
  the layer at index num_hidden_layers (archs/deepseek_v3.rename), which is the literal's effect on every
  release, and writes for such a checkpoint what convert writes for it without its MTP layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from qwqq.archs import deepseek_v3
from qwqq.archs.hybrid import LAYER_REST
from qwqq.archs.hybrid_mlx import MLXRules
from qwqq.archs.tensors import Part, mlx_name
from qwqq.errors import UnsupportedError

KV_B = ".self_attn.kv_b_proj.weight"
SPLIT = {"attn_k_b.weight": "self_attn.embed_q.weight", "attn_v_b.weight": "self_attn.unembed_out.weight"}
FROM_GGUF = {  # deepseek2 GGUF block tensor (less blk.N.) -> mlx-lm parameter (less model.layers.N.), beyond BLOCK_HF's
    "attn_q_a_norm.weight": "self_attn.q_a_layernorm.weight", "attn_q_a.weight": "self_attn.q_a_proj.weight",
    "attn_q_b.weight": "self_attn.q_b_proj.weight", "attn_kv_a_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn_kv_a_mqa.weight": "self_attn.kv_a_proj_with_mqa.weight", **SPLIT,
    "exp_probs_b.bias": "mlp.gate.e_score_correction_bias",
    "ffn_gate_shexp.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_experts.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_experts.down_proj.weight",
}

# mlx-lm's module tree order within a decoder layer (DeepseekV3DecoderLayer's attributes, each module's own in
# turn): the order mlx_lm.convert's save_model fills its 5 GiB shards in, so the weight_map of a many-shard
# folder (R1: 88 shards at 4 bits) splits where convert's does.
LAYER_ORDER = (
    "self_attn.q_proj.", "self_attn.q_a_proj.", "self_attn.q_a_layernorm.", "self_attn.q_b_proj.",
    "self_attn.kv_a_proj_with_mqa.", "self_attn.kv_a_layernorm.", "self_attn.embed_q.", "self_attn.unembed_out.",
    "self_attn.o_proj.", "mlp.gate_proj.", "mlp.up_proj.", "mlp.down_proj.", "mlp.switch_mlp.gate_proj.",
    "mlp.switch_mlp.up_proj.", "mlp.switch_mlp.down_proj.", "mlp.gate.weight", "mlp.gate.e_score_correction_bias",
    "mlp.shared_experts.gate_proj.", "mlp.shared_experts.up_proj.", "mlp.shared_experts.down_proj.",
    "input_layernorm.", "post_attention_layernorm.",
)
TOP_ORDER = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")


@dataclass(frozen=True)
class DeepseekMLXRules(MLXRules):
    """MLXRules for mlx-lm's deepseek_v3 model, with the hooks qwqq/mlx/rules.py reads."""

    fp8_dtype: str = "BF16"  # what sanitize dequantizes an FP8 weight to (before convert's cast)
    renamed_away: str = "the MTP layer"  # what arch.rename leaves out (mlx-lm's sanitize: model.layers.61)

    def param(self, name: str, n_layer: int) -> str | None:
        m = LAYER_REST.match(name)
        if m and int(m.group(1)) >= n_layer:
            return None
        return name.replace("e_score_correction.bias", "e_score_correction_bias")

    def tensor(self, name: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], str | None]:
        return shape, None

    def check(self, config: dict, where) -> None:
        """Besides the model_type: FP8 only in the blocks sanitize's `dequant` assumes (128 x 128, its literal
        `bs`; ue8m0 scales over 32 x 32 blocks mlx-lm keeps packed as mxfp8 instead), one line otherwise."""
        super().check(config, where)
        q = config.get("quantization_config")
        if isinstance(q, dict) and q.get("quant_method") == "fp8":
            block = list(q.get("weight_block_size") or [128, 128])
            if block != [128, 128]:
                raise UnsupportedError(f"FP8 weight_block_size {block}: mlx-lm's deepseek_v3 dequantizes 128x128 "
                                       "blocks only", where)

    def split(self, name: str, ref, hp: dict) -> list[tuple[str, tuple[int, ...], tuple[Part, ...], bool]] | None:
        """kv_b_proj -> (embed_q, each head's nope rows transposed) and (unembed_out, each head's v rows): the
        parts archs/deepseek_v3.tensors cuts for the GGUF's attn_k_b / attn_v_b, which have mlx-lm's shapes."""
        if not name.endswith(KV_B):
            return None
        k_b, v_b = deepseek_v3.tensors(name, ref, hp, None)
        base = name[: -len(KV_B)] + "."
        return [(base + SPLIT["attn_k_b.weight"], k_b.shape, k_b.parts, True),
                (base + SPLIT["attn_v_b.weight"], v_b.shape, v_b.parts, False)]

    def from_gguf(self, shapes, hp: dict, dtype: str, cast: bool) -> list[tuple[str, tuple[int, ...], str]]:
        n_layer = int(hp["num_hidden_layers"])
        out = []
        for gname, shape in shapes:
            parts = gname.split(".", 2)
            if parts[0] == "blk" and int(parts[1]) >= n_layer:
                continue
            if parts[0] == "blk" and parts[2] in FROM_GGUF:
                name = f"model.layers.{parts[1]}.{FROM_GGUF[parts[2]]}"
            else:
                name = mlx_name(gname)
            keep = not (cast and self.cast(name))
            out.append((name, tuple(shape), "F32" if keep and name.endswith(self.release_f32) else dtype))
        return out

    def order(self, name: str) -> tuple[int, int, int]:
        """A parameter's place in mlx-lm's module tree (top level, layer, place in the layer; LAYER_ORDER)."""
        top = next((i for i, p in enumerate(TOP_ORDER) if name.startswith(p)), len(TOP_ORDER))
        m = LAYER_REST.match(name)
        if m is None:
            return top, 0, 0
        place = next((i for i, p in enumerate(LAYER_ORDER) if m.group(2).startswith(p)), len(LAYER_ORDER))
        return top, int(m.group(1)), place

    def kv_elements(self, dims) -> int:
        """mlx-lm's cache per token and layer: the latent (kv_lora_rank) as keys, the rope part as values."""
        return dims.n_embd_k


MLX_RULES = {
    deepseek_v3.ARCH.hf_class: DeepseekMLXRules(
        prefix="", model_types=deepseek_v3.ARCH.model_types, classes=(deepseek_v3.ARCH.hf_class,), routers=(),
        unquantized=("mlp.gate.weight",), uncounted=(), keep_dtype=("e_score_correction_bias",),
        release_f32=("e_score_correction_bias",)),
}

"""The family's mlx-lm rules, for the writer (mlx/writer.py) and fit's MLX rows (fit/mlx.py).

Each family whose mlx-lm model goes beyond the llama-style decoder states its rules in qwqq/archs as an
archs.hybrid_mlx.MLXRules keyed by class in its module's MLX_RULES (hybrid_mlx: Qwen3.5, Qwen3.5-MoE,
Qwen3-Next; deepseek_mlx: DeepSeek-V3/R1); the registries are merged here and looked up by the family's
class. A family may add the optional hooks read below; without them, the hybrids' behaviour holds.
"""

from __future__ import annotations

from qwqq.archs import Arch, deepseek_mlx, hybrid_mlx
from qwqq.archs.hybrid_mlx import MLXRules

RULES: dict[str, MLXRules] = {**hybrid_mlx.MLX_RULES, **deepseek_mlx.MLX_RULES}


def mlx_rules(arch: Arch) -> MLXRules | None:
    """The family's MLX rules (None: a llama-style decoder, named as on the hub)."""
    return RULES.get(arch.hf_class)


def split(rules: MLXRules | None, name: str, ref, hp: dict) -> list | None:
    """The mlx-lm parameters one checkpoint tensor becomes when its model makes several of it (DeepSeek's
    kv_b_proj -> embed_q, unembed_out): [(canonical name, shape, parts, transposed)], else None."""
    hook = getattr(rules, "split", None)
    return hook(name, ref, hp) if hook is not None else None


def fp8_dtype(rules: MLXRules | None) -> str | None:
    """The dtype mlx-lm's model dequantizes a block-scaled FP8 weight to in its sanitize; None: it reads no FP8."""
    return getattr(rules, "fp8_dtype", None)


def renamed_away(rules: MLXRules) -> str:
    """What arch.rename's None means for the family (a multimodal release's vision tower by default)."""
    return getattr(rules, "renamed_away", "the vision tower")


def kv_elements(rules: MLXRules | None, dims) -> int:
    """K + V elements mlx-lm's KVCache holds per token and attention layer (DeepSeek's MLA: the latent and the
    rope part only)."""
    hook = getattr(rules, "kv_elements", None)
    return hook(dims) if hook is not None else dims.n_embd_k + dims.n_embd_v


def module_order(rules: MLXRules | None):
    """A sort key over mlx-lm parameter names in its model's module tree order (the order mlx_lm.convert fills
    its shards in), when the family states it; None: the writer's own (embedding, layers by name, the rest)."""
    return getattr(rules, "order", None)

"""What a latent (MLA) attention's absorbed matrices read, observed in transformers' own attention module.

llama.cpp runs multi-head latent attention absorbed: the key up-projection multiplies each head's query
part without position (q_nope) and the value up-projection each head's attention-weighted latent, so
llama-imatrix records those inputs, not the latent kv_b_proj reads in transformers. The family says which
(archs: Arch.absorbed_inputs, "<attention module>.q_nope" / "<attention module>.latent_out"); this module
records them while the block runs:

  q_nope      the query's first qk_nope_head_dim of each head, as the attention receives it
  latent_out  softmax(q k^T) @ latent per head: the attention run again over the same queries and keys with
              the latent (kv_b_proj's input, kv_a_layernorm's output) as values

each as [tokens, heads x dim], heads side by side (llama-imatrix's layout for a 3-D weight: one count per
token). The attention itself is transformers' sdpa, called through an implementation registered under
IMPLEMENTATION that also hands the queries and keys to an observer while one is attached.
"""

from __future__ import annotations

from typing import Callable

IMPLEMENTATION = "qwqq_latent_sdpa"
_WATCH = "_qwqq_latent_watch"  # attribute of an attention module while observed: (query, key, scaling) -> None


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    watch = getattr(module, _WATCH, None)
    if watch is not None:
        watch(query, key, attention_mask, scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def register() -> str:
    """Make IMPLEMENTATION a transformers attention implementation (sdpa, observable); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, _attention)
    return IMPLEMENTATION


def observe_latent(layer, prefix: str, stats: tuple[str, ...], observe: Callable) -> list:
    """Attach observers for `stats` (names under the block: "self_attn.q_nope", ...) to block `layer`;
    returns the callables that detach them."""
    import torch

    by_module: dict[str, set[str]] = {}
    for s in stats:
        module, _, kind = s.rpartition(".")
        if kind not in ("q_nope", "latent_out"):
            raise ValueError(f"no latent statistic {kind!r} (q_nope, latent_out)")
        by_module.setdefault(module, set()).add(kind)
    undo: list = []
    for module_name, kinds in by_module.items():
        attn = layer.get_submodule(module_name)
        seen: dict = {}
        name = f"{prefix}{module_name}."

        def keep_latent(mod, args, seen=seen):
            seen["latent"] = args[0]  # [batch, 1, seq, kv_lora]

        def watch(query, key, mask, scaling, attn=attn, kinds=kinds, seen=seen, name=name):
            b, h, s, _ = query.shape
            flat = lambda t: t.transpose(1, 2).reshape(b * s, -1)  # [b, h, s, d] -> [tokens, h x d]
            with torch.no_grad():
                if "q_nope" in kinds:
                    observe([name + "q_nope"], flat(query[..., : attn.qk_nope_head_dim]))
                if "latent_out" in kinds:
                    latent = seen.pop("latent")
                    out = torch.nn.functional.scaled_dot_product_attention(
                        query, key, latent.expand(b, h, *latent.shape[2:]), attn_mask=mask,
                        is_causal=mask is None and s > 1, scale=scaling)
                    observe([name + "latent_out"], flat(out))

        undo.append(attn.kv_b_proj.register_forward_pre_hook(keep_latent).remove)
        setattr(attn, _WATCH, watch)
        undo.append(lambda attn=attn: delattr(attn, _WATCH))
    return undo

"""What a GPTQ checkpoint quantizes: the decoder blocks' linears (archs.LINEAR, and the hybrids' Gated DeltaNet
projections archs.tensors.LINEAR_ATTN), per expert where the source fuses them; everything else (embeddings,
norms, routers, lm_head, and a multimodal release's vision tower and MTP block) is kept as a float tensor.

Names stay the checkpoint's own, as GPTQModel writes them: a Qwen3.5 release's language tower keeps its
`model.language_model.` prefix, its vision tower (`model.visual.*`) and its `mtp.*` block are copied unquantized,
so the folder is the release with its text decoder's linears quantized. Which tensors those are is decided on
the text model's names (the family's Arch.rename), where the block engine finds them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qwqq.archs import FUSED_EXPERT, LAYER, LINEAR, SKIPPED, Part, find_arch, hparams
from qwqq.archs.experts import expert_prefix, fused_rows
from qwqq.archs.tensors import LINEAR_ATTN
from qwqq.errors import QwqqError, SourceError
from qwqq.source import Checkpoint, TensorRef


@dataclass(frozen=True)
class GPTQLinear:
    """One quantized linear and where its weight rows come from in the source."""

    name: str  # module name in the checkpoint, e.g. model.layers.0.mlp.experts.3.down_proj
    out_features: int
    in_features: int
    parts: tuple[Part, ...]  # source rows, concatenated (a fused-experts tensor: this expert's slice)
    text: str = ""  # the text model's module name where it differs (model.language_model.X -> model.X)

    @property
    def text_name(self) -> str:
        return self.text or self.name


@dataclass(frozen=True)
class TextNames:
    """A checkpoint's tensor names as its text model names them; layers from `n_layer` on (a release's MTP
    block, which rename puts after the decoder) are not the text model's."""

    rename: object = None  # Arch.rename, or None: the names are the text model's
    n_layer: int | None = None  # set for a family with MTP blocks

    def text(self, name: str) -> str | None:
        return name if self.rename is None else self.rename(name, self.n_layer or 0)

    def in_decoder(self, layer: str) -> bool:
        return self.n_layer is None or int(layer) < self.n_layer


def text_names(config: dict) -> TextNames:
    """How a checkpoint of this config.json names its text model (a checkpoint's, or for fit a release's)."""
    try:
        arch = find_arch(config)
    except QwqqError:  # an unknown class: its names are taken as they are (plan_gptq refuses it anyway)
        return TextNames()
    n_layer = int(hparams(config).get("num_hidden_layers") or 0)
    return TextNames(arch.rename, n_layer if arch.has_mtp else None)


def quantized(names: TextNames, name: str):
    """The match (layer number in group 1) that makes a source tensor a quantized linear, else None."""
    text = names.text(name)
    if text is None:
        return None
    m = LINEAR.match(text) or LINEAR_ATTN.match(text) or FUSED_EXPERT.match(text)
    return m if m and names.in_decoder(m.group(1)) else None


def is_gptq_linear(name: str, names: TextNames = TextNames()) -> bool:
    """Whether a source tensor is quantized in a GPTQ checkpoint (`names`: how its family names it)."""
    return quantized(names, name) is not None


def _module(text: str, name: str, text_module: str) -> str:
    """The checkpoint's name of a text-model module, given one tensor's two names (name <- text)."""
    if text == name:
        return text_module
    rest = text.removeprefix("model.")
    return name[: len(name) - len(rest)] + text_module.removeprefix("model.")


def _fused(ref: TensorRef, text: str, layer: int, which: str) -> list[GPTQLinear]:
    """transformers 5 fused experts -> the per-expert modules GPTQ checkpoints hold."""
    cols = ref.shape[-1] if len(ref.shape) == 3 else 0
    out = []
    for proj, ranges in fused_rows(ref, which).items():
        for i, (r0, r1) in enumerate(ranges):
            module = f"{expert_prefix(layer)}.{i}.{proj}_proj"
            name = _module(text, ref.name, module)
            out.append(GPTQLinear(name, r1 - r0, cols, (Part(ref, r0, r1),), module if name != module else ""))
    return out


def _order(name: str) -> tuple:
    """Embedding, then layer by layer (numbers compared as numbers: experts.2 before experts.10), then
    the final norm and lm_head (a text-model name)."""
    natural = tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name))
    m = LAYER.match(name)
    group = 1 if m else 0 if name.startswith("model.embed_tokens.") else 2 if name.startswith("model.") else 3
    return (group, natural)


def order_key(names: TextNames):
    """Sort key of a source tensor name: the text model's order, then what it does not run (vision, MTP)."""
    def key(name: str) -> tuple:
        text = names.text(name)
        return (0, _order(text)) if text is not None else (1, _order(name))
    return key


def gptq_linears(ckpt: Checkpoint) -> list[GPTQLinear]:
    """Every linear a GPTQ checkpoint of `ckpt` quantizes, in model order (layer by layer)."""
    names = text_names(ckpt.config)
    out: list[GPTQLinear] = []
    for name, ref in ckpt.tensors.items():
        m = quantized(names, name)
        if m is None:
            continue
        text = names.text(name)
        if m.re is FUSED_EXPERT:
            out.extend(_fused(ref, text, int(m.group(1)), m.group(2)))
            continue
        if len(ref.shape) != 2:
            raise SourceError(f"tensor {name} should be 2-D, is {ref.shape}", ref.file)
        module, text_module = name.removesuffix(".weight"), text.removesuffix(".weight")
        out.append(GPTQLinear(module, ref.shape[0], ref.shape[1], (Part(ref, 0, ref.rows),),
                              text_module if text_module != module else ""))
    return sorted(out, key=lambda lin: _order(lin.text_name))


def gptq_linear_names(ckpt: Checkpoint) -> list[str]:
    """The module names (no .weight) of gptq_linears."""
    return [lin.name for lin in gptq_linears(ckpt)]


def float_tensors(ckpt: Checkpoint) -> list[TensorRef]:
    """The source tensors a GPTQ checkpoint keeps unquantized (stored in fp16)."""
    names = text_names(ckpt.config)
    key = order_key(names)
    return sorted((ref for name, ref in ckpt.tensors.items()
                   if not is_gptq_linear(name, names) and not SKIPPED.search(name)), key=lambda r: key(r.name))

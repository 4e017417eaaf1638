"""Sampling settings for `qwqq run`: the Sampling record, the model's own values or its family's
recommendation for the thinking mode in use (qwqq/archs/<family>.py `sampling`), and the command-line flags
on top (resolve_sampling). Where each value came from is kept for the status line."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from qwqq.archs import BY_MODEL_TYPE, FAMILIES, Arch, name_key, sampling_table

FIELDS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty")
SHORT = {"temperature": "temp"}  # the status line's name of a field
PENALTY_LAST_N = 64  # tokens the presence / frequency penalties look back over (llama-cpp-python's last_n_tokens_size)
EXTRAS = ("presence_penalty",)  # beyond what every backend applies; a backend lists those it does (sampling_extras)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20  # 0: off
    min_p: float = 0.0  # 0: off
    presence_penalty: float = 0.0  # 0: off; subtracted from the logit of every token already in the recent output
    seed: int | None = None  # None: random
    greedy: bool = False
    source: str = "generic defaults"  # where the values came from, for the status line

    def not_applied(self, applies: tuple[str, ...] = EXTRAS) -> list[str]:
        """The values set (non-zero) that a backend applying only `applies` of EXTRAS would leave out."""
        return [f for f in EXTRAS if getattr(self, f) and f not in applies]

    def describe(self, applies: tuple[str, ...] = EXTRAS) -> str:
        if self.greedy:
            return "greedy"
        values = ", ".join(f"{SHORT.get(f, f)} {getattr(self, f):g}" for f in FIELDS)
        left = self.not_applied(applies)
        return f"{values} ({self.source})" + (f"; {', '.join(left)} not applied by this backend" if left else "")


GENERIC_SAMPLING = ("generic", dict(temperature=0.7, top_p=0.8, top_k=20, min_p=0.0))

# Sampling field <- (GGUF key qwqq writes from generation_config.json, generation_config.json key)
SAMPLING_KEYS = {
    "temperature": ("general.sampling.temp", "temperature"),
    "top_p": ("general.sampling.top_p", "top_p"),
    "top_k": ("general.sampling.top_k", "top_k"),
    "min_p": ("general.sampling.min_p", "min_p"),
    "presence_penalty": ("presence_penalty",),  # GGUF has no key for it; a generation_config.json may
}
NAME_KEYS = ("general.name", "general.basename", "general.finetune", "_name_or_path", "general.architecture", "model_type")


def arch_of_metadata(metadata: dict) -> Arch | None:
    """The model's family: config.json's model_type (a folder), else the GGUF's general.architecture."""
    arch = BY_MODEL_TYPE.get(str(metadata.get("model_type", "")))
    if arch is None:
        gguf_arch = metadata.get("general.architecture")
        arch = next((m.ARCH for m in FAMILIES if gguf_arch and m.ARCH.name == gguf_arch), None)
    return arch


def family_of(metadata: dict, name: str = "", thinking: bool | None = None) -> tuple[str, dict]:
    """(label, values) of the first recommendation that fits: the model's own family's first (a pattern "" is
    any model of it), then every family's by name; each for thinking on (also `thinking` None: the default)
    or off (`thinking` False), or either."""
    norm = name_key(name, *(str(metadata.get(k, "")) for k in NAME_KEYS))
    own = arch_of_metadata(metadata)
    mine = own.sampling if own is not None else ()
    on = thinking is not False
    for rec in (*mine, *(s for s in sampling_table() if s.pattern and s not in mine)):
        if rec.pattern and not re.search(rec.pattern, norm):
            continue
        if rec.thinking is None or rec.thinking == on:
            return rec.label, rec.values
    return GENERIC_SAMPLING


MODEL, FLAGS = "model's generation config", "flags"


def _source(origin: dict[str, str]) -> str:
    """'Qwen3 thinking defaults', or per origin the fields it gave, in the order each overrides the one before
    (family defaults, the model's own, flags): 'min_p: Qwen3 thinking defaults; temp: model's generation ...'."""
    groups: dict[str, list[str]] = {}
    for f, o in sorted(origin.items(), key=lambda fo: (fo[1] == MODEL) + 2 * (fo[1] == FLAGS)):
        groups.setdefault(o, []).append(SHORT.get(f, f))
    if len(groups) == 1:
        return next(iter(groups))
    return "; ".join(f"{', '.join(fs)}: {o}" for o, fs in groups.items())


def _defaults(metadata: dict, name: str, thinking: bool | None) -> tuple[dict, dict[str, str]]:
    label, family = family_of(metadata, name, thinking)
    values = {"presence_penalty": 0.0, **family}
    origin = {f: f"{label} defaults" for f in FIELDS}
    for fld, keys in SAMPLING_KEYS.items():
        for key in keys:
            if metadata.get(key) not in (None, ""):
                try:
                    values[fld] = type(values[fld])(float(metadata[key]))
                except (TypeError, ValueError):
                    continue
                origin[fld] = MODEL
                break
    return values, origin


def default_sampling(metadata: dict, name: str = "", thinking: bool | None = None) -> Sampling:
    """The model's own values (GGUF general.sampling.* or generation_config keys) where present, else its
    family's recommendation for the thinking mode (`thinking`: --think / --no-think; None: the template's
    default). Never greedy."""
    values, origin = _defaults(metadata, name, thinking)
    return Sampling(**values, source=_source(origin))


def resolve_sampling(metadata: dict, name: str, *, temperature=None, top_p=None, top_k=None, min_p=None,
                     presence_penalty=None, seed=None, greedy=False, thinking: bool | None = None) -> Sampling:
    """default_sampling with the command-line flags on top."""
    values, origin = _defaults(metadata, name, thinking)
    flags = dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, presence_penalty=presence_penalty)
    given = {k: v for k, v in flags.items() if v is not None}
    origin.update({k: FLAGS for k in given})
    return replace(Sampling(**values), **given, seed=seed, greedy=greedy, source=_source(origin))

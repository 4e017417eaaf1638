"""Sampling settings for `qwqq run`: the Sampling record, the model's own values or its family's
recommendation (qwqq.archs.sampling_table()), and the command-line flags on top (resolve_sampling)."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from qwqq.archs import sampling_table


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20  # 0: off
    min_p: float = 0.0  # 0: off
    seed: int | None = None  # None: random
    greedy: bool = False
    source: str = "generic defaults"  # where the values came from, for the status line

    def describe(self) -> str:
        if self.greedy:
            return "greedy"
        return f"temp {self.temperature:g}, top_p {self.top_p:g}, top_k {self.top_k}, min_p {self.min_p:g} ({self.source})"


# Recommended settings by model family: each family's own (qwqq/archs/<family>.py), first match wins.
# Patterns are matched against the model's name and architecture, lower-cased with spaces, "-" and "_" removed.
GENERIC_SAMPLING = ("generic", dict(temperature=0.7, top_p=0.8, top_k=20, min_p=0.0))

# Sampling field <- (GGUF key qwqq writes from generation_config.json, generation_config.json key)
SAMPLING_KEYS = {
    "temperature": ("general.sampling.temp", "temperature"),
    "top_p": ("general.sampling.top_p", "top_p"),
    "top_k": ("general.sampling.top_k", "top_k"),
    "min_p": ("general.sampling.min_p", "min_p"),
}
NAME_KEYS = ("general.name", "general.basename", "general.finetune", "_name_or_path", "general.architecture", "model_type")


def _norm(s: str) -> str:
    return re.sub(r"[\s\-_./]", "", s.lower())


def family_of(metadata: dict, name: str = "") -> tuple[str, dict]:
    text = " ".join([name, *(str(metadata.get(k, "")) for k in NAME_KEYS)])
    norm = _norm(text)
    for rec in sampling_table():
        if re.search(rec.pattern, norm):
            return rec.label, rec.values
    return GENERIC_SAMPLING


def default_sampling(metadata: dict, name: str = "") -> Sampling:
    """The model's own values (GGUF general.sampling.* or generation_config keys) where
    present, else its family's recommendation. Never greedy."""
    label, values = family_of(metadata, name)
    values = dict(values)
    own = []
    for fld, keys in SAMPLING_KEYS.items():
        for key in keys:
            if metadata.get(key) not in (None, ""):
                try:
                    values[fld] = type(values[fld])(float(metadata[key]))
                except (TypeError, ValueError):
                    continue
                own.append(fld)
                break
    source = f"{label} defaults" if not own else ("model's generation config" if len(own) == len(SAMPLING_KEYS) else f"model's generation config + {label} defaults")
    return Sampling(**values, source=source)


def resolve_sampling(metadata: dict, name: str, *, temperature=None, top_p=None, top_k=None, min_p=None, seed=None, greedy=False) -> Sampling:
    """default_sampling with the command-line flags on top."""
    base = default_sampling(metadata, name)
    flags = dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
    given = {k: v for k, v in flags.items() if v is not None}
    source = base.source + (" + flags" if given else "")
    return replace(base, **given, seed=seed, greedy=greedy, source=source)

"""A checkpoint opened once for GGUF: its family, its tensors under GGUF names, llama.cpp's facts and its
vocabulary. One `quantize` (imatrix, budget, fit's room and the write included) plans and measures from
one of these, so the checkpoint is opened, mapped and tokenized once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from qwqq.archs import Arch, GGUFTensor, arch_of, gguf_tensors
from qwqq.gguf.header import build_header
from qwqq.gguf.plan import ModelFacts, Plan, make_plan, model_facts
from qwqq.gguf.types import Mixture
from qwqq.gguf.vocab import Vocab, build_vocab
from qwqq.source import Checkpoint, open_checkpoint
from qwqq.gguf.imatrix_file import Imatrix



@dataclass
class Prepared:
    ckpt: Checkpoint
    arch: Arch
    tensors: list[GGUFTensor]
    facts: ModelFacts
    _vocab: Vocab | None = field(default=None, repr=False)
    _plans: dict = field(default_factory=dict, repr=False)

    @property
    def sources(self) -> dict[str, GGUFTensor]:
        return {t.name: t for t in self.tensors}

    @property
    def vocab(self) -> Vocab:
        if self._vocab is None:
            self._vocab = build_vocab(self.ckpt)
        return self._vocab

    def plan(self, mixture: Mixture | str, *, has_imatrix: bool = False, overrides: dict | None = None) -> Plan:
        """The plan for a mixture (and per-tensor overrides), made once: fit, the budget and the writer share it."""
        name = mixture if isinstance(mixture, str) else mixture.name
        key = (name, has_imatrix, tuple(sorted((k, int(v)) for k, v in (overrides or {}).items())))
        if key not in self._plans:
            self._plans[key] = make_plan([(t.name, t.shape) for t in self.tensors], self.facts, mixture,
                                         has_imatrix=has_imatrix, overrides=overrides)
        return self._plans[key]

    def header(self, plan: Plan, imatrix: Imatrix | None = None) -> bytes:
        """The GGUF header the writer writes for `plan` (and `imatrix`'s keys): metadata, tensor infos, padding."""
        return build_header(self.ckpt, self.arch, plan, self.vocab, imatrix)


def prepare(source: "str | Path | Checkpoint | Prepared", mtp: bool = True) -> Prepared:
    """Open (a folder or hub id) and map a checkpoint for GGUF, its multi-token-prediction blocks left out
    when `mtp` is False; a Prepared is handed back as it is."""
    if isinstance(source, Prepared):
        return source
    ckpt = source if isinstance(source, Checkpoint) else open_checkpoint(source)
    arch = arch_of(ckpt.config, ckpt.root / "config.json")
    return Prepared(ckpt, arch, gguf_tensors(ckpt, arch, mtp=mtp), model_facts(ckpt.config, arch))

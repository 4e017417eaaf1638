"""quantize: source checkpoint -> plan -> GGUF, in one streaming pass."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from qwqq.archs import Arch, arch_of, cfg, gguf_tensors
from qwqq.errors import QwqqError, UnsupportedError
from qwqq.outputs import atomic_output, journal_path
from qwqq.progress import tensor_progress
from qwqq.quantize.gguf_vocab import build_vocab
from qwqq.quantize.gguf_writer import write_gguf
from qwqq.quantize.plan import BITS_TO_MIXTURE, MIXTURES, Mixture, ModelFacts, Plan, make_plan
from qwqq.source import Checkpoint, open_checkpoint

# The mixtures `quantize --type` accepts without an importance matrix.
GGUF_TYPES = ["F16", "BF16", "Q8_0", "Q6_K", "Q5_K_S", "Q5_K_M", "Q4_K_S", "Q4_K_M", "Q4_0", "Q3_K_S",
              "Q3_K_M", "Q3_K_L", "Q2_K", "IQ4_XS", "IQ4_NL", "F32", "Q4_1", "Q5_0", "Q5_1"]


@dataclass
class Result:
    path: Path
    file_bytes: int
    n_params: int
    seconds: float
    plan: Plan

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.plan.tensor_bytes / max(1, self.n_params)


def resolve_mixture(bits: int | None = None, type_name: str | None = None) -> Mixture:
    if bits is not None and type_name is not None:
        raise QwqqError("give --bits or --type, not both")
    if type_name is not None:
        name = type_name.upper()
        if name not in MIXTURES:
            raise QwqqError(f"unknown --type {type_name!r}; choose one of {', '.join(GGUF_TYPES)}")
        if name not in GGUF_TYPES:
            raise UnsupportedError(f"--type {name} needs an importance matrix, which this version does not compute yet")
        return MIXTURES[name]
    bits = 4 if bits is None else bits
    if bits not in BITS_TO_MIXTURE:
        raise QwqqError(f"unknown --bits {bits}; choose one of {', '.join(map(str, BITS_TO_MIXTURE))}")
    return MIXTURES[BITS_TO_MIXTURE[bits]]


def fallback_notes(plan: Plan) -> list[str]:
    """One line per (from, to) demotion forced by a row length, as llama.cpp warns."""
    groups: dict[tuple[str, str, int], int] = {}
    for t in plan.tensors:
        if t.fallback_from is not None:
            key = (t.fallback_from.name, t.type.name, t.shape[-1])
            groups[key] = groups.get(key, 0) + 1
    return [f"{n} tensor(s) with rows of {cols} (not a multiple of the {a} block) fell back to {b}, as llama.cpp does"
            for (a, b, cols), n in sorted(groups.items())]


def model_facts(config: dict, arch: Arch) -> ModelFacts:
    n_layer = int(config["num_hidden_layers"])
    n_head = int(config["num_attention_heads"])
    n_kv = int(cfg(config, "num_key_value_heads", default=n_head))
    n_expert = int(cfg(config, "num_experts", "num_local_experts", default=0)) if arch.moe else 0
    is_70b = arch.seventy_b_layers == n_layer and (not arch.seventy_b_needs_gqa or n_head != n_kv)
    return ModelFacts(arch.name, n_layer, n_head, n_kv, n_expert, is_70b)


def plan_checkpoint(ckpt: Checkpoint, mixture: Mixture | str):
    """The arch, the GGUF tensors with their sources, and the plan for one checkpoint."""
    arch = arch_of(ckpt.config, ckpt.root / "config.json")
    tensors = gguf_tensors(ckpt, arch)
    plan = make_plan([(t.name, t.shape) for t in tensors], model_facts(ckpt.config, arch), mixture)
    return arch, tensors, plan


def default_output(ckpt: Checkpoint, mixture: Mixture) -> Path:
    return Path.cwd() / f"{ckpt.name}-{mixture.name}.gguf"


def header_estimate(vocab_tokens: int) -> int:
    """A generous bound on metadata bytes (tokens + merges dominate), for the space check."""
    return 64 * vocab_tokens + 2**20


def quantize_to_gguf(source: str | Path, mixture: Mixture, *, out: Path | None = None, force: bool = False,
                     resume: bool = False, threads: int = 0, progress: bool = True) -> Result:
    t0 = time.perf_counter()
    ckpt = open_checkpoint(source)
    arch, tensors, plan = plan_checkpoint(ckpt, mixture)
    vocab = build_vocab(ckpt)
    need = [t for t in plan.tensors if t.needs_imatrix]
    if need:
        raise UnsupportedError(f"{mixture.name} puts {need[0].type.name} on {need[0].name}, which needs an importance matrix")
    out = Path(out) if out is not None else default_output(ckpt, mixture)
    if out.suffix.lower() != ".gguf":
        raise QwqqError("the output of a GGUF quantization must end in .gguf", out)
    threads = threads if threads > 0 else (os.cpu_count() or 1)
    sources = {t.name: t for t in tensors}
    planned = plan.tensor_bytes + header_estimate(len(vocab.tokens))
    src_bytes = sum(t.rows * t.cols for t in tensors)

    with atomic_output(out, force=force, planned_bytes=planned, resumable=True) as tmp, \
            tensor_progress(progress, src_bytes * 4, len(plan.tensors)) as tick:
        size = write_gguf(tmp, ckpt, arch, plan, vocab, sources, threads, tick, resume=resume, journal=journal_path(out),
                          on_resume=_say_resume)
    return Result(out, size, plan.n_params, time.perf_counter() - t0, plan)


def _say_resume(kept: int, total: int) -> None:
    import sys

    if kept:
        print(f"resuming: keeping the {kept} of {total} tensors the interrupted run finished", file=sys.stderr)
    else:
        print("nothing to resume: starting from the beginning", file=sys.stderr)

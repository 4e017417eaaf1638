"""quantize: source checkpoint -> plan -> GGUF, in one streaming pass."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qwqq.errors import QwqqError, SourceError, UnsupportedError
from qwqq.outputs import atomic_output, journal_path
from qwqq.progress import tensor_progress
from qwqq.gguf.plan import Plan
from qwqq.gguf.prepared import Prepared, prepare
from qwqq.gguf.types import BITS_TO_MIXTURE, MIXTURES, Mixture
from qwqq.gguf.writer import write_gguf
from qwqq.source import Checkpoint
from qwqq.gguf.imatrix_file import Imatrix


# The mixtures `quantize --type` accepts without an importance matrix.
GGUF_TYPES = ["F16", "BF16", "Q8_0", "Q6_K", "Q5_K_S", "Q5_K_M", "Q4_K_S", "Q4_K_M", "Q4_0", "Q3_K_S",
              "Q3_K_M", "Q3_K_L", "Q2_K", "IQ4_XS", "IQ4_NL", "F32", "Q4_1", "Q5_0", "Q5_1"]
# ... and the ones it accepts only with one (--imatrix): the very-low-bit IQ mixtures and Q2_K_S.
IMATRIX_GGUF_TYPES = ["IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS", "Q2_K_S", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS",
                      "IQ1_M", "IQ1_S"]


@dataclass
class Result:
    path: Path
    file_bytes: int
    n_params: int
    seconds: float
    plan: Plan
    imatrix_missing: list[str] = field(default_factory=list)  # quantized without importance data

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.plan.tensor_bytes / max(1, self.n_params)


def resolve_mixture(bits: int | None = None, type_name: str | None = None, *, has_imatrix: bool = False) -> Mixture:
    if bits is not None and type_name is not None:
        raise QwqqError("give --bits or --type, not both")
    if type_name is not None:
        name = type_name.upper()
        if name not in MIXTURES:
            offered = GGUF_TYPES + (IMATRIX_GGUF_TYPES if has_imatrix else [])
            raise QwqqError(f"unknown --type {type_name!r}; choose one of {', '.join(offered)}")
        if name not in GGUF_TYPES and not has_imatrix:
            raise UnsupportedError(f"--type {name} needs an importance matrix: give --imatrix FILE "
                                   "(a llama-imatrix .gguf or .dat for this model), or --imatrix auto to compute one")
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


def plan_checkpoint(ckpt: Checkpoint | Prepared, mixture: Mixture | str, *, has_imatrix: bool = False,
                    overrides: dict | None = None):
    """The arch, the GGUF tensors with their sources, and the plan for one checkpoint."""
    src = prepare(ckpt)
    return src.arch, src.tensors, src.plan(mixture, has_imatrix=has_imatrix, overrides=overrides)


def _block(name: str) -> int:
    return int(name.split(".")[1]) if name.startswith("blk.") else -1


def imatrix_rows(plan: Plan, imatrix: Imatrix, n_layer: int | None = None) -> tuple[dict[str, np.ndarray], list[str]]:
    """Per quantized tensor, the float32 [n_mat, cols] importance its rows are quantized with, and the
    names of the quantized tensors the imatrix has no data for. Follows src/llama-quant.cpp: an entry
    is used only if it holds cols * experts values (else an error, except for token_embd, which is
    then quantized without); a tensor without data is an error where its type needs an imatrix
    (plan's needs_imatrix: IQ1/IQ2/IQ3_XXS and Q2_K_S's Q2_K, never token_embd or output)."""
    rows: dict[str, np.ndarray] = {}
    missing: list[str] = []
    where = imatrix.path
    n_layer = 1 + max(map(_block, (t.name for t in plan.tensors)), default=-1) if n_layer is None else n_layer
    quantized = [t for t in plan.tensors if t.quantized]
    for t in quantized:
        cols, n_mat = t.shape[-1], (t.shape[0] if len(t.shape) == 3 else 1)
        values = imatrix.values(t.name)
        if values is not None and values.size != cols * n_mat:
            if t.name not in ("token_embd.weight", "per_layer_token_embd.weight"):
                raise SourceError(f"imatrix entry {t.name} has {values.size} values but the model's tensor needs "
                                  f"{cols * n_mat} ({n_mat} x {cols}): is the imatrix for another model?", where)
            values = None
        if values is None:
            if t.needs_imatrix and _block(t.name) >= n_layer:
                raise SourceError(f"the imatrix has no data for {t.name}, the multi-token-prediction block (llama-imatrix "
                                  f"does not run it), which {plan.mixture.name} quantizes to {t.type.name} (that needs "
                                  "one): give --no-mtp to leave the block out", where)
            if t.needs_imatrix:
                raise SourceError(f"the imatrix has no data for {t.name}, which {plan.mixture.name} quantizes to "
                                  f"{t.type.name} (that needs one): is the imatrix for another model?", where)
            missing.append(t.name)
            continue
        if not np.isfinite(values).all():  # llama-quantize: "imatrix contains non-finite value"
            raise SourceError(f"imatrix entry {t.name} holds NaN or Inf values", where)
        rows[t.name] = values.reshape(n_mat, cols)
    if quantized and not rows:
        raise SourceError("the imatrix has no data for any tensor of this model: is it for another model?", where)
    return rows, missing


def default_output(ckpt: Checkpoint, mixture: Mixture) -> Path:
    return Path.cwd() / f"{ckpt.name}-{mixture.name}.gguf"


def header_estimate(vocab_tokens: int) -> int:
    """A generous bound on metadata bytes (tokens + merges dominate), for the space check."""
    return 64 * vocab_tokens + 2**20


def quantize_to_gguf(source: str | Path | Checkpoint | Prepared, mixture: Mixture, *, out: Path | None = None, force: bool = False,
                     resume: bool = False, threads: int = 0, progress: bool = True,
                     imatrix: Imatrix | None = None, overrides: dict | None = None) -> Result:
    """Quantize a checkpoint to one GGUF file. With `imatrix` (an importance matrix, read from a
    llama-imatrix file or computed), the plan and every quantized tensor use it as llama-quantize
    --imatrix does. `source` may be already prepared (gguf.prepared.prepare), as a budgeted run's is."""
    t0 = time.perf_counter()
    src = prepare(source)
    ckpt, arch, tensors, vocab = src.ckpt, src.arch, src.tensors, src.vocab
    plan = src.plan(mixture, has_imatrix=imatrix is not None, overrides=overrides)
    rows, missing = imatrix_rows(plan, imatrix, src.facts.n_layer) if imatrix is not None else (None, [])
    need = [t for t in plan.tensors if t.needs_imatrix]
    if need and imatrix is None:
        raise UnsupportedError(f"{mixture.name} puts {need[0].type.name} on {need[0].name}, which needs an "
                               "importance matrix: give --imatrix FILE")
    out = Path(out) if out is not None else default_output(ckpt, mixture)
    if out.suffix.lower() != ".gguf":
        raise QwqqError("the output of a GGUF quantization must end in .gguf", out)
    threads = threads if threads > 0 else (os.cpu_count() or 1)
    sources = src.sources
    planned = plan.tensor_bytes + header_estimate(len(vocab.tokens))
    src_bytes = sum(t.rows * t.cols for t in tensors)

    with atomic_output(out, force=force, planned_bytes=planned, resumable=True) as tmp, \
            tensor_progress(progress, src_bytes * 4, len(plan.tensors)) as tick:
        size = write_gguf(tmp, ckpt, arch, plan, vocab, sources, threads, tick, resume=resume, journal=journal_path(out),
                          on_resume=_say_resume, imatrix=imatrix, imatrix_rows=rows)
    return Result(out, size, plan.n_params, time.perf_counter() - t0, plan, missing)


def imatrix_note(result: Result) -> str | None:
    """One line on the quantized tensors the imatrix had no data for (llama-quantize logs each)."""
    names = result.imatrix_missing
    if not names:
        return None
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return f"the imatrix has no data for {shown}: quantized without it, as llama-quantize does"


def _say_resume(kept: int, total: int) -> None:
    import sys

    if kept:
        print(f"resuming: keeping the {kept} of {total} tensors the interrupted run finished", file=sys.stderr)
    else:
        print("nothing to resume: starting from the beginning", file=sys.stderr)

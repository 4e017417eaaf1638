"""`qwqq quantize` and `qwqq imatrix`: the command behind the CLI. It checks which options the chosen format
takes (a table, one line for each that it does not), builds that format's typed options, and runs it:

    gguf  open and map the checkpoint once (gguf.prepared) -> importance matrix (read, or computed one block
          at a time) -> budget (sensitivity + allocator, fit's room for --fit) -> one streaming write
    mlx   budget (bits per module) -> one streaming write
    gptq  calibrated one decoder block at a time -> the checkpoint
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from qwqq.budget.allocate import parse_size
from qwqq.budget.gguf import budget_from_options
from qwqq.budget.mlx import plan_mlx_budget
from qwqq.calib.imatrix import imatrix_to_file, resolve_imatrix
from qwqq.options import CalibOptions
from qwqq.errors import QwqqError
from qwqq.gguf.options import Budget, GGUFOptions
from qwqq.gguf.prepared import prepare
from qwqq.gguf.quantize import fallback_notes, imatrix_note, quantize_to_gguf
from qwqq.gptq.options import GPTQOptions
from qwqq.mlx.options import MLXOptions
from qwqq.mlx.quantize import quantize_to_mlx, require_mlx, resolve_mlx_options
from qwqq.outputs import check_target
from qwqq.archs import left_out
from qwqq.progress import step_progress
from qwqq.source import checkpoint_of

FORMATS = ("gguf", "mlx", "gptq")
Say = Callable[[str], None]  # a note for the user, one line


@dataclass
class Flags:
    """Every option `qwqq quantize` was given (None: not given)."""

    source: str
    fmt: str = "gguf"
    bits: int | None = None
    type_name: str | None = None
    out: Path | None = None
    force: bool = False
    resume: bool = False
    threads: int = 0
    group_size: int | None = None
    mixed: str | None = None
    imatrix: str | None = None
    calib: CalibOptions = field(default_factory=CalibOptions)
    calib_given: bool = False
    desc_act: bool = False
    group_aware: bool = True
    asym: bool = False
    damp: float | None = None
    budget: Budget = field(default_factory=Budget)
    progress: bool = True
    mtp: bool = True  # False: --no-mtp, a hybrid Qwen's multi-token-prediction block left out

    @property
    def gptq_solver(self) -> bool:
        return self.desc_act or self.asym or self.damp is not None or not self.group_aware

    @property
    def computes_imatrix(self) -> bool:
        """--calib, or --imatrix auto: a calibration pass before the write."""
        return self.calib_given or (self.imatrix or "").lower() == "auto"

    @property
    def target(self) -> bool:
        return self.budget.target_size is not None or self.budget.target_bpw is not None


# (format, whether an option it does not take was given, what to say), checked in this order
NOT_FOR: tuple[tuple[str, Callable[[Flags], bool], str], ...] = (
    ("mlx", lambda f: f.imatrix is not None, "--imatrix is for GGUF outputs (llama.cpp's importance matrix); MLX does not use one"),
    ("gptq", lambda f: f.imatrix is not None, "--imatrix is for GGUF outputs (llama.cpp's importance matrix); GPTQ does not use one"),
    ("gguf", lambda f: f.gptq_solver, "--desc-act, --act-group-aware, --asym and --damp are for --format gptq"),
    ("mlx", lambda f: f.gptq_solver, "--desc-act, --act-group-aware, --asym and --damp are for --format gptq"),
    ("mlx", lambda f: f.budget.fit_profile is not None, "--fit sizes GGUF files for a profile; for MLX give --target-size or --target-bpw"),
    ("gptq", lambda f: f.budget.fit_profile is not None, "--fit sizes GGUF files for a profile; GPTQ has one width, --bits"),
    ("gptq", lambda f: f.target, "--target-size and --target-bpw are for GGUF and MLX; GPTQ has one width, --bits"),
    ("mlx", lambda f: f.calib_given, "--calib is for --format gptq and GGUF importance matrices; MLX quantization is not calibrated"),
    ("mlx", lambda f: f.type_name is not None, "--type names a GGUF mixture; for --format mlx give --bits (and --group-size, --mixed)"),
    ("mlx", lambda f: f.resume, "--resume is for GGUF outputs; an interrupted MLX run leaves nothing, so run it again"),
    ("gptq", lambda f: f.type_name is not None or f.mixed is not None, "--type and --mixed are for GGUF and MLX; for --format gptq give --bits and --group-size"),
    ("gptq", lambda f: f.resume, "--resume is for GGUF outputs; an interrupted GPTQ run leaves nothing, so run it again"),
    ("gguf", lambda f: f.group_size is not None or f.mixed is not None, "--group-size and --mixed are for --format mlx or gptq; a GGUF mixture is chosen with --type"),
    ("mlx", lambda f: not f.mtp, "--no-mtp is for GGUF outputs; mlx-lm's models have no MTP block, so an MLX folder never holds one"),
    ("gptq", lambda f: not f.mtp, "--no-mtp is for GGUF outputs; a GPTQ checkpoint quantizes the decoder layers only"),
)


def options_for(f: Flags) -> GGUFOptions | MLXOptions | GPTQOptions:
    """The chosen format's options, checked; one line for the first option it does not take."""
    kind = f.fmt.lower()
    if kind not in FORMATS:
        raise QwqqError(f"unknown --format {f.fmt!r}: choose gguf, mlx or gptq")
    for fmt, given, message in NOT_FOR:
        if fmt == kind and given(f):
            raise QwqqError(message)
    if kind == "mlx":
        return MLXOptions(f.bits, f.group_size, f.mixed, f.budget.target_size, f.budget.target_bpw)
    if kind == "gptq":
        extra = {} if f.damp is None else {"damp": f.damp}
        return GPTQOptions(4 if f.bits is None else f.bits, 128 if f.group_size is None else f.group_size,
                           not f.asym, f.desc_act, f.group_aware, calib=f.calib, threads=f.threads, **extra)
    if f.out is not None and not f.resume and f.computes_imatrix:
        check_target(f.out, f.force, None)  # before the calibration pass, not after it
    return GGUFOptions(f.bits, f.type_name, f.imatrix, f.calib_given, f.calib, f.budget, f.resume, mtp=f.mtp)


@dataclass
class Written:
    path: Path
    summary: str  # "(1.23 GiB, 4.85 bits/weight, 12.3 s)"


def quantize(f: Flags, say: Say) -> Written:
    """`qwqq quantize`: one function for every format."""
    opts = options_for(f)
    if isinstance(opts, MLXOptions):
        return _mlx(f, opts, say)
    if isinstance(opts, GPTQOptions):
        return _gptq(f, opts, say)
    return _gguf(f, opts, say)


def _gguf(f: Flags, opts: GGUFOptions, say: Say) -> Written:
    src = prepare(f.source, mtp=opts.mtp)  # opened and mapped once: the imatrix, the budget and the write share it
    imatrix = resolve_imatrix(src.ckpt, opts.imatrix, progress=f.progress, threads=f.threads, **opts.calib.kwargs())
    mixture, overrides = opts.mixture, None
    if opts.budget.given:
        b = opts.budget
        mixture, overrides, note = budget_from_options(src, b.target_size, b.target_bpw, b.fit_profile, b.fit_ctx,
                                                       b.fit_kv, imatrix, progress=f.progress)
        say(f"budget: {note}")
    result = quantize_to_gguf(src, mixture, out=f.out, force=f.force, resume=f.resume, threads=f.threads,
                              progress=f.progress, imatrix=imatrix, overrides=overrides)
    for line in filter(None, [left_out_note(src), *fallback_notes(result.plan), imatrix_note(result)]):
        say(f"note: {line}")
    return Written(result.path, f"({result.file_bytes / 2**30:.2f} GiB, {result.bits_per_weight:.2f} bits/weight, "
                                f"{result.seconds:.1f} s)")


def left_out_note(src) -> str | None:
    skipped = left_out(src.ckpt, src.arch)
    return src.arch.left_out_note.format(n=skipped) if skipped and src.arch.left_out_note else None


def _mlx(f: Flags, opts: MLXOptions, say: Say) -> Written:
    ckpt = checkpoint_of(f.source)
    overrides = tag = None
    group_size = opts.group_size
    if opts.budgeted:
        require_mlx()
        group_size = resolve_mlx_options(None, opts.group_size, None)[1]
        with step_progress(f.progress, 1, "measuring sensitivity") as tick:
            mb = plan_mlx_budget(ckpt, group_size=group_size, target_bpw=opts.target_bpw,
                                 target_bytes=parse_size(opts.target_size) if opts.target_size is not None else None)
            if tick:
                tick()
        mix = ", ".join(f"{n} x {b}-bit" for b, n in sorted(Counter(b for b, _ in mb.overrides.values()).items()))
        say(f"budget: {mb.note}: {mb.predicted_bytes / 1e9:.3f} GB, {mb.bits_per_weight:.2f} bits/weight, "
            f"modules {mix}; predicted loss {mb.allocation.loss:.4f}")
        overrides, tag = mb.overrides, f"{mb.bits_per_weight:.2f}bpw"
    result = quantize_to_mlx(ckpt, bits=opts.bits, group_size=group_size, mixed=opts.mixed, out=f.out, force=f.force,
                             progress=f.progress, overrides=overrides, tag=tag)
    for line in result.notes:
        say(f"note: {line}")
    return Written(result.path, f"({result.file_bytes / 2**30:.2f} GiB, {result.bits_per_weight:.2f} bits/weight, "
                                f"{result.seconds:.1f} s)")


def _gptq(f: Flags, opts: GPTQOptions, say: Say) -> Written:
    from qwqq.gptq.quantize import quantize_to_gptq  # torch: imported only when a GPTQ run starts

    result = quantize_to_gptq(f.source, bits=opts.bits, group_size=opts.group_size, sym=opts.sym,
                              desc_act=opts.desc_act, group_aware=opts.group_aware, damp=opts.damp, out=f.out,
                              force=f.force, threads=opts.threads, progress=f.progress, **opts.calib.kwargs())
    if result.undersampled:
        say(f"note: {result.tokens} calibration tokens for inputs {result.widest_input} wide: GPTQ may fit the sample "
            f"rather than the model; --calib-tokens {4 * result.widest_input} or more (with a longer --calib text) is "
            "safer (docs/bench-gptq.md)")
    if result.rtn_fallbacks:
        say(f"note: {len(result.rtn_fallbacks)} expert weights saw too few calibration tokens and were rounded to "
            f"nearest instead (first: {result.rtn_fallbacks[0]}); more --calib-tokens helps")
    return Written(result.path, f"({result.file_bytes / 2**30:.2f} GiB, calibrated on {result.tokens} tokens, "
                                f"{result.seconds:.1f} s)")


def imatrix(source: str, out: Path | None, calib: CalibOptions, *, threads: int = 0, force: bool = False,
            progress: bool = True) -> Written:
    """`qwqq imatrix`: llama.cpp's importance matrix, one decoder block at a time."""
    path, im = imatrix_to_file(source, out, force=force, threads=threads, progress=progress, **calib.kwargs())
    return Written(path, f"({len(im)} weights, {im.chunk_count} windows of {im.chunk_size} tokens)")

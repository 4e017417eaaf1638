"""The qwqq command line. Thin on purpose: parse, call one function, print.

Every command body runs inside `_guard`, which turns a QwqqError (anything the
user can cause) into one line on stderr and a non-zero exit. `--debug` shows the
full traceback instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from qwqq.errors import QwqqError

app = typer.Typer(
    name="qwqq",
    help="Quantize Qwen-family reasoning models (QwQ, Qwen3, R1-Distill) to GGUF, and run them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, highlight=False, soft_wrap=True)
_state = {"debug": False}


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True),
) -> None:
    if version:
        from qwqq import __version__

        print(f"qwqq {__version__}")
        raise typer.Exit()
    if ctx.invoked_subcommand is None:
        print(ctx.get_help())
        raise typer.Exit()
    _state["debug"] = debug or bool(os.environ.get("QWQQ_DEBUG"))


def _fail(message: str, code: int) -> None:
    err.print(f"[bold red]error:[/] {message}", markup=True, highlight=False)
    raise typer.Exit(code)


def _guard(fn, *args, **kwargs):
    """Run one command body; user errors become one line and an exit code."""
    try:
        return fn(*args, **kwargs)
    except QwqqError as e:
        if _state["debug"]:
            raise
        _fail(_escape(_one_line(str(e))), e.exit_code)
    except KeyboardInterrupt:
        if _state["debug"]:
            raise
        _fail("interrupted", 130)
    except OSError as e:  # disk full, permission denied, ... raised below our own checks
        if _state["debug"]:
            raise
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        _fail(_escape(_one_line(f"{where}{e.strerror or e}")), 3)


def _one_line(s: str) -> str:
    """Control characters (a newline in a file or tensor name) and undecodable bytes of a path shown
    escaped, so an error is always one printable line."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in s)


def _escape(s: str) -> str:
    from rich.markup import escape

    return escape(s)


# ---------------------------------------------------------------- quantize
@app.command()
def quantize(
    source: str = typer.Argument(..., help="A local Hugging Face folder, or a hub id such as Qwen/QwQ-32B."),
    bits: Optional[int] = typer.Option(None, "--bits", "-b", help="2, 3, 4, 5, 6 or 8: picks Q2_K, Q3_K_M, Q4_K_M (default), Q5_K_M, Q6_K, Q8_0; for MLX, the bits per weight (default 4)."),
    type_: Optional[str] = typer.Option(None, "--type", "-t", help="A GGUF mixture by name: F16, BF16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q3_K_L, Q2_K, IQ4_XS, ..."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file (or MLX folder). Default: ./<model>-<TYPE>.gguf, ./<model>-mlx-<bits>bit"),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite an existing output."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run into the same output, keeping the tensors it finished."),
    threads: int = typer.Option(0, "--threads", "-j", help="Quantization threads (0: all cores)."),
    fmt: str = typer.Option("gguf", "--format", help="Output format: gguf, mlx (a folder for mlx-lm) or gptq (a folder for transformers / vLLM)."),
    group_size: Optional[int] = typer.Option(None, "--group-size", "-g", help="MLX: 32, 64 (default) or 128 weights per scale and bias. GPTQ: 128 (default), 32, 64, ... or -1 (per channel)."),
    mixed: Optional[str] = typer.Option(None, "--mixed", help="MLX: a mixed recipe, 2_6, 3_4, 3_6 or 4_6 (more bits on v_proj, down_proj and lm_head, as mlx-lm's mixed_*)."),
    imatrix_file: Optional[str] = typer.Option(None, "--imatrix", help="GGUF: an importance matrix (llama-imatrix's .gguf or .dat, or one from `qwqq imatrix`), or 'auto' to compute one from the calibration text first; needed for IQ1_*, IQ2_*, IQ3_*, Q2_K_S, and improves Q2_K..Q4_K_M."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration text (UTF-8) for GPTQ or --imatrix auto (given with a GGUF type, implies --imatrix auto). Default: the sample that ships with qwqq (prose, code, maths)."),
    calib_tokens: int = typer.Option(8192, "--calib-tokens", help="Calibration tokens (more: slower, a little better; 32k+ on a GPU)."),
    calib_seqlen: int = typer.Option(512, "--calib-seqlen", help="Tokens per calibration window."),
    device: Optional[str] = typer.Option(None, "--device", help="Calibration device: cuda, mps or cpu (default: the first available)."),
    desc_act: bool = typer.Option(False, "--desc-act", help="GPTQ: act-order (columns by decreasing Hessian diagonal; g_idx becomes a permutation)."),
    group_aware: bool = typer.Option(True, "--act-group-aware/--no-act-group-aware", help="GPTQ: solve the groups in order of Hessian priority, columns too, keeping static groups (GPTQModel's act_group_aware; the checkpoint loads everywhere). On by default."),
    asym: bool = typer.Option(False, "--asym", help="GPTQ: asymmetric grid (default symmetric)."),
    damp: float = typer.Option(0.01, "--damp", help="GPTQ: damping, as a fraction of the Hessian's mean diagonal (raised automatically when needed)."),
    target_size: Optional[str] = typer.Option(None, "--target-size", help="GGUF: a type per tensor (MLX: bits per module), chosen from measured sensitivity, that fills this size best (19.5GB, 800MB, 20GiB)."),
    target_bpw: Optional[float] = typer.Option(None, "--target-bpw", help="GGUF or MLX: the same, for an average of this many bits per weight."),
    fit_profile: Optional[str] = typer.Option(None, "--fit", help="GGUF: the same, for what a hardware profile (rtx-4090, m4-max-64, ...) leaves for weights after the KV cache of --ctx."),
    fit_ctx: int = typer.Option(8192, "--ctx", help="With --fit: the context to leave room for."),
    fit_kv: str = typer.Option("f16", "--kv", help="With --fit: the KV cache type (f16, q8_0, q4_0)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Quantize fp16/bf16 safetensors into a GGUF file, an MLX folder or a GPTQ folder, streaming, in bounded memory.

    GGUF and MLX stream row chunks in one pass (no intermediate F16 file). GPTQ and --imatrix auto
    read the model one decoder block at a time to calibrate it on sample text."""
    from qwqq.gguf.quantize import fallback_notes, imatrix_note, quantize_to_gguf, resolve_mixture

    calibration = dict(calib=calib, calib_tokens=calib_tokens, calib_seqlen=calib_seqlen, device=device)

    def body():
        kind = fmt.lower()
        if kind not in ("gguf", "mlx", "gptq"):
            raise QwqqError(f"unknown --format {fmt!r}: choose gguf, mlx or gptq")
        if kind != "gguf" and imatrix_file is not None:
            raise QwqqError(f"--imatrix is for GGUF outputs (llama.cpp's importance matrix); {kind.upper()} does not use one")
        if kind != "gptq" and (desc_act or asym or damp != 0.01 or not group_aware):
            raise QwqqError("--desc-act, --act-group-aware, --asym and --damp are for --format gptq")
        if kind != "gguf" and fit_profile is not None:
            raise QwqqError("--fit sizes GGUF files for a profile; for MLX give --target-size or --target-bpw")
        if kind == "gptq" and (target_size is not None or target_bpw is not None):
            raise QwqqError("--target-size and --target-bpw are for GGUF and MLX; GPTQ has one width, --bits")
        if kind == "mlx":
            if calib is not None:
                raise QwqqError("--calib is for --format gptq and GGUF importance matrices; MLX quantization is not calibrated")
            return _quantize_mlx(source, bits, type_, group_size, mixed, out, force, resume, quiet, target_size,
                                 target_bpw)
        if kind == "gptq":
            return _quantize_gptq(source, bits, type_, group_size, mixed, out, force, resume, quiet, threads,
                                  desc_act, group_aware, asym, damp, calibration)
        if group_size is not None or mixed is not None:
            raise QwqqError("--group-size and --mixed are for --format mlx or gptq; a GGUF mixture is chosen with --type")
        from qwqq.calib.engine import resolve_imatrix

        if out is not None and not resume and (calib is not None or (imatrix_file or "").lower() == "auto"):
            from qwqq.outputs import check_target

            check_target(out, force, None)  # before the calibration pass, not after it
        budget = target_size is not None or target_bpw is not None or fit_profile is not None
        if budget and (bits is not None or type_ is not None):
            raise QwqqError("--target-size, --target-bpw and --fit choose the types themselves: drop --bits / --type")
        if budget and resume:
            raise QwqqError("--resume is not offered for budget quantization yet: run it again")
        mixture = resolve_mixture(bits=bits, type_name=type_, has_imatrix=imatrix_file is not None or calib is not None)
        imatrix = resolve_imatrix(source, imatrix_file, progress=not quiet, threads=threads, **calibration)
        overrides = None
        if budget:
            from qwqq.budget.allocate import budget_from_options

            mixture, overrides, note = budget_from_options(source, target_size, target_bpw, fit_profile, fit_ctx,
                                                           fit_kv, imatrix, progress=not quiet)
            err.print(f"[dim]budget: {_escape(note)}[/]")
        result = quantize_to_gguf(source, mixture, out=out, force=force, resume=resume, threads=threads,
                                  progress=not quiet, imatrix=imatrix, overrides=overrides)
        for line in filter(None, [*fallback_notes(result.plan), imatrix_note(result)]):
            err.print(f"[yellow]note:[/] {_escape(line)}")
        Console(highlight=False).print(
            f"wrote [bold]{result.path}[/] ({result.file_bytes / 2**30:.2f} GiB, "
            f"{result.bits_per_weight:.2f} bits/weight, {result.seconds:.1f} s)"
        )

    _guard(body)


def _quantize_mlx(source, bits, type_, group_size, mixed, out, force, resume, quiet, target_size=None,
                  target_bpw=None) -> None:
    from qwqq.mlx.writer import quantize_to_mlx

    if type_ is not None:
        raise QwqqError("--type names a GGUF mixture; for --format mlx give --bits (and --group-size, --mixed)")
    if resume:
        raise QwqqError("--resume is for GGUF outputs; an interrupted MLX run leaves nothing, so run it again")
    overrides = tag = None
    if target_size is not None or target_bpw is not None:
        from qwqq.budget.allocate import parse_size
        from qwqq.budget.mlx import plan_mlx_budget
        from qwqq.mlx.writer import _mlx_available, resolve_mlx_options
        from qwqq.progress import step_progress

        if bits is not None or mixed is not None:
            raise QwqqError("--target-size and --target-bpw choose the bits themselves: drop --bits / --mixed")
        _mlx_available()
        group = resolve_mlx_options(None, group_size, None)[1]
        with step_progress(not quiet, 1, "measuring sensitivity") as tick:
            mb = plan_mlx_budget(source, group_size=group, target_bpw=target_bpw,
                                 target_bytes=parse_size(target_size) if target_size is not None else None)
            if tick:
                tick()
        from collections import Counter

        mix = ", ".join(f"{n} x {b}-bit" for b, n in sorted(Counter(b for b, _ in mb.overrides.values()).items()))
        err.print(f"[dim]budget: {_escape(mb.note)}: {mb.predicted_bytes / 1e9:.3f} GB, {mb.bits_per_weight:.2f} "
                  f"bits/weight, modules {mix}; predicted loss {mb.allocation.loss:.4f}[/]")
        overrides, tag, group_size = mb.overrides, f"{mb.bits_per_weight:.2f}bpw", group
    result = quantize_to_mlx(source, bits=bits, group_size=group_size, mixed=mixed, out=out, force=force,
                             progress=not quiet, overrides=overrides, tag=tag)
    Console(highlight=False).print(
        f"wrote [bold]{_escape(str(result.path))}[/] ({result.file_bytes / 2**30:.2f} GiB, "
        f"{result.bits_per_weight:.2f} bits/weight, {result.seconds:.1f} s)"
    )


def _quantize_gptq(source, bits, type_, group_size, mixed, out, force, resume, quiet, threads, desc_act, group_aware,
                   asym, damp, calibration) -> None:
    from qwqq.gptq.quantize import quantize_to_gptq

    if type_ is not None or mixed is not None:
        raise QwqqError("--type and --mixed are for GGUF and MLX; for --format gptq give --bits and --group-size")
    if resume:
        raise QwqqError("--resume is for GGUF outputs; an interrupted GPTQ run leaves nothing, so run it again")
    result = quantize_to_gptq(source, bits=4 if bits is None else bits, group_size=128 if group_size is None else group_size,
                              sym=not asym, desc_act=desc_act, group_aware=group_aware, damp=damp, out=out, force=force, threads=threads,
                              progress=not quiet, **calibration)
    if result.undersampled:
        err.print(f"[yellow]note:[/] {result.tokens} calibration tokens for inputs {result.widest_input} wide: GPTQ may "
                  f"fit the sample rather than the model; --calib-tokens {4 * result.widest_input} or more (with a "
                  f"longer --calib text) is safer, and --damp 0.05 helps (docs/bench-gptq.md)")
    if result.rtn_fallbacks:
        err.print(f"[yellow]note:[/] {len(result.rtn_fallbacks)} expert weights saw too few calibration tokens and were "
                  f"rounded to nearest instead (first: {_escape(result.rtn_fallbacks[0])}); more --calib-tokens helps")
    Console(highlight=False).print(
        f"wrote [bold]{_escape(str(result.path))}[/] ({result.file_bytes / 2**30:.2f} GiB, "
        f"calibrated on {result.tokens} tokens, {result.seconds:.1f} s)"
    )


# ---------------------------------------------------------------- imatrix
@app.command()
def imatrix(
    source: str = typer.Argument(..., help="A local Hugging Face folder, or a hub id."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file. Default: ./<model>.imatrix.gguf"),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration text (UTF-8). Default: the sample that ships with qwqq."),
    calib_tokens: int = typer.Option(8192, "--calib-tokens", help="Calibration tokens."),
    calib_seqlen: int = typer.Option(512, "--calib-seqlen", help="Tokens per window (llama-imatrix's -c)."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda, mps or cpu (default: the first available)."),
    threads: int = typer.Option(0, "--threads", "-j", help="CPU threads (0: all cores)."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite an existing output."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Compute llama.cpp's importance matrix (per-column mean squared activations) one decoder block at a time.

    The file is in llama-imatrix's GGUF format: llama-quantize --imatrix and qwqq quantize --imatrix both take it."""
    from qwqq.calib.engine import imatrix_to_file

    def body():
        path, im = imatrix_to_file(source, out, calib=calib, calib_tokens=calib_tokens, calib_seqlen=calib_seqlen,
                                   device=device, threads=threads, force=force, progress=not quiet)
        Console(highlight=False).print(f"wrote [bold]{_escape(str(path))}[/] ({len(im)} weights, "
                                       f"{im.chunk_count} windows of {im.chunk_size} tokens)")

    _guard(body)


# ---------------------------------------------------------------- eval
@app.command("eval")
def eval_(
    model: Path = typer.Argument(..., help="The model to score: a .gguf file, an MLX folder, a GPTQ folder or an unquantized folder."),
    ref: Path = typer.Option(..., "--ref", help="The reference: the unquantized folder (bf16), or a Q8_0/F16 GGUF standing in for it."),
    text: Optional[Path] = typer.Option(None, "--text", help="Evaluation text (UTF-8). Default: the text that ships with qwqq (held apart from the calibration sample)."),
    ctx: int = typer.Option(512, "--ctx", "-c", help="Window length; the second half of each window is scored (as llama-perplexity)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Use at most this many tokens of the text."),
    threads: int = typer.Option(0, "--threads", "-j", help="CPU threads (0: all cores)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute the reference instead of using the cached one."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """How much did quantization cost? PPL, KL divergence (mean, median, p99) and same-top-token rate against a reference."""
    from qwqq.eval.harness import evaluate, read_text
    from qwqq.eval.render import render

    def body():
        result = evaluate(model, ref, text=None if text is None else read_text(text), ctx=ctx, max_tokens=max_tokens,
                          threads=threads, use_cache=not no_cache, progress=not quiet)
        if as_json:
            import json

            sys.stdout.write(json.dumps(result.as_dict(), indent=1) + "\n")
        else:
            render(result, Console())

    _guard(body)


# ---------------------------------------------------------------- inspect
@app.command()
def inspect(
    model: Path = typer.Argument(..., help="A .gguf file."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show a GGUF file's architecture, tensor types, size, bits per weight and metadata."""
    from qwqq.gguf import inspect as inspect_gguf

    def body():
        report = inspect_gguf.inspect(model)
        if as_json:
            import json

            sys.stdout.write(json.dumps(report, indent=1) + "\n")
        else:
            inspect_gguf.render(report, Console())

    _guard(body)


# ---------------------------------------------------------------- run
@app.command()
def run(
    model: Path = typer.Argument(..., help="A .gguf file, an MLX folder, a GPTQ folder, or (--backend transformers) an unquantized folder."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="One prompt, answered and exit. Without it: interactive chat."),
    backend: str = typer.Option("auto", "--backend", help="llama.cpp (GGUF), mlx (MLX folders), transformers (GPTQ folders; unquantized safetensors folders only when named), or auto (by format and platform)."),
    ctx: Optional[int] = typer.Option(None, "--ctx", "-c", help="Context length in tokens. Default: the longest `qwqq fit` finds for this machine."),
    n_gpu_layers: Optional[int] = typer.Option(None, "--n-gpu-layers", "-ngl", help="Layers on the GPU (-1: all). Default: fitted to the GPU's memory."),
    profile: Optional[str] = typer.Option(None, "--profile", help="Fit ctx, KV cache and GPU layers to a hardware profile (rtx-4090, m4-max-64, ...; see qwqq fit --list-profiles)."),
    kv: Optional[str] = typer.Option(None, "--kv", help="KV cache type: f16, q8_0 or q4_0. Default: fitted."),
    flash_attn: bool = typer.Option(True, "--flash-attn/--no-flash-attn", help="llama.cpp flash attention (needed for a quantized KV cache)."),
    max_tokens: int = typer.Option(2048, "--max-tokens", "-n", help="Most tokens to generate per answer."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed (default: random)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", "--temp", help="Default: the model's recommendation."),
    top_p: Optional[float] = typer.Option(None, "--top-p"),
    top_k: Optional[int] = typer.Option(None, "--top-k"),
    min_p: Optional[float] = typer.Option(None, "--min-p"),
    greedy: bool = typer.Option(False, "--greedy", help="Greedy decoding (not recommended for reasoning models)."),
    hide_thinking: bool = typer.Option(False, "--hide-thinking", help="Do not print the <think> block."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    threads: int = typer.Option(0, "--threads", "-j", help="CPU threads (0: all cores)."),
    load_in_4bit: bool = typer.Option(False, "--load-in-4bit", help="Run an unquantized folder quantized on load to bitsandbytes NF4 (transformers backend; pip install \"qwqq[nf4]\")."),
) -> None:
    """Chat with a quantized model, streamed, with the model's own chat template."""
    from qwqq.run.chat import RunOptions, run_chat

    opts = RunOptions(
        model=model, prompt=prompt, backend=backend, ctx=ctx, n_gpu_layers=n_gpu_layers,
        max_tokens=max_tokens, seed=seed, temperature=temperature, top_p=top_p, top_k=top_k,
        min_p=min_p, greedy=greedy, hide_thinking=hide_thinking, system=system, threads=threads,
        profile=profile, kv=kv.lower() if kv else None, flash_attn=flash_attn,
        debug=_state["debug"], load_in_4bit=load_in_4bit,
    )
    _guard(run_chat, opts)


# ---------------------------------------------------------------- fit
@app.command()
def fit(
    model: Optional[str] = typer.Argument(None, help="A catalog model (QwQ-32B, Qwen/Qwen3-8B, ...), hub id, local folder or .gguf file. Without: rank the catalog."),
    vram: Optional[float] = typer.Option(None, "--vram", help="GPU memory in GiB (one GPU); with --unified: the Mac's GPU limit."),
    ram: Optional[float] = typer.Option(None, "--ram", help="System RAM in GiB, for layers or experts off the GPU."),
    unified: Optional[float] = typer.Option(None, "--unified", help="A Mac: unified memory in GB."),
    gpus: Optional[str] = typer.Option(None, "--gpus", help="Several GPUs, GiB each: 4x24 or 24,24,12."),
    profile: Optional[str] = typer.Option(None, "--profile", help="A named hardware profile (rtx-4090, m4-max-64, ...; --list-profiles)."),
    ctx: Optional[int] = typer.Option(None, "--ctx", "-c", help="Context length (default: the longest that fits)."),
    kv: str = typer.Option("auto", "--kv", help="KV cache type: f16, q8_0, q4_0 or auto."),
    type_: Optional[list[str]] = typer.Option(None, "--type", "-t", help="Only this GGUF mixture (repeatable)."),
    min_ctx: int = typer.Option(16384, "--min-ctx", help="Shortest context worth proposing (reasoning models think for thousands of tokens)."),
    prefer: str = typer.Option("quality", "--prefer", help="quality (more bits, then context) or speed."),
    bandwidth: Optional[float] = typer.Option(None, "--bandwidth", help="GPU memory bandwidth in GB/s (for --vram/--gpus/--unified)."),
    ram_bandwidth: Optional[float] = typer.Option(None, "--ram-bandwidth", help="System RAM bandwidth in GB/s."),
    no_flash_attn: bool = typer.Option(False, "--no-flash-attn", help="Size for llama.cpp without flash attention (f16 KV only)."),
    list_profiles: bool = typer.Option(False, "--list-profiles", help="List the hardware profiles and exit."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output: a list of candidates."),
) -> None:
    """What runs on this machine (or a described one), with which type, context and KV cache, and how fast."""
    from qwqq.fit import search as fitting
    from qwqq.fit import render

    def body():
        if list_profiles:
            return render.print_profiles(Console(highlight=False), as_json)
        hw = fitting.machine(vram=vram, ram=ram, unified=unified, gpus=gpus, profile=profile, bandwidth=bandwidth,
                             ram_bandwidth=ram_bandwidth)
        req = fitting.Request(ctx=ctx, kv=kv.lower(), min_ctx=min_ctx, flash_attn=not no_flash_attn, prefer=prefer.lower())
        report = fitting.run_fit(model, hw, req, type_)
        if as_json:
            import json

            sys.stdout.write(json.dumps(report.to_json(), indent=1) + "\n")
        else:
            render.render(report, Console(highlight=False))

    _guard(body)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

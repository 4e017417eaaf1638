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
    fmt: str = typer.Option("gguf", "--format", help="Output format: gguf, or mlx (a folder for mlx-lm)."),
    group_size: Optional[int] = typer.Option(None, "--group-size", "-g", help="MLX: 32, 64 (default) or 128 weights per scale and bias."),
    mixed: Optional[str] = typer.Option(None, "--mixed", help="MLX: a mixed recipe, 2_6, 3_4, 3_6 or 4_6 (more bits on v_proj, down_proj and lm_head, as mlx-lm's mixed_*)."),
    imatrix_file: Optional[Path] = typer.Option(None, "--imatrix", help="GGUF: an importance matrix for this model (llama-imatrix's .gguf or .dat), used as llama-quantize --imatrix does; needed for IQ1_*, IQ2_*, IQ3_XXS, Q2_K_S."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Quantize fp16/bf16 safetensors into a GGUF file or an MLX folder in one streaming pass (no intermediate F16 file)."""
    from qwqq.quantize.pipeline import fallback_notes, imatrix_note, quantize_to_gguf, resolve_mixture

    def body():
        if fmt.lower() == "mlx":
            if imatrix_file is not None:
                raise QwqqError("--imatrix is for GGUF outputs (llama.cpp's importance matrix); MLX does not use one")
            return _quantize_mlx(source, bits, type_, group_size, mixed, out, force, resume, quiet)
        if fmt.lower() != "gguf":
            raise QwqqError(f"unknown --format {fmt!r}: choose gguf or mlx")
        if group_size is not None or mixed is not None:
            raise QwqqError("--group-size and --mixed are for --format mlx; a GGUF mixture is chosen with --type")
        imatrix = None
        if imatrix_file is not None:
            from qwqq.quantize.imatrix_file import read_imatrix

            imatrix = read_imatrix(imatrix_file)
        mixture = resolve_mixture(bits=bits, type_name=type_, has_imatrix=imatrix is not None)
        result = quantize_to_gguf(source, mixture, out=out, force=force, resume=resume, threads=threads,
                                  progress=not quiet, imatrix=imatrix)
        for line in filter(None, [*fallback_notes(result.plan), imatrix_note(result)]):
            err.print(f"[yellow]note:[/] {_escape(line)}")
        Console(highlight=False).print(
            f"wrote [bold]{result.path}[/] ({result.file_bytes / 2**30:.2f} GiB, "
            f"{result.bits_per_weight:.2f} bits/weight, {result.seconds:.1f} s)"
        )

    _guard(body)


def _quantize_mlx(source, bits, type_, group_size, mixed, out, force, resume, quiet) -> None:
    from qwqq.quantize.mlx_writer import quantize_to_mlx

    if type_ is not None:
        raise QwqqError("--type names a GGUF mixture; for --format mlx give --bits (and --group-size, --mixed)")
    if resume:
        raise QwqqError("--resume is for GGUF outputs; an interrupted MLX run leaves nothing, so run it again")
    result = quantize_to_mlx(source, bits=bits, group_size=group_size, mixed=mixed, out=out, force=force,
                             progress=not quiet)
    Console(highlight=False).print(
        f"wrote [bold]{_escape(str(result.path))}[/] ({result.file_bytes / 2**30:.2f} GiB, "
        f"{result.bits_per_weight:.2f} bits/weight, {result.seconds:.1f} s)"
    )


# ---------------------------------------------------------------- inspect
@app.command()
def inspect(
    model: Path = typer.Argument(..., help="A .gguf file."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show a GGUF file's architecture, tensor types, size, bits per weight and metadata."""
    from qwqq import inspect_gguf

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
    model: Path = typer.Argument(..., help="A .gguf file or an MLX folder."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="One prompt, answered and exit. Without it: interactive chat."),
    backend: str = typer.Option("auto", "--backend", help="llama.cpp, mlx, or auto (by format and platform)."),
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
) -> None:
    """Chat with a quantized model, streamed, with the model's own chat template."""
    from qwqq.chat import RunOptions, run_chat

    opts = RunOptions(
        model=model, prompt=prompt, backend=backend, ctx=ctx, n_gpu_layers=n_gpu_layers,
        max_tokens=max_tokens, seed=seed, temperature=temperature, top_p=top_p, top_k=top_k,
        min_p=min_p, greedy=greedy, hide_thinking=hide_thinking, system=system, threads=threads,
        profile=profile, kv=kv.lower() if kv else None, flash_attn=flash_attn,
        debug=_state["debug"],
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
    from qwqq.profiles import fit as fitting
    from qwqq.profiles import render

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

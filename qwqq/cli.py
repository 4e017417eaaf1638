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
        _fail(_escape(str(e)), e.exit_code)
    except KeyboardInterrupt:
        if _state["debug"]:
            raise
        _fail("interrupted", 130)
    except OSError as e:  # disk full, permission denied, ... raised below our own checks
        if _state["debug"]:
            raise
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        _fail(_escape(f"{where}{e.strerror or e}"), 3)


def _escape(s: str) -> str:
    from rich.markup import escape

    return escape(s)


# ---------------------------------------------------------------- quantize
@app.command()
def quantize(
    source: str = typer.Argument(..., help="A local Hugging Face folder, or a hub id such as Qwen/QwQ-32B."),
    bits: Optional[int] = typer.Option(None, "--bits", "-b", help="2, 3, 4, 5, 6 or 8: picks Q2_K, Q3_K_M, Q4_K_M (default), Q5_K_M, Q6_K, Q8_0."),
    type_: Optional[str] = typer.Option(None, "--type", "-t", help="A GGUF mixture by name: F16, BF16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q3_K_L, Q2_K, IQ4_XS, ..."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file. Default: ./<model>-<TYPE>.gguf"),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite an existing output."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run into the same output, keeping the tensors it finished."),
    threads: int = typer.Option(0, "--threads", "-j", help="Quantization threads (0: all cores)."),
    fmt: str = typer.Option("gguf", "--format", help="Output format: gguf."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Quantize fp16/bf16 safetensors into a GGUF file in one streaming pass (no intermediate F16 file)."""
    from qwqq.quantize.pipeline import fallback_notes, quantize_to_gguf, resolve_mixture

    def body():
        if fmt.lower() != "gguf":
            raise QwqqError(f"unknown --format {fmt!r}: this version writes gguf")
        mixture = resolve_mixture(bits=bits, type_name=type_)
        result = quantize_to_gguf(source, mixture, out=out, force=force, resume=resume, threads=threads,
                                  progress=not quiet)
        for line in fallback_notes(result.plan):
            err.print(f"[yellow]note:[/] {_escape(line)}")
        Console(highlight=False).print(
            f"wrote [bold]{result.path}[/] ({result.file_bytes / 2**30:.2f} GiB, "
            f"{result.bits_per_weight:.2f} bits/weight, {result.seconds:.1f} s)"
        )

    _guard(body)


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
    model: Path = typer.Argument(..., help="A .gguf file."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="One prompt, answered and exit. Without it: interactive chat."),
    backend: str = typer.Option("auto", "--backend", help="llama.cpp, or auto (by file format)."),
    ctx: int = typer.Option(4096, "--ctx", "-c", help="Context length in tokens."),
    n_gpu_layers: int = typer.Option(-1, "--n-gpu-layers", "-ngl", help="Layers on the GPU (-1: all, on a GPU build)."),
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
        debug=_state["debug"],
    )
    _guard(run_chat, opts)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

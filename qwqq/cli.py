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
    help="Quantize Qwen-family reasoning models (QwQ, Qwen3, Qwen3.5/3.6/3.8, Qwen3-Next, DeepSeek-R1 and its distills) to GGUF, MLX or GPTQ; fit them to your hardware; chat with them, serve them to OpenAI clients, and measure what quantization cost.",
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
    damp: Optional[float] = typer.Option(None, "--damp", help="GPTQ: damping, as a fraction of the Hessian's mean diagonal (default 0.05, GPTQModel's too; raised automatically when needed)."),
    target_size: Optional[str] = typer.Option(None, "--target-size", help="GGUF: a type per tensor (MLX: bits per module), chosen from measured sensitivity, that fills this size best (19.5GB, 800MB, 20GiB)."),
    target_bpw: Optional[float] = typer.Option(None, "--target-bpw", help="GGUF or MLX: the same, for an average of this many bits per weight."),
    fit_profile: Optional[str] = typer.Option(None, "--fit", help="GGUF: the same, for what a hardware profile (rtx-4090, m4-max-64, ...) leaves for weights after the KV cache of --ctx."),
    fit_ctx: int = typer.Option(8192, "--ctx", help="With --fit: the context to leave room for."),
    fit_kv: str = typer.Option("f16", "--kv", help="With --fit: the KV cache type (f16, q8_0, q4_0)."),
    no_mtp: bool = typer.Option(False, "--no-mtp", help="GGUF of Qwen3.5+ / Qwen3-Next: leave out the multi-token-prediction block (kept by default, as llama.cpp's converter keeps it; llama.cpp loads it only for speculative decoding)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Quantize fp16/bf16 (or FP8, as DeepSeek-R1 ships) safetensors into a GGUF file, an MLX folder or a GPTQ folder, streaming, in bounded memory.

    GGUF and MLX stream row chunks in one pass (no intermediate F16 file). GPTQ and --imatrix auto
    read the model one decoder block at a time to calibrate it on sample text."""
    from qwqq.options import CalibOptions
    from qwqq.gguf.options import Budget
    from qwqq.quantize import Flags, quantize as run_quantize

    flags = Flags(source, fmt, bits, type_, out, force, resume, threads, group_size, mixed, imatrix_file,
                  CalibOptions(calib, calib_tokens, calib_seqlen, device), calib is not None, desc_act, group_aware,
                  asym, damp, Budget(target_size, target_bpw, fit_profile, fit_ctx, fit_kv), progress=not quiet,
                  mtp=not no_mtp)
    written = _guard(run_quantize, flags, _say)
    Console(highlight=False).print(f"wrote [bold]{_escape(str(written.path))}[/] {written.summary}")


def _say(line: str) -> None:
    """A note from a command: budget lines dimmed, notes in yellow."""
    kind, _, rest = line.partition(": ")
    if kind == "budget":
        err.print(f"[dim]budget: {_escape(rest)}[/]")
    else:
        err.print(f"[yellow]{kind}:[/] {_escape(rest)}")


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
    from qwqq.options import CalibOptions
    from qwqq.quantize import imatrix as run_imatrix

    written = _guard(run_imatrix, source, out, CalibOptions(calib, calib_tokens, calib_seqlen, device),
                     threads=threads, force=force, progress=not quiet)
    Console(highlight=False).print(f"wrote [bold]{_escape(str(written.path))}[/] {written.summary}")


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
    n_cpu_moe: Optional[int] = typer.Option(None, "--n-cpu-moe", "-ncmoe", help="llama.cpp: keep the MoE experts of the first N layers in system RAM (attention and the rest on the GPU). Default: fitted with the GPU layers."),
    cpu_moe: bool = typer.Option(False, "--cpu-moe", "-cmoe", help="llama.cpp: keep every layer's MoE experts in system RAM."),
    tensor_split: Optional[str] = typer.Option(None, "--tensor-split", "-ts", help="llama.cpp: spread the GPU layers over several GPUs in these proportions, one per GPU (3,1; fit writes layers per GPU). Default: fitted, else llama.cpp's split by free memory."),
    profile: Optional[str] = typer.Option(None, "--profile", help="Fit ctx, KV cache and GPU layers to a hardware profile (rtx-4090, m4-max-64, ...; see qwqq fit --list-profiles)."),
    kv: Optional[str] = typer.Option(None, "--kv", help="KV cache type: f16, q8_0 or q4_0. Default: fitted."),
    flash_attn: bool = typer.Option(True, "--flash-attn/--no-flash-attn", help="llama.cpp flash attention (needed for a quantized KV cache)."),
    max_tokens: int = typer.Option(2048, "--max-tokens", "-n", help="Most tokens to generate per answer."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed (default: random)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", "--temp", help="Default: the model's recommendation."),
    top_p: Optional[float] = typer.Option(None, "--top-p"),
    top_k: Optional[int] = typer.Option(None, "--top-k"),
    min_p: Optional[float] = typer.Option(None, "--min-p"),
    presence_penalty: Optional[float] = typer.Option(None, "--presence-penalty", help="Subtracted from the logit of each token already in the recent output (0: off). Default: the model's recommendation (Qwen3.5+: 1.5)."),
    greedy: bool = typer.Option(False, "--greedy", help="Greedy decoding (not recommended for reasoning models)."),
    hide_thinking: bool = typer.Option(False, "--hide-thinking", help="Do not print the <think> block."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    threads: int = typer.Option(0, "--threads", "-j", help="CPU threads (0: all cores)."),
    load_in_4bit: bool = typer.Option(False, "--load-in-4bit", help="Run an unquantized folder quantized on load to bitsandbytes NF4 (transformers backend; pip install \"qwqq[nf4]\")."),
    think: Optional[bool] = typer.Option(None, "--think/--no-think", help="Turn the template's thinking switch (enable_thinking) on or off: Qwen3 and Qwen3.5+ think by default; Qwen3-2507 Instruct / Thinking models have no switch. Default: the template's own."),
    preserve_thinking: bool = typer.Option(False, "--preserve-thinking", help="Qwen3.6: keep earlier turns' thinking in the conversation (the template's preserve_thinking)."),
    template_arg: Optional[list[str]] = typer.Option(None, "--template-arg", help="Another chat-template variable, NAME=VALUE (VALUE as JSON: true, 3, \"x\"), as chat_template_kwargs; repeatable."),
) -> None:
    """Chat with a quantized model, streamed, with the model's own chat template."""
    from qwqq.run.chat import RunOptions, run_chat
    from qwqq.run.split import parse as parse_split
    from qwqq.run.template import parse_switches

    opts = RunOptions(
        model=model, prompt=prompt, backend=backend, ctx=ctx, n_gpu_layers=n_gpu_layers, n_cpu_moe=n_cpu_moe,
        cpu_moe=cpu_moe, tensor_split=_guard(parse_split, tensor_split), max_tokens=max_tokens, seed=seed, temperature=temperature, top_p=top_p, top_k=top_k,
        min_p=min_p, presence_penalty=presence_penalty, greedy=greedy, hide_thinking=hide_thinking, system=system,
        threads=threads, profile=profile, kv=kv.lower() if kv else None, flash_attn=flash_attn,
        debug=_state["debug"], load_in_4bit=load_in_4bit,
        template_switches=_guard(parse_switches, template_arg or [], think, preserve_thinking),
    )
    _guard(run_chat, opts)


# ---------------------------------------------------------------- serve
@app.command()
def serve(
    model: Path = typer.Argument(..., help="A .gguf file (llama.cpp), an MLX folder (mlx-lm) or a GPTQ folder (transformers; an unquantized one with --backend transformers); with --engine vllm a GPTQ or unquantized folder, or a hub id."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. Default: this machine only; 0.0.0.0 for every interface."),
    port: int = typer.Option(8000, "--port", help="TCP port (0: any free one, said on start-up)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Clients must send Authorization: Bearer KEY (/health stays public)."),
    api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", help="The API key from the first line of a file (kept out of the process list)."),
    ctx: Optional[int] = typer.Option(None, "--ctx", "-c", help="Context length in tokens. Default: the longest `qwqq fit` finds for this machine."),
    kv: Optional[str] = typer.Option(None, "--kv", help="KV cache type: f16, q8_0 or q4_0. Default: fitted."),
    n_gpu_layers: Optional[int] = typer.Option(None, "--n-gpu-layers", "-ngl", help="Layers on the GPU (-1: all). Default: fitted to the GPU's memory."),
    n_cpu_moe: Optional[int] = typer.Option(None, "--n-cpu-moe", "-ncmoe", help="llama.cpp: keep the MoE experts of the first N layers in system RAM (attention and the rest on the GPU). Default: fitted with the GPU layers."),
    cpu_moe: bool = typer.Option(False, "--cpu-moe", "-cmoe", help="llama.cpp: keep every layer's MoE experts in system RAM."),
    tensor_split: Optional[str] = typer.Option(None, "--tensor-split", "-ts", help="llama.cpp: spread the GPU layers over several GPUs in these proportions, one per GPU (3,1; fit writes layers per GPU). Default: fitted, else llama.cpp's split by free memory."),
    profile: Optional[str] = typer.Option(None, "--profile", help="Fit ctx, KV cache and GPU layers to a hardware profile (see qwqq fit --list-profiles)."),
    flash_attn: bool = typer.Option(True, "--flash-attn/--no-flash-attn", help="llama.cpp flash attention (needed for a quantized KV cache)."),
    threads: int = typer.Option(0, "--threads", "-j", help="CPU threads (0: all cores)."),
    reasoning_format: str = typer.Option("deepseek", "--reasoning-format", help="Where the <think> block goes: deepseek (message.reasoning_content, as llama-server and DeepSeek's API), reasoning (message.reasoning, vLLM's newer name) or none (left inline in content)."),
    backend: str = typer.Option("auto", "--backend", "-b", help="auto (by the model's format: a GGUF on llama.cpp, an MLX folder on mlx, a GPTQ folder on transformers), llama.cpp, mlx or transformers (GPTQ folders, and unquantized safetensors folders only when named)."),
    parallel: int = typer.Option(4, "--parallel", "-np", help="Slots: requests decoded together in one batch (continuous batching on one llama.cpp context, as llama-server's --parallel; 4, its auto). MLX: mlx-lm's BatchGenerator decodes up to N together. transformers: one request at a time, the others wait."),
    kv_unified: bool = typer.Option(True, "--kv-unified/--no-kv-unified", help="One KV pool shared by the slots: each request may use the whole context, together no more (llama-server's auto). --no-kv-unified: each slot gets ctx / parallel of its own, and a request's tokens no longer depend on what else is decoded with it."),
    max_queue: int = typer.Option(64, "--max-queue", help="Requests that may wait for a free slot; more get 503 with Retry-After."),
    engine: str = typer.Option("qwqq", "--engine", help="qwqq (its own server, on the --backend that runs the model) or vllm (vLLM's OpenAI server: GPTQ or unquantized folders, one or more GPUs or nodes, or its CPU build)."),
    gpus: Optional[str] = typer.Option(None, "--gpus", help="vllm: the GPUs of each node, GiB each (2x24, 8x80): tensor parallel over them. Default: --profile or this machine's."),
    nodes: int = typer.Option(1, "--nodes", help="vllm: machines, pipeline parallel over them; without --node-rank, print each node's command."),
    node_rank: Optional[int] = typer.Option(None, "--node-rank", help="vllm with --nodes: start this node's part (0 serves the API, the others are headless workers)."),
    master_addr: Optional[str] = typer.Option(None, "--master-addr", help="vllm with --nodes: node 0's address, reachable from every node (an isolated network: the traffic is not encrypted)."),
    master_port: int = typer.Option(29501, "--master-port", help="vllm with --nodes: node 0's port for the other nodes."),
    vllm_python: Optional[str] = typer.Option(None, "--vllm-python", help="vllm: a Python that has vLLM (e.g. the CPU build's venv/bin/python). Default: this one, if it can import vllm."),
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics).

    Up to --parallel requests are decoded together, each step one llama.cpp batch (a GGUF) or one mlx-lm batch (an MLX folder); the others wait for a slot. transformers (GPTQ and unquantized folders) answers one request at a time. A client that disconnects is cancelled and its slot freed. Needs pip install "qwqq\\[serve]".

    --engine vllm starts vLLM's own server instead (GPTQ or unquantized folders; tensor parallel over --gpus, pipeline parallel over --nodes), with context, KV cache type, memory share and reasoning / tool-call parsers from fit and the model's family; see docs/serve.md.
    """
    from qwqq.run.split import parse as parse_split
    from qwqq.serve import serve as serve_model
    from qwqq.serve.options import ServeOptions

    if engine.lower() == "vllm":  # vLLM's own server, told what fit and the model's family decide (qwqq/serve/vllm.py)
        from qwqq.serve.vllm import VllmOptions, serve_vllm

        if (n_gpu_layers is not None or n_cpu_moe is not None or cpu_moe or tensor_split is not None or threads or not flash_attn or parallel != 4
                or not kv_unified or max_queue != 64 or backend.strip().lower() != "auto"):
            _fail("--backend, --n-gpu-layers, --n-cpu-moe, --cpu-moe, --tensor-split, --threads, --no-flash-attn, --parallel, --no-kv-unified and --max-queue are qwqq's own server's; vLLM places and batches the model itself", 2)
        vopts = VllmOptions(model=str(model), host=host, port=port, api_key=api_key, api_key_file=api_key_file, ctx=ctx,
                            kv=kv.lower() if kv else None, gpus=gpus, profile=profile, nodes=nodes, node_rank=node_rank,
                            master_addr=master_addr, master_port=master_port, vllm_python=vllm_python,
                            reasoning_format=reasoning_format.lower(), debug=_state["debug"])
        raise typer.Exit(_guard(serve_vllm, vopts, say=lambda line: err.print(line, markup=False, highlight=False)) or 0)
    if engine.lower() not in ("qwqq", "llama.cpp", "llamacpp"):  # llama.cpp: its name when it served GGUF only
        _fail(f"unknown --engine {engine!r}; choose qwqq or vllm", 2)
    if gpus or nodes != 1 or node_rank is not None or master_addr or vllm_python:
        _fail("--gpus, --nodes, --node-rank, --master-addr and --vllm-python go with --engine vllm", 2)

    opts = ServeOptions(model=model, host=host, port=port, api_key=api_key, api_key_file=api_key_file, ctx=ctx,
                        kv=kv.lower() if kv else None, n_gpu_layers=n_gpu_layers, profile=profile, threads=threads,
                        n_cpu_moe=n_cpu_moe, cpu_moe=cpu_moe, tensor_split=_guard(parse_split, tensor_split), flash_attn=flash_attn,
                        reasoning_format=reasoning_format.lower(), parallel=parallel, kv_unified=kv_unified, max_queue=max_queue,
                        backend=backend, debug=_state["debug"])
    _guard(serve_model, opts, say=lambda line: err.print(line, markup=False, highlight=False))


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
    no_mtp: bool = typer.Option(False, "--no-mtp", help="Qwen3.5+ / Qwen3-Next: size the GGUF `quantize --no-mtp` writes, without the multi-token-prediction block (llama.cpp loads it only for speculative decoding, so for generation only the file shrinks)."),
    list_profiles: bool = typer.Option(False, "--list-profiles", help="List the hardware profiles and exit."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output: a list of candidates."),
) -> None:
    """What runs on this machine (or a described one), with which type, context and KV cache, and how fast."""
    from qwqq.fit import render
    from qwqq.fit.candidate import Request
    from qwqq.fit.search import machine, run_fit

    def body():
        if list_profiles:
            return render.print_profiles(Console(highlight=False), as_json)
        hw = machine(vram=vram, ram=ram, unified=unified, gpus=gpus, profile=profile, bandwidth=bandwidth,
                     ram_bandwidth=ram_bandwidth)
        req = Request(ctx=ctx, kv=kv.lower(), min_ctx=min_ctx, flash_attn=not no_flash_attn, prefer=prefer.lower())
        report = run_fit(model, hw, req, type_, mtp=not no_mtp)
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

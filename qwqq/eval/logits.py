"""Next-token logits of a model over fixed windows of tokens, for every format qwqq writes or reads.

A provider is ``open_logits(path, ctx) -> LogitsModel`` with ``.n_vocab``, ``.logits(windows, first)``
yielding, for each window of ``windows`` [n, ctx], float32 [ctx - 1 - first, n_vocab] (positions
first .. ctx-2, each predicting the next token; it may be a view valid only until the next window is
asked for), and ``.close()``. One provider per format, in a table:

    gguf         llama.cpp through llama-cpp-python (a window a batch, logits at the scored positions only)
    safetensors  the unquantized Hugging Face checkpoint, one decoder block at a time (bounded memory:
                 qwqq.calib.engine's engine, exact against transformers)
    gptq         the same engine, each linear dequantized from qweight/qzeros/scales/g_idx
    mlx          mlx-lm on a Mac's GPU; on mlx's CPU backend the block engine, each module dequantized by mlx
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from qwqq.archs import check_gguf_arch, hparams, refusal
from qwqq.errors import QwqqError, UnsupportedError
from qwqq.calib.engine import ensure_torch, threads_for_torch
from qwqq.source import open_checkpoint
from qwqq.eval.blocks import BlockLogits
from qwqq.formats import detect_format
from qwqq.gguf.reader import read_gguf


@dataclass
class LogitsModel:
    n_vocab: int
    logits: Callable[[np.ndarray, int], Iterator[np.ndarray]]
    close: Callable[[], None]
    tokenize: Callable[[str], np.ndarray] | None = None  # the model's own tokenizer, where it has one
    describe: str = ""


def _gguf(path: Path, ctx: int, threads: int) -> LogitsModel:
    """llama.cpp's own batch API, as llama-perplexity drives it: one window a batch, a clean KV cache per
    window, logits asked for only at the scored positions (no output projection for the first half, and
    no copy: each window's logits are a view of llama.cpp's buffer, valid until the next one)."""
    try:
        import llama_cpp
        from llama_cpp import Llama
    except ImportError:
        raise UnsupportedError('evaluating GGUF needs llama-cpp-python: pip install "qwqq[llama]"') from None
    threads = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    try:
        llm = Llama(model_path=str(path), n_ctx=ctx, n_batch=ctx, n_ubatch=min(ctx, 512), logits_all=False,
                    n_threads=threads, n_threads_batch=threads, n_gpu_layers=-1, verbose=False)
    except ValueError as e:
        raise QwqqError(f"llama.cpp cannot load it: {e}", path) from None
    n_vocab = llm.n_vocab()
    batch = llama_cpp.llama_batch_init(ctx, 0, 1)
    memory = llama_cpp.llama_get_memory(llm.ctx)

    def logits(windows: np.ndarray, first: int) -> Iterator[np.ndarray]:
        n = windows.shape[1]
        for window in windows:
            llama_cpp.llama_memory_clear(memory, True)
            batch.n_tokens = n
            for i, tok in enumerate(window.tolist()):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = first <= i < n - 1
            rc = llama_cpp.llama_decode(llm.ctx, batch)
            if rc != 0:
                raise QwqqError(f"llama.cpp could not evaluate a window of {n} tokens (llama_decode returned {rc})",
                                path)
            yield np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(n - 1 - first, n_vocab))

    def tokenize(text: str) -> np.ndarray:
        return np.asarray(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False), dtype=np.int64)

    def close() -> None:
        llama_cpp.llama_batch_free(batch)
        llm.close()

    return LogitsModel(n_vocab, logits, close, tokenize, f"llama.cpp {path.name}")


def _safetensors(path: Path, ctx: int, threads: int, mlx: bool = False) -> LogitsModel:
    ensure_torch("evaluating an unquantized checkpoint")
    threads_for_torch(threads)
    ckpt = open_checkpoint(path)
    model = BlockLogits(ckpt, mlx=mlx)
    return LogitsModel(model.n_vocab, model.logits, model.close, model.tokenize, f"transformers blocks {path.name}",)


def _mlx(path: Path, ctx: int, threads: int) -> LogitsModel:
    """mlx-lm on a Mac's GPU. On mlx's CPU backend (Linux) its matrix products are slow (2-4 GFLOP/s here:
    hours for a 1.5B model), so there the block engine scores the same weights, each quantized module
    dequantized by mlx's own mx.dequantize, in float32 (torch)."""
    try:
        import mlx.core as mx
    except ImportError:
        raise UnsupportedError('evaluating MLX needs mlx-lm: pip install "qwqq[mlx]"') from None
    if mx.default_device() == mx.cpu:
        model = _safetensors(path, ctx, threads, mlx=True)
        model.describe = f"mlx weights (mx.dequantize), transformers blocks {path.name}"
        return model
    return _mlx_lm(path)


def _mlx_lm(path: Path) -> LogitsModel:
    import mlx.core as mx

    try:
        from mlx_lm import load
    except ImportError:
        raise UnsupportedError('evaluating MLX needs mlx-lm: pip install "qwqq[mlx]"') from None

    model, tok = load(str(path))

    def logits(windows: np.ndarray, first: int) -> Iterator[np.ndarray]:
        for window in windows:
            out = model(mx.array(window[None].astype(np.int32)))
            yield np.array(out[0, first: len(window) - 1].astype(mx.float32))

    def tokenize(text: str) -> np.ndarray:
        return np.asarray(tok.encode(text, add_special_tokens=False), dtype=np.int64)

    n_vocab = int(hparams(open_checkpoint(path).config)["vocab_size"])  # a multimodal release's: its text_config's
    return LogitsModel(n_vocab, logits, lambda: None, tokenize, f"mlx-lm {path.name}")


PROVIDERS: dict[str, Callable[[Path, int, int], LogitsModel]] = {
    "gguf": _gguf,
    "safetensors": _safetensors,
    "gptq": _safetensors,  # the same block engine, each GPTQ linear dequantized as the kernels compute it
    "mlx": _mlx,
}


def check_logits_source(path: str | Path) -> str:
    """The format of `path`, checked as far as is cheap (it exists, its headers parse, eval reads it):
    run before the reference pass so a bad model path fails at once, not after minutes of work."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt not in PROVIDERS:
        raise UnsupportedError(f"eval does not read {fmt} models yet", path)
    if fmt == "gguf":
        check_gguf_arch(read_gguf(path).architecture, path)  # a family qwqq refuses: now, not after the reference
    if fmt in ("safetensors", "gptq", "mlx"):
        ckpt = open_checkpoint(path)  # reads config and safetensors headers; checks every shard is whole
        if (why := refusal(ckpt.config)) is not None:
            raise UnsupportedError(why, path)
    return fmt


def open_logits(path: str | Path, ctx: int, threads: int = 0) -> LogitsModel:
    path = Path(path)
    return PROVIDERS[check_logits_source(path)](path, ctx, threads)

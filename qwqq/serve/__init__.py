"""`qwqq serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for a GGUF on llama.cpp, or vLLM's own
server (--engine vllm) for GPTQ and unquantized folders on one or several GPUs and machines.

    options.py   ServeOptions and their checks; the API key read from --api-key / --api-key-file
    protocol.py  the OpenAI request bodies (pydantic), APIError, the response and stream-chunk shapes
    tools.py     Qwen's tool calls (JSON and XML forms, the form found in the chat template) parsed to tool_calls
    answer.py    the output as a chat message or stream deltas: <think> split, then tool calls
    engine.py    Job, GenParams, QueueFull: a request's parameters and the events it is answered with
    batch.py     BatchScheduler: --parallel slots, one decode thread, one llama_batch per step (continuous
                 batching), prompt-prefix reuse per slot; stop strings, EOS, max_tokens, usage, cancellation
    llamacpp.py  the llama-cpp-python layer: tokens, grammar check, the n_seq_max context, a sampler chain
    metrics.py   the counters behind /metrics, in Prometheus' text format
    app.py       the FastAPI application: routes, Bearer key, errors as OpenAI error JSON, SSE streams
    server.py    serve(): fit ctx / KV / GPU layers as `qwqq run` does, bind, load in the background, run uvicorn
    vllm_plan.py --engine vllm's command from fit: tensor / pipeline parallel, context, KV cache, memory fraction,
                 the family's reasoning and tool parsers; the per-node commands for --nodes (nothing started)
    vllm.py      starting vLLM's OpenAI server (its Python, its health route, signals passed through)

Kept apart from qwqq.run (which it uses: the chat template, the <think> splitter, sampling defaults, the
backend's loader); nothing in qwqq.run imports it. FastAPI and uvicorn are imported only when serving
(`pip install "qwqq[serve]"`).
"""

from __future__ import annotations

from typing import Callable


def serve(opts, say: Callable[[str], None] = print) -> None:
    """Serve `opts.model` until interrupted; `say` prints the start-up lines."""
    from qwqq.serve.server import run_server

    run_server(opts, say)

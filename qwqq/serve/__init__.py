"""`qwqq serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for a GGUF on llama.cpp.

    options.py   ServeOptions and their checks; the API key read from --api-key / --api-key-file
    protocol.py  the OpenAI request bodies (pydantic), APIError, the response and stream-chunk shapes
    tools.py     Qwen's tool calls (JSON and XML forms, the form found in the chat template) parsed to tool_calls
    answer.py    the output as a chat message or stream deltas: <think> split, then tool calls
    engine.py    Job, GenParams, Scheduler: a bounded queue and one worker thread decoding one job at a time
    llamacpp.py  decoding one job on llama-cpp-python: sampling, grammar, stop strings, EOS, usage, cancellation
    metrics.py   the counters behind /metrics, in Prometheus' text format
    app.py       the FastAPI application: routes, Bearer key, errors as OpenAI error JSON, SSE streams
    server.py    serve(): fit ctx / KV / GPU layers as `qwqq run` does, bind, load in the background, run uvicorn

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

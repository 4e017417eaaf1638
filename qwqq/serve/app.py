"""The FastAPI application: OpenAI's routes over one loaded model.

Every error is OpenAI's error JSON with a 4xx/5xx status, and none of them stops the server. The
Bearer key (when one is set) guards every route but /health, compared in constant time. Streams are
server-sent events (FastAPI's EventSourceResponse and its event encoder), ended by `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.sse import EventSourceResponse, format_sse_event
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwqq.errors import QwqqError
from qwqq.run.chat import prompt_opens_think
from qwqq.run.sampling import Sampling
from qwqq.run.template import RESERVED
from qwqq.serve.answer import AnswerStream, whole
from qwqq.serve.engine import GenParams, Job, QueueFull
from qwqq.serve.metrics import CONTENT_TYPE, Metrics
from qwqq.serve.options import ServeOptions
from qwqq.serve.protocol import (APIError, ChatRequest, CompletionRequest, Reply, error_body, parse,
                                 template_messages, usage)
from qwqq.serve.tools import Form, form_of, schemas

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
RETRY_AFTER = "2"  # seconds, with a 503 (queue full, still loading)
PENALTIES = ("presence_penalty", "frequency_penalty")  # the request fields only some backends apply


@dataclass
class ServerState:
    opts: ServeOptions
    model_id: str
    key: str | None
    metrics: Metrics
    engine: object | None = None  # once loaded: a LlamaCppEngine, or a serial.ModelEngine (MLX, transformers)
    scheduler: object | None = None  # once loaded: an engine.Scheduler (llama.cpp's batch, mlx-lm's, one at a time)
    sampling: Sampling = field(default_factory=Sampling)  # the model's or its family's defaults
    template_vars: set = field(default_factory=set)
    load_error: str | None = None
    render_lock: threading.Lock = field(default_factory=threading.Lock)


class _Disconnected(Exception):
    pass


# ---------------------------------------------------------------- plumbing
class _CountRequests:
    """ASGI middleware: every answered request counted by route and status (streams included)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            path = scope.get("path", "")
            route = path if path in ROUTES else ("/v1/models" if path.startswith("/v1/models/") else "other")
            self.metrics.request(route, status[0])


def _sse(data) -> bytes:
    return format_sse_event(data_str=data if isinstance(data, str) else json.dumps(data, ensure_ascii=False))


async def _events(job: Job, request: Request) -> AsyncIterator[tuple]:
    """The job's events as they come; a client that went away (looked at twice a second) ends it."""
    get: asyncio.Future | None = None
    try:
        while True:
            if get is None:
                get = asyncio.ensure_future(job.events.get())
            done, _ = await asyncio.wait({get}, timeout=0.5)
            if not done:
                if await request.is_disconnected():
                    raise _Disconnected()
                continue
            event, get = get.result(), None
            yield event
            if event[0] in ("done", "error"):
                return
    finally:
        if get is not None:
            get.cancel()


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with a 413 as soon as it (or its declared length) passes `limit` bytes."""
    too_big = APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------- the application
def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="qwqq serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_CountRequests, metrics=state.metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else (
            "invalid_request_error" if e.status_code < 500 else "server_error")
        return JSONResponse(error_body(e.status_code, str(e.detail), kind), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        return JSONResponse(error_body(500, f"internal error: {type(e).__name__}: {e}", "server_error"), status_code=500)

    def authorize(request: Request) -> None:
        if state.key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.key.encode()):
            raise APIError(401, "a valid API key is needed: Authorization: Bearer KEY", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def loaded():
        if state.engine is None or state.scheduler is None:
            raise APIError(503, "the model is still loading", type="unavailable_error", code="loading",
                           headers={"Retry-After": RETRY_AFTER})
        return state.engine

    def check_model(name: str | None) -> None:
        if name and name not in (state.model_id, Path(state.opts.model).name):
            raise APIError(404, f"the model {name!r} does not exist; this server serves {state.model_id!r}",
                           param="model", code="model_not_found")

    def params(req, tokens: list[int], max_tokens: int | None, n_ctx: int) -> GenParams:
        room = n_ctx - len(tokens)
        if room < 1:
            raise APIError(400, f"the prompt is {len(tokens)} tokens, the context only {n_ctx}",
                           param="messages" if isinstance(req, ChatRequest) else "prompt", code="context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"max_tokens {max_tokens} is more than the context has room for: {room} tokens after "
                           f"the {len(tokens)}-token prompt (context {n_ctx})", param="max_tokens",
                           code="context_length_exceeded")
        for name in PENALTIES:  # asked for, and not applied by this backend: say so rather than ignore it
            if getattr(req, name, None) and name not in state.engine.penalties:
                raise APIError(400, f"{name} is not applied by this server's backend ({state.engine.backend})",
                               param=name)
        d = state.sampling
        pick = lambda given, default: default if given is None else given  # noqa: E731
        return GenParams(tokens=tokens, max_tokens=max_tokens or room, temperature=pick(req.temperature, d.temperature),
                         top_p=pick(req.top_p, d.top_p), top_k=pick(req.top_k, d.top_k), min_p=pick(req.min_p, d.min_p),
                         seed=(req.seed if req.seed is not None else random.randrange(2**31)) % 2**32,
                         stop=req.stops(), presence_penalty=pick(req.presence_penalty, d.presence_penalty),
                         frequency_penalty=req.frequency_penalty or 0.0, grammar=grammar(req.grammar))

    def grammar(text: str | None):
        if text is None:
            return None
        try:
            return state.engine.grammar(text)
        except ValueError as e:
            raise APIError(400, f"grammar: {e}", param="grammar") from None

    def submit(p: GenParams) -> Job:
        job = Job(p, asyncio.get_running_loop())
        try:
            state.scheduler.submit(job)
        except QueueFull as e:
            raise APIError(503, f"the server is busy: {e}; retry later", type="unavailable_error", code="queue_full",
                           headers={"Retry-After": RETRY_AFTER}) from None
        return job

    def tool_form(req: ChatRequest) -> Form | None:
        """The form the model writes its calls in, when the request lets it call tools."""
        if not req.calling():
            return None
        template = state.engine.model.template
        form = form_of(template.source)
        if "tools" not in state.template_vars or form is None:
            raise APIError(400, "this model's chat template " + ("takes no tools" if "tools" not in state.template_vars
                           else "writes neither of Qwen's tool-call forms (<tool_call> JSON or <function=...> XML)"),
                           param="tools")
        return form

    def render(req: ChatRequest) -> str:
        kwargs = req.chat_template_kwargs or {}
        reserved = [k for k in kwargs if k in RESERVED]
        if reserved:
            raise APIError(400, f"chat_template_kwargs cannot set {', '.join(reserved)}", param="chat_template_kwargs")
        # Switches the template does not read are ignored, as llama-server and vLLM ignore them.
        switches = {k: v for k, v in kwargs.items() if k in state.template_vars}
        if req.calling():  # tool_choice "none": the model is not shown the tools
            switches["tools"] = [t.model_dump(exclude_none=True) for t in req.tools]
        template = state.engine.model.template
        try:
            with state.render_lock:
                template.set_switches(switches)
                try:
                    return template.render(template_messages(req))
                finally:
                    template.set_switches({})
        except QwqqError as e:  # the template refused these messages (raise_exception), or failed on them
            text = str(e)
            text = text[len(e.path) + 2:] if e.path and text.startswith(e.path + ": ") else text  # no server paths
            raise APIError(400, text, param="messages") from None

    async def body(request: Request, kind):
        authorize(request)
        engine = loaded()
        req = parse(await _read_body(request, state.opts.max_body), kind)
        check_model(req.model)
        return engine, req

    # ------------------------------------------------------------ routes
    @app.get("/health")
    async def health():
        if state.load_error:
            return JSONResponse({"status": "error", **error_body(500, state.load_error, "server_error")}, status_code=500)
        if state.engine is None:
            return JSONResponse({"status": "loading", **error_body(503, "the model is still loading", "unavailable_error")},
                                status_code=503, headers={"Retry-After": RETRY_AFTER})
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics(request: Request):
        authorize(request)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    def model_card() -> dict:
        card = {"id": state.model_id, "object": "model", "created": int(Path(state.opts.model).stat().st_mtime),
                "owned_by": "qwqq"}
        if state.engine is not None:
            card["meta"] = {"n_ctx": state.engine.n_ctx}
        return card

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        authorize(request)
        check_model(name)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        engine, req = await body(request, ChatRequest)
        form, tools = tool_form(req), schemas([t.model_dump() for t in req.tools or []])
        prompt = await run_in_threadpool(render, req)
        in_think, prefix = prompt_opens_think(prompt), ""
        if form and req.forced() is not None:
            # A call is required: the answer is made to start with one (thinking, if the prompt opened it, closed
            # empty); the model writes the rest. Its arguments are not constrained.
            prefix = ("</think>\n\n" if in_think else "") + form.opening(req.forced())
        tokens = await run_in_threadpool(engine.tokens, prompt + prefix)
        job = submit(params(req, tokens, req.max_completion_tokens or req.max_tokens, engine.n_ctx))
        fmt = req.reasoning_format or state.opts.reasoning_format
        reply = Reply("chat", state.model_id)
        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)
            answer = AnswerStream(fmt, in_think, form, tools, prefix)
            return EventSourceResponse(_chat_stream(job, request, reply, answer, include))
        pieces, finish, counts = await _collect(job, request)
        if finish is None:
            return Response(status_code=499)
        message = whole(pieces, fmt, in_think, form, tools, prefix)
        return reply.whole(message, "tool_calls" if message.get("tool_calls") and finish == "stop" else finish,
                           usage(*counts))

    @app.post("/v1/completions")
    async def completions(request: Request):
        engine, req = await body(request, CompletionRequest)
        prompt = req.prompt[0] if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], str) else req.prompt
        if isinstance(prompt, list):
            tokens = list(prompt)
            if not tokens or min(tokens) < 0 or max(tokens) >= engine.n_vocab:
                raise APIError(400, "prompt: token ids must be in the model's vocabulary", param="prompt")
        else:
            tokens = await run_in_threadpool(engine.tokens, prompt)
        if not tokens:
            raise APIError(400, "prompt: empty", param="prompt")
        job = submit(params(req, tokens, req.max_tokens, engine.n_ctx))
        reply = Reply("text", state.model_id)
        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)
            return EventSourceResponse(_text_stream(job, request, reply, include))
        pieces, finish, counts = await _collect(job, request)
        if finish is None:
            return Response(status_code=499)
        return reply.whole("".join(pieces), finish, usage(*counts))

    # ------------------------------------------------------------ driving a job
    async def _collect(job: Job, request: Request) -> tuple[list[str], str | None, tuple[int, int]]:
        pieces: list[str] = []
        try:
            async for event in _events(job, request):
                if event[0] == "text":
                    pieces.append(event[1])
                elif event[0] == "done":
                    return pieces, event[1], (event[2], event[3])
                else:
                    raise APIError(500, event[1], type="server_error")
        except _Disconnected:
            return pieces, None, (0, 0)
        finally:
            state.scheduler.cancel(job)
        raise APIError(500, "the generation ended without an answer", type="server_error")

    async def _chat_stream(job: Job, request: Request, reply: Reply, answer: AnswerStream, include_usage: bool):
        try:
            yield _sse(reply.chunk({"role": "assistant", "content": ""}))
            async for event in _events(job, request):
                if event[0] == "text":
                    for delta in answer.feed(event[1]):
                        yield _sse(reply.chunk(delta))
                elif event[0] == "done":
                    for delta in answer.flush():
                        yield _sse(reply.chunk(delta))
                    yield _sse(reply.chunk({}, answer.finish_reason(event[1])))
                    if include_usage:
                        yield _sse(reply.usage_chunk(usage(event[2], event[3])))
                    yield _sse("[DONE]")
                else:
                    yield _sse(error_body(500, event[1], "server_error"))
        except _Disconnected:
            pass
        finally:
            state.scheduler.cancel(job)

    async def _text_stream(job: Job, request: Request, reply: Reply, include_usage: bool):
        try:
            async for event in _events(job, request):
                if event[0] == "text":
                    yield _sse(reply.chunk(event[1]))
                elif event[0] == "done":
                    yield _sse(reply.chunk("", event[1]))
                    if include_usage:
                        yield _sse(reply.usage_chunk(usage(event[2], event[3])))
                    yield _sse("[DONE]")
                else:
                    yield _sse(error_body(500, event[1], "server_error"))
        except _Disconnected:
            pass
        finally:
            state.scheduler.cancel(job)

    return app

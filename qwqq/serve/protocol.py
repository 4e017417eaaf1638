"""The OpenAI wire format: request bodies (pydantic, unknown fields ignored as OpenAI's own server
tolerates them), errors as OpenAI's error JSON, and the shapes of responses and stream chunks."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from qwqq.serve.tools import template_arguments


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_body(status: int, message: str, type: str = "invalid_request_error", code: str | None = None) -> dict:
    return APIError(status, message, type=type, code=code).body()


# ---------------------------------------------------------------- requests
class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Body):
    include_usage: bool = False


class ContentPart(_Body):
    type: str
    text: str | None = None


class FunctionCall(_Body):
    name: str
    arguments: str | dict[str, Any] = "{}"  # OpenAI sends a JSON string


class ToolCall(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    reasoning_content: str | None = None  # a previous turn's thinking (templates that keep it read this)
    tool_calls: list[ToolCall] | None = None  # an earlier assistant turn's calls
    tool_call_id: str | None = None  # a role "tool" message: the call it answers


class FunctionDef(_Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Body):
    name: str


class ToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


# llama.cpp parses a GBNF grammar by recursion, one level per nested group: a deep one overflows its stack and
# takes the whole server down, so a request's grammar is bounded before llama.cpp sees it.
GRAMMAR_MAX_BYTES = 64 << 10
GRAMMAR_MAX_DEPTH = 64


def grammar_depth(text: str) -> int:
    """The deepest nesting of ( ) groups in a GBNF grammar, quoted strings and [ ] character classes skipped."""
    depth = deepest = i = 0
    while i < len(text):
        c = text[i]
        if c in "\"[":  # a literal or a class: up to its unescaped close
            close = '"' if c == '"' else "]"
            i += 1
            while i < len(text) and text[i] != close:
                i += 2 if text[i] == "\\" else 1
        elif c == "#":  # a comment: to the end of the line
            while i < len(text) and text[i] != "\n":
                i += 1
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth -= 1
        i += 1
    return deepest


class Sampled(_Body):
    """The fields chat and completions share."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=2**31 - 1)  # llama.cpp's and vLLM's extension (an int32)
    min_p: float | None = Field(None, ge=0, le=1)  # likewise
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    grammar: str | None = Field(None, max_length=GRAMMAR_MAX_BYTES)  # llama-server's extension: a GBNF grammar
    stop: str | list[str] | None = None
    n: int = 1
    logprobs: Any = None

    @field_validator("grammar")
    @classmethod
    def _bounded_grammar(cls, text: str | None) -> str | None:
        if text is not None and grammar_depth(text) > GRAMMAR_MAX_DEPTH:
            raise ValueError(f"groups nested more than {GRAMMAR_MAX_DEPTH} deep")
        return text

    def stops(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 16:
            raise APIError(400, "at most 16 stop sequences", param="stop")
        return [s for s in stop if s]


class ChatRequest(Sampled):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_format: Literal["deepseek", "reasoning", "none"] | None = None  # llama-server's per-request override
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoice | None = None
    parallel_tool_calls: bool | None = None  # accepted; Qwen's templates do not read it

    def calling(self) -> bool:
        """Tools offered and the model allowed to call them: the template gets them, the answer is parsed."""
        return bool(self.tools) and self.tool_choice != "none"

    def forced(self) -> str | None:
        """The function a call is required of ("" any, tool_choice "required"), None: the model chooses."""
        if not self.calling():
            return None
        if isinstance(self.tool_choice, ToolChoice):
            return self.tool_choice.function.name
        return "" if self.tool_choice == "required" else None


class CompletionRequest(Sampled):
    prompt: str | list[str] | list[int]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


def parse(raw: bytes, kind: type[BaseModel]) -> Any:
    """A request body to its model, or a 400 that names what is wrong."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        req = kind.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise APIError(400, f"{where}: {first['msg']}" if where else first["msg"], param=where or None) from None
    _refuse_unsupported(req)
    return req


def _refuse_unsupported(req: Sampled) -> None:
    if req.n != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    if req.logprobs not in (None, False, 0):
        raise APIError(400, "logprobs are not supported", param="logprobs")
    if isinstance(req, ChatRequest):
        if req.tool_choice not in (None, "none") and not req.tools:
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        names = [t.function.name for t in req.tools or []]
        if len(set(names)) != len(names):
            raise APIError(400, "tools: two functions have the same name", param="tools")
        if isinstance(req.tool_choice, ToolChoice) and req.tool_choice.function.name not in names:
            raise APIError(400, f"tool_choice names {req.tool_choice.function.name!r}, which is not among the tools",
                           param="tool_choice")
    if isinstance(req, CompletionRequest):
        if req.echo or req.suffix:
            raise APIError(400, "echo and suffix are not supported", param="echo" if req.echo else "suffix")
        if req.best_of not in (None, 1):
            raise APIError(400, "only best_of=1 is supported", param="best_of")
        if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], str) and len(req.prompt) != 1:
            raise APIError(400, "one prompt per request", param="prompt")


def template_messages(req: ChatRequest) -> list[dict]:
    """Messages as the chat template reads them: content as text (text parts joined)."""
    out = []
    for i, m in enumerate(req.messages):
        d = m.model_dump(exclude_none=True)
        if isinstance(m.content, list):
            other = [p.type for p in m.content if p.type != "text"]
            if other:
                raise APIError(400, f"messages.{i}.content: only text parts are supported, not {other[0]}",
                               param=f"messages.{i}.content")
            d["content"] = "".join(p.text or "" for p in m.content)
        d.setdefault("content", "")
        for call in d.get("tool_calls") or []:  # Qwen's templates read the arguments as a mapping
            call["function"]["arguments"] = template_arguments(call["function"]["arguments"])
        out.append(d)
    return out


# ---------------------------------------------------------------- responses
class Reply:
    """The envelope every response and chunk of one request shares."""

    def __init__(self, kind: str, model: str):
        self.kind, self.model = kind, model  # kind: "chat" or "text"
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _env(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, delta_or_text: dict | str, finish_reason: str | None = None) -> dict:
        if self.kind == "chat":
            choice = {"index": 0, "delta": delta_or_text, "logprobs": None, "finish_reason": finish_reason}
            return {**self._env("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": delta_or_text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._env("text_completion"), "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._env("chat.completion.chunk" if self.kind == "chat" else "text_completion"), "choices": [],
                "usage": usage}

    def whole(self, message_or_text: dict | str, finish_reason: str, usage: dict) -> dict:
        if self.kind == "chat":
            choice = {"index": 0, "message": message_or_text, "logprobs": None, "finish_reason": finish_reason}
            return {**self._env("chat.completion"), "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": message_or_text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._env("text_completion"), "choices": [choice], "usage": usage}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}

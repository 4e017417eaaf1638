"""Qwen's tool calls: which form a model writes, and its calls parsed out of the answer into OpenAI
`tool_calls`, whole or piece by piece as they stream.

Two forms, told apart by what the model's own chat template writes (as llama.cpp picks its parser from
the template's text rather than from the model's name):

    json  <tool_call>\\n{"name": NAME, "arguments": {...}}\\n</tool_call>            (vLLM's `hermes` parser)
    xml   <tool_call>\\n<function=NAME>\\n<parameter=P>\\nVALUE\\n</parameter>\\n</function>\\n</tool_call>
          (vLLM's `qwen3_coder`; VALUE is raw text, typed by the tool's JSON schema)

The text around calls is the content (whitespace next to a call dropped). A call that does not parse is
left in the content exactly as the model wrote it: never an error. Streaming holds back only what may
still be the start of `<tool_call>` (and the whitespace before it), and a call until its closing tag, so
a streamed answer is the non-streamed one cut into pieces, whatever the pieces.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Callable

from qwqq.run.chat import partial_suffix

OPEN, CLOSE = "<tool_call>", "</tool_call>"

Call = tuple[str, dict]  # (function name, arguments)


# ---------------------------------------------------------------- the json form
def _json_call(body: str, tools: dict[str, dict]) -> Call | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # arguments written as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return (obj["name"], args) if isinstance(args, dict) else None


# ---------------------------------------------------------------- the xml form
_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>(.*)</function>\s*", re.S)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.S)


def _xml_call(body: str, tools: dict[str, dict]) -> Call | None:
    m = _FUNCTION.fullmatch(body)
    if not m:
        return None
    name, inner = m.group(1).strip(), m.group(2)
    if _PARAMETER.sub("", inner).strip():  # text outside <parameter> blocks: not a call we understand
        return None
    props = (tools.get(name) or {}).get("properties") or {}
    args = {}
    for p, raw in _PARAMETER.findall(inner):
        value = raw[1:] if raw.startswith("\n") else raw
        value = value[:-1] if value.endswith("\n") else value
        args[p.strip()] = typed(value, props.get(p.strip()))
    return name, args


def _types(schema) -> list[str]:
    if not isinstance(schema, dict):
        return []
    t = schema.get("type")
    out = [t] if isinstance(t, str) else [x for x in t if isinstance(x, str)] if isinstance(t, list) else []
    for key in ("anyOf", "oneOf"):
        for option in schema.get(key) or []:
            out += _types(option)
    if not out and "enum" in schema:
        out = ["string"]
    return out


def _as(kind: str, value: str):
    """`value` read as a JSON value of `kind`, or ValueError."""
    text = value.strip()
    if kind == "null":
        if text.lower() in ("null", "none"):
            return None
        raise ValueError(kind)
    if kind == "boolean":
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        raise ValueError(kind)
    got = json.loads(text)
    want = {"integer": (int,), "number": (int, float), "object": (dict,), "array": (list,)}.get(kind)
    if want is None or not isinstance(got, want) or isinstance(got, bool):
        raise ValueError(kind)
    return got


def typed(value: str, schema) -> object:
    """A parameter's raw text as its schema types it: the non-string types tried first (in the schema's
    order), then the text itself (a string, or a value no type accepts)."""
    for kind in _types(schema):
        if kind != "string":
            try:
                return _as(kind, value)
            except ValueError:
                continue
    return value


# ---------------------------------------------------------------- the forms, as data
@dataclass(frozen=True)
class Form:
    name: str
    markers: tuple[str, ...]  # all of them in the chat template's source: the model writes this form
    call: Callable[[str, dict], Call | None]  # the text between the tags -> (name, arguments), None: malformed
    named: Callable[[str], str]  # the opening of a call to one function (tool_choice naming it)

    def opening(self, function: str | None) -> str:
        """What the answer is made to start with for tool_choice "required" (any call) or a named function."""
        return self.named(function) if function else OPEN + "\n"


FORMS = (  # first match wins: the xml form's templates mention <tool_call> too
    Form("xml", (OPEN, "<function=", "<parameter="), _xml_call, lambda f: f"{OPEN}\n<function={f}>\n"),
    Form("json", (OPEN,), _json_call, lambda f: f'{OPEN}\n{{"name": {json.dumps(f)}, "arguments": '),
)


def form_of(template_source: str) -> Form | None:
    """The tool-call form a chat template teaches its model, or None (no Qwen tool calls in it)."""
    return next((f for f in FORMS if all(m in template_source for m in f.markers)), None)


def schemas(tools: list[dict]) -> dict[str, dict]:
    """Function name -> its parameters' JSON schema, from OpenAI `tools`."""
    out = {}
    for t in tools:
        fn = t.get("function") or {}
        if isinstance(fn.get("name"), str):
            out[fn["name"]] = fn.get("parameters") or {}
    return out


# ---------------------------------------------------------------- parsing
class ToolStream:
    """Feed answer text, get ("content", text) and ("call", index, id, name, arguments_json) events."""

    def __init__(self, form: Form, tools: dict[str, dict]):
        self.form, self.tools = form, tools
        self.buf = ""  # text not yet decided
        self.in_call = False
        self.ws = ""  # whitespace before the call being read (given back if it does not parse)
        self.after_call = False  # at the start of the text after a call: drop its leading whitespace
        self.calls = 0

    def feed(self, text: str) -> list[tuple]:
        self.buf += text
        out: list[tuple] = []
        while self.buf:
            if self.in_call:
                at = self.buf.find(CLOSE)
                if at < 0:
                    break
                body, self.buf = self.buf[:at], self.buf[at + len(CLOSE):]
                self._end_call(body, OPEN + body + CLOSE, out)
                continue
            if self.after_call:
                self.buf = self.buf.lstrip()
                if not self.buf:
                    break
                self.after_call = False
            at = self.buf.find(OPEN)
            if at >= 0:
                before = self.buf[:at]
                text, self.ws = before.rstrip(), before[len(before.rstrip()):]
                self._content(text, out)
                self.buf, self.in_call = self.buf[at + len(OPEN):], True
                continue
            # Held back: what may still become <tool_call>, and the whitespace before it.
            shown = self.buf[: len(self.buf) - partial_suffix(self.buf, OPEN)].rstrip()
            self._content(shown, out)
            self.buf = self.buf[len(shown):]
            break
        return out

    def flush(self) -> list[tuple]:
        """The end of the answer: an unclosed call is taken if its text is a whole call, else left as content."""
        out: list[tuple] = []
        text, self.buf = self.buf, ""
        if self.in_call:
            self._end_call(text, OPEN + text, out)
        elif not (self.after_call and not text.strip()):
            self._content(text, out)
        return out

    def _content(self, text: str, out: list) -> None:
        if text:
            if out and out[-1][0] == "content":
                out[-1] = ("content", out[-1][1] + text)
            else:
                out.append(("content", text))

    def _end_call(self, body: str, raw: str, out: list) -> None:
        self.in_call = False
        call = self.form.call(body, self.tools)
        if call is None:
            self._content(self.ws + raw, out)
        else:
            name, args = call
            out.append(("call", self.calls, f"call_{uuid.uuid4().hex[:24]}", name, json.dumps(args, ensure_ascii=False)))
            self.calls += 1
            self.after_call = True
        self.ws = ""


def parse(text: str, form: Form, tools: dict[str, dict]) -> tuple[str, list[dict]]:
    """A whole answer -> (content, OpenAI tool_calls)."""
    stream = ToolStream(form, tools)
    content, calls = "", []
    for event in [*stream.feed(text), *stream.flush()]:
        if event[0] == "content":
            content += event[1]
        else:
            calls.append(tool_call(*event[1:]))
    return content, calls


def tool_call(index: int, id: str, name: str, arguments: str) -> dict:
    return {"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}


def template_arguments(arguments) -> object:
    """A previous call's arguments as chat templates read them: a mapping (Qwen's templates iterate it or
    dump it as JSON); OpenAI clients send a JSON string."""
    if isinstance(arguments, str):
        try:
            value = json.loads(arguments)
        except ValueError:
            return arguments
        return value if isinstance(value, dict) else arguments
    return arguments

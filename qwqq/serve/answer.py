"""The model's output as a chat answer: thinking split out (run's ThinkSplitter) under the reasoning field,
tool calls parsed out of the rest (tools.py), whole (one message) or as stream deltas."""

from __future__ import annotations

from qwqq.run.chat import ThinkSplitter, consume, split_stream
from qwqq.serve.options import REASONING_FIELD
from qwqq.serve.tools import Form, ToolStream, parse


class AnswerStream:
    """Text pieces to chat deltas: thinking under the reasoning field, the answer as content, and, when
    the request offers tools, each call as two tool_calls deltas (id, type and name; then its arguments)
    once its closing tag is seen. `prefix`: text the prompt already made the answer start with."""

    def __init__(self, fmt: str, in_think: bool, form: Form | None = None, tools: dict | None = None,
                 prefix: str = ""):
        self.field = REASONING_FIELD.get(fmt)
        self.think = ThinkSplitter(in_think) if self.field else None
        self.tools = ToolStream(form, tools or {}) if form else None
        self.calls = 0
        self.prefix = prefix

    def _answer(self, events: list[tuple], out: list[dict]) -> None:
        for event in events:
            if event[0] == "content":
                self._add(out, "content", event[1])
                continue
            _, index, id, name, arguments = event
            out.append({"tool_calls": [{"index": index, "id": id, "type": "function",
                                        "function": {"name": name, "arguments": ""}}]})
            out.append({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]})
            self.calls += 1

    @staticmethod
    def _add(out: list[dict], key: str, text: str) -> None:
        if out and key in out[-1]:
            out[-1][key] += text
        else:
            out.append({key: text})

    def _deltas(self, parts: list[tuple[str, str]], final: bool) -> list[dict]:
        out: list[dict] = []
        for kind, text in parts:
            if kind == "think":
                self._add(out, self.field, text)
            elif self.tools:
                self._answer(self.tools.feed(text), out)
            else:
                self._add(out, "content", text)
        if final and self.tools:
            self._answer(self.tools.flush(), out)
        return out

    def feed(self, text: str) -> list[dict]:
        text, self.prefix = self.prefix + text, ""
        return self._deltas(self.think.feed(text) if self.think else [("answer", text)], False)

    def flush(self) -> list[dict]:
        parts = self.feed("") if self.prefix else []
        return parts + self._deltas(self.think.flush() if self.think else [], True)

    def finish_reason(self, finish: str) -> str:
        return "tool_calls" if self.calls and finish == "stop" else finish


def whole(pieces: list[str], fmt: str, in_think: bool, form: Form | None = None, tools: dict | None = None,
          prefix: str = "") -> dict:
    """The whole output as one assistant message (content None when it is tool calls only)."""
    pieces = [prefix, *pieces] if prefix else pieces
    message: dict = {"role": "assistant", "content": "".join(pieces)}
    if fmt in REASONING_FIELD:
        turn = consume(split_stream(pieces, in_think))
        message["content"] = turn.answer
        if turn.thinking:
            message[REASONING_FIELD[fmt]] = turn.thinking
    if form:
        content, calls = parse(message["content"], form, tools or {})
        if calls:
            message["content"], message["tool_calls"] = content or None, calls
    return message

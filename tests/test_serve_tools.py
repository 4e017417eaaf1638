"""Tool calls in `qwqq serve`: Qwen's two forms parsed into OpenAI tool_calls (pure, fast: every split of a
stream), then the real server on SmolLM2-135M driven by the official `openai` client, one server per
form: Qwen2.5's own chat template (the JSON form) and a Qwen3.5-shaped one (thinking, the XML form). A
135M model never calls a tool by itself, so the tests make it: the request's GBNF `grammar` (llama-server's
field) admits only the scripted text, and llama.cpp samples those tokens for real."""

from __future__ import annotations

import json

import pytest

from qwqq.serve.answer import AnswerStream, whole
from qwqq.serve.tools import form_of, parse, schemas

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
        "hours": {"type": "array", "items": {"type": "integer"}}, "where": {"type": "object"},
        "temp": {"anyOf": [{"type": "number"}, {"type": "null"}]}, "unit": {"enum": ["C", "F"]}},
        "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
TOOLS = schemas([WEATHER, TIME])
JSON_FORM = form_of('... <tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
XML_FORM = form_of("<tool_call>\n<function=example>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>")

JSON_CALLS = ('Let me look that up.\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", "days": 3}}'
              '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
XML_CALL = ("I will check.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nSan Francisco, CA\n</parameter>\n"
            "<parameter=days>\n3\n</parameter>\n<parameter=metric>\nTrue\n</parameter>\n<parameter=hours>\n[9, 12]\n"
            "</parameter>\n<parameter=where>\n{\"lat\": 37.7}\n</parameter>\n<parameter=temp>\nnull\n</parameter>\n"
            "<parameter=unit>\nC\n</parameter>\n<parameter=note>\nline 1\nline 2 <b>\n</parameter>\n</function>\n"
            "</tool_call>")


def calls_of(calls: list[dict]) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


# ---------------------------------------------------------------- the parsers, no server
def test_the_form_follows_the_chat_template():
    assert JSON_FORM.name == "json" and XML_FORM.name == "xml"
    assert form_of("{% for m in messages %}<|im_start|>{{ m.content }}{% endfor %}") is None  # no tool calls taught


def test_json_form_calls_and_content():
    content, calls = parse(JSON_CALLS, JSON_FORM, TOOLS)
    assert content == "Let me look that up."
    assert calls_of(calls) == [("get_weather", {"city": "Zürich", "days": 3}), ("get_time", {})]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls) and calls[0]["id"] != calls[1]["id"]
    assert '"Zürich"' in calls[0]["function"]["arguments"]  # not \u-escaped
    # arguments written as a JSON string; a call the model did not close before it stopped
    content, calls = parse('<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}', JSON_FORM,
                           TOOLS)
    assert content == "" and calls_of(calls) == [("get_weather", {"city": "Oslo"})]
    assert parse("No tools needed: 2 < 3.", JSON_FORM, TOOLS) == ("No tools needed: 2 < 3.", [])


def test_xml_form_values_typed_by_the_tools_schema():
    content, calls = parse(XML_CALL, XML_FORM, TOOLS)
    assert content == "I will check."
    assert calls_of(calls) == [("get_weather", {
        "city": "San Francisco, CA", "days": 3, "metric": True, "hours": [9, 12], "where": {"lat": 37.7},
        "temp": None, "unit": "C", "note": "line 1\nline 2 <b>"})]  # a parameter the schema lacks stays text
    # a value its type does not accept stays text; a string that looks like a number stays a string
    odd = "<tool_call>\n<function=get_weather>\n<parameter=city>\n42\n</parameter>\n<parameter=days>\nthree\n</parameter>\n" \
          "</function>\n</tool_call>"
    assert calls_of(parse(odd, XML_FORM, TOOLS)[1]) == [("get_weather", {"city": "42", "days": "three"})]
    # a function no tool describes: every value is text
    other = "<tool_call>\n<function=f>\n<parameter=n>\n1\n</parameter>\n</function>\n</tool_call>"
    assert calls_of(parse(other, XML_FORM, TOOLS)[1]) == [("f", {"n": "1"})]


MALFORMED = [
    (JSON_FORM, 'Hmm <tool_call>\n{"name": "get_weather", "arguments": {"city": </tool_call> then'),  # bad JSON
    (JSON_FORM, '<tool_call>\n{"arguments": {}}\n</tool_call>'),  # no name
    (JSON_FORM, '<tool_call>\n["get_weather"]\n</tool_call>'),  # not an object
    (JSON_FORM, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'),  # cut off by max_tokens
    (XML_FORM, "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</tool_call>"),  # no </function>
    (XML_FORM, "<tool_call>\n<function=get_weather>\nParis\n</function>\n</tool_call>"),  # text outside parameters
    (XML_FORM, "<tool_call>\n<function=get_weather>\n<parameter=city>\nPar"),  # cut off
]


@pytest.mark.parametrize("form, text", MALFORMED)
def test_a_malformed_call_is_left_as_content(form, text):
    assert parse(text, form, TOOLS) == (text, [])
    assert parse("ok " + text, form, TOOLS) == ("ok " + text, [])


def _streamed(pieces: list[str], form, in_think: bool) -> dict:
    """The deltas of a stream fed `pieces`, joined back into one message."""
    stream = AnswerStream("deepseek", in_think, form, TOOLS)
    deltas = [d for p in pieces for d in stream.feed(p)] + stream.flush()
    msg: dict = {"content": "", "reasoning_content": "", "calls": []}
    for d in deltas:
        assert len(d) == 1 and all(v is not None for v in d.values())
        for key in ("content", "reasoning_content"):
            msg[key] += d.get(key, "")
        for c in d.get("tool_calls", []):
            if "id" in c:  # the first delta of a call: id and name, then its arguments
                assert c["index"] == len(msg["calls"]) and c["function"] == {"name": c["function"]["name"], "arguments": ""}
                msg["calls"].append([c["function"]["name"], ""])
            else:
                msg["calls"][c["index"]][1] += c["function"]["arguments"]
    msg["reasoning_content"] = msg["reasoning_content"].strip()  # as a whole message's is (run's splitter)
    msg["finish"] = stream.finish_reason("stop")
    return msg


STREAMS = [  # (form, answer as the model writes it, prompt opens <think>)
    (JSON_FORM, JSON_CALLS, False),
    (XML_FORM, "The user wants the weather.\n</think>\n\n" + XML_CALL, True),
    (JSON_FORM, "<think>\nplan</think>\n" + MALFORMED[0][1] + "\n\n" + JSON_CALLS + "\nDone <tool", False),
    (XML_FORM, "plain text, a < sign and <tool_ but no call", False),
]


@pytest.mark.parametrize("form, text, in_think", STREAMS)
def test_a_stream_split_anywhere_gives_the_whole_answer(form, text, in_think):
    ref = whole([text], "deepseek", in_think, form, TOOLS)
    expect = {"content": ref["content"] or "", "reasoning_content": ref.get("reasoning_content", ""),
              "calls": [[c["function"]["name"], c["function"]["arguments"]] for c in ref.get("tool_calls", [])],
              "finish": "tool_calls" if ref.get("tool_calls") else "stop"}
    # Text once sent is never taken back, so the joined content equal to the whole answer's means no part of
    # a call's tag ever reached it (the whole answer's content has none).
    assert _streamed(list(text), form, in_think) == expect  # one character at a time
    for i in range(len(text) + 1):
        assert _streamed([text[:i], text[i:]], form, in_think) == expect, i
    for i in range(0, len(text), 7):
        assert _streamed([text[:i], text[i:i + 11], text[i + 11:]], form, in_think) == expect, i

"""Tool calls in `qwqq serve`: Qwen's two forms parsed into OpenAI tool_calls (pure, fast: every split of a
stream), then the real server on SmolLM2-135M driven by the official `openai` client, one server per
form: Qwen2.5's own chat template (the JSON form) and a Qwen3.5-shaped one (thinking, the XML form). A
135M model never calls a tool by itself, so the tests make it: the request's GBNF `grammar` (llama-server's
field) admits only the scripted text, and llama.cpp samples those tokens for real."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


# ---------------------------------------------------------------- the real server
# Qwen3.5's shape (condensed): the tools and the XML call format in the system turn, earlier calls written
# back in that format, tool results as <tool_response> in a user turn, and a <think> the template opens.
XML_TEMPLATE = """{%- if tools %}<|im_start|>system
# Tools

You have access to the following functions:

<tools>{% for tool in tools %}
{{ tool | tojson }}{% endfor %}
</tools>

If you choose to call a function ONLY reply in the following format with NO suffix:

<tool_call>
<function=example_function_name>
<parameter=example_parameter_1>
value_1
</parameter>
</function>
</tool_call><|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == "assistant" %}<|im_start|>assistant
{{ m.content or "" }}
{%- for tc in m.tool_calls or [] %}
{%- set tc = tc.function %}

<tool_call>
<function={{ tc.name }}>
{% for k, v in tc.arguments|items %}<parameter={{ k }}>
{{ v | tojson if v is mapping or (v is sequence and v is not string) else v | string }}
</parameter>
{% endfor %}</function>
</tool_call>
{%- endfor %}<|im_end|>
{% elif m.role == "tool" %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% else %}<think>
{% endif %}{% endif %}"""
USER = [{"role": "user", "content": "Weather in Paris?"}]


def forced(text: str) -> dict:
    """A GBNF grammar that admits only `text`: llama.cpp samples exactly its tokens, then end-of-generation."""
    return {"grammar": "root ::= " + json.dumps(text)}


def _copy_with_template(smollm2_gguf, d: Path, name: str, template: str) -> Path:
    model = d / f"{name}.gguf"
    (d / "template.jinja").write_text(template)
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(smollm2_gguf), str(model),
                    "--chat-template-file", str(d / "template.jinja"), "--force"], check=True, capture_output=True)
    return model


def _server(smollm2_gguf, tmp_path_factory, name: str, template: str):
    from tests.test_serve import needs_server_packages, start_server

    needs_server_packages()

    d = tmp_path_factory.mktemp(name)
    model = _copy_with_template(smollm2_gguf, d, name, template)
    server = start_server(model, d / "server.log")
    server.model, server.template = model, template
    return server


@pytest.fixture(scope="module")
def json_server(smollm2_gguf, tmp_path_factory):
    """SmolLM2 under Qwen2.5's own chat template (the JSON form), as the Qwen2.5-Coder GGUF carries it."""
    from tests import fixtures

    template = json.loads((fixtures.qwen_tokenizer_dir() / "tokenizer_config.json").read_text())["chat_template"]
    s = _server(smollm2_gguf, tmp_path_factory, "smol-qwen25", template)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def xml_server(smollm2_gguf, tmp_path_factory):
    s = _server(smollm2_gguf, tmp_path_factory, "smol-qwen35", XML_TEMPLATE)
    yield s
    s.stop()


def _stream(client, **kw) -> tuple[dict, list]:
    """A streamed chat answer joined back (content, reasoning, calls by index, finish) and its chunks."""
    chunks = list(client.chat.completions.create(stream=True, **kw))
    out = {"content": "", "reasoning": "", "calls": [], "finish": None}
    for ch in chunks:
        d = ch.choices[0].delta
        out["content"] += d.content or ""
        out["reasoning"] += getattr(d, "reasoning_content", None) or ""
        for c in d.tool_calls or []:
            if c.id:
                assert c.index == len(out["calls"]) and c.type == "function" and c.function.name
                assert not c.function.arguments  # the name comes first, then the arguments
                out["calls"].append([c.function.name, ""])
            else:
                assert c.function.name is None
                out["calls"][c.index][1] += c.function.arguments
        out["finish"] = ch.choices[0].finish_reason or out["finish"]
    out["calls"] = [(n, json.loads(a)) for n, a in out["calls"]]
    out["reasoning"] = out["reasoning"].strip()  # streamed thinking keeps its last newline (run's splitter)
    return out, chunks


def _prompt_tokens(server, messages: list[dict], tools: list[dict] | None) -> tuple[int, str]:
    """What the template renders for these messages, counted by the model's tokenizer (here, not in the server)."""
    import llama_cpp

    from qwqq.run.template import ChatTemplate
    from qwqq.serve.tools import template_arguments

    for m in messages:
        for c in m.get("tool_calls") or []:
            c["function"]["arguments"] = template_arguments(c["function"]["arguments"])
    t = ChatTemplate(server.template, "", "<|im_end|>", Path("t"))
    t.set_switches({"tools": tools} if tools else {})
    text = t.render([{**m, "content": m.get("content") or ""} for m in messages])
    llm = llama_cpp.Llama(str(server.model), vocab_only=True, verbose=False)
    return len(llm.tokenize(text.encode(), add_bos=False, special=True)), text


@pytest.mark.slow
def test_json_form_calls_streamed_and_not_and_a_round_trip(json_server):
    c = json_server.client()
    model = "smol-qwen25"
    said = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    kw = dict(model=model, messages=USER, tools=[WEATHER, TIME], temperature=0, max_tokens=80, extra_body=forced(said))
    r = c.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content == "Checking."
    assert [(t.function.name, json.loads(t.function.arguments)) for t in msg.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert msg.tool_calls[0].id.startswith("call_") and msg.tool_calls[0].type == "function"

    streamed, _ = _stream(c, **kw)
    assert streamed == {"content": "Checking.", "reasoning": "", "calls": [("get_weather", {"city": "Paris"})],
                        "finish": "tool_calls"}

    # The call and its result fed back through Qwen2.5's template, then the answer.
    history = [*USER, msg.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "18 C, sunny"}]
    answer = c.chat.completions.create(**{**kw, "messages": history, "extra_body": forced("18 C and sunny.")})
    assert answer.choices[0].message.content == "18 C and sunny." and answer.choices[0].finish_reason == "stop"
    assert not answer.choices[0].message.tool_calls
    n, text = _prompt_tokens(json_server, json.loads(json.dumps(history)), [WEATHER, TIME])
    assert answer.usage.prompt_tokens == n
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in text and "<tool_response>\n18 C, sunny" in text


@pytest.mark.slow
def test_json_form_tool_choice_and_malformed_calls(json_server):
    import openai

    c = json_server.client()
    kw = dict(model="smol-qwen25", messages=USER, tools=[WEATHER, TIME], temperature=0, max_tokens=60)
    # required: the answer is made to open a call; the model (here the grammar) writes the rest
    r = c.chat.completions.create(**kw, tool_choice="required",
                                  extra_body=forced('{"name": "get_time", "arguments": {}}\n</tool_call>'))
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    assert [(t.function.name, t.function.arguments) for t in r.choices[0].message.tool_calls] == [("get_time", "{}")]
    # a named function: its name is written for the model
    streamed, _ = _stream(c, **kw, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                          extra_body=forced('{"city": "Oslo"}}\n</tool_call>'))
    assert streamed["calls"] == [("get_weather", {"city": "Oslo"})] and streamed["finish"] == "tool_calls"
    # none: the tools are not shown and the output is not parsed
    said = '<tool_call>\n{"name": "get_time"}\n</tool_call>'
    r = c.chat.completions.create(**kw, tool_choice="none", extra_body=forced(said))
    assert r.choices[0].message.content == said and not r.choices[0].message.tool_calls
    assert r.usage.prompt_tokens < 60  # no tools in the system turn
    # a call the model botches is content, not an error (streamed: held back until it proved malformed)
    bad = 'Hmm <tool_call>\n{"name": "get_time", "arguments": {</tool_call>'
    got, _ = _stream(c, **kw, extra_body=forced(bad))
    assert got["content"] == bad and got["calls"] == [] and got["finish"] == "stop"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(**kw, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert "not among the tools" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(**kw, extra_body={"grammar": "root ::= ("})
    assert e.value.body["param"] == "grammar"


@pytest.mark.slow
def test_xml_form_with_thinking_streamed_and_not_and_a_round_trip(xml_server):
    c = xml_server.client()
    said = ("Hm.\n</think>\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
            "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>")
    kw = dict(model="smol-qwen35", messages=USER, tools=[WEATHER, TIME], temperature=0, max_tokens=90,
              extra_body=forced(said))
    streamed, chunks = _stream(c, **kw)
    assert streamed == {"content": "", "reasoning": "Hm.", "calls": [("get_weather", {"city": "Paris", "days": 2})],
                        "finish": "tool_calls"}
    r = c.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert msg.reasoning_content == "Hm." and msg.content is None and r.choices[0].finish_reason == "tool_calls"
    assert json.loads(msg.tool_calls[0].function.arguments) == {"city": "Paris", "days": 2}  # typed: days an integer

    history = [*USER, {"role": "assistant", "content": "", "tool_calls": [t.model_dump() for t in msg.tool_calls]},
               {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "rain"}]
    answer = c.chat.completions.create(**{**kw, "messages": history, "extra_body": forced("ok</think>\n\nRain.")})
    assert answer.choices[0].message.content == "Rain." and answer.choices[0].message.reasoning_content == "ok"
    n, text = _prompt_tokens(xml_server, json.loads(json.dumps(history)), [WEATHER, TIME])
    assert answer.usage.prompt_tokens == n
    assert "<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n</parameter>" in text

    # required while the template opens <think>: the thinking is closed empty and a call opened
    r = c.chat.completions.create(**{**kw, "tool_choice": "required",
                                     "extra_body": forced("<function=get_time>\n</function>\n</tool_call>")})
    assert getattr(r.choices[0].message, "reasoning_content", None) is None
    assert [(t.function.name, t.function.arguments) for t in r.choices[0].message.tool_calls] == [("get_time", "{}")]

"""`qwqq serve` as a client sees it: the real server in a subprocess on a free loopback port, serving real
SmolLM2-135M-Instruct (Q4_1), driven with the official `openai` client (raw HTTP only for bodies the client
will not send). Two servers per module: one with an API key, one slot and a queue of one, one on a copy of the model
whose chat template opens <think> itself (as QwQ's and Qwen3.5's do). The pure pieces are tested first."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from qwqq.errors import QwqqError
from qwqq.serve.engine import StopMatcher
from qwqq.serve.metrics import Metrics
from qwqq.serve.options import ServeOptions, api_key

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-qwqq-test-0123456789"
# Qwen3.5's shape: the template opens <think> itself unless enable_thinking is false (then an empty block).
THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}{% endif %}"
)
HELLO = [{"role": "user", "content": "Hello! Who are you?"}]


# ---------------------------------------------------------------- the pieces, no server
def test_stop_strings_are_held_back_until_decided():
    s = StopMatcher(["</s>", "STOP"])
    assert s.feed("Hello <") == ("Hello ", False)  # "<" may start "</s>"
    assert s.feed("/") == ("", False)
    assert s.feed("b> and ST") == ("</b> and ", False)
    assert s.feed("OP here") == ("", True)
    assert StopMatcher([]).feed("</s>") == ("</s>", False)
    t = StopMatcher(["\n\n"])
    assert t.feed("a\n") == ("a", False) and t.flush() == "\n"


def test_api_key_from_a_file_and_refusals(tmp_path):
    f = tmp_path / "key.txt"
    f.write_text(f"  {KEY}  \nsecond line ignored\n")
    assert api_key(ServeOptions(model=f, api_key_file=f)) == KEY
    assert api_key(ServeOptions(model=f)) is None
    for opts, match in [(ServeOptions(model=f, api_key="a", api_key_file=f), "not both"),
                        (ServeOptions(model=f, api_key="  "), "empty"),
                        (ServeOptions(model=f, api_key="two words"), "one word"),
                        (ServeOptions(model=f, api_key_file=tmp_path / "none"), "cannot read")]:
        with pytest.raises(QwqqError, match=match):
            api_key(opts)


def test_metrics_text_format():
    m = Metrics(depth=lambda: 3)
    m.request("/v1/completions", 200)
    m.first_token(0.3)
    m.finished(10, 5, 0.5)
    text = m.render()
    assert 'qwqq_requests_total{route="/v1/completions",code="200"} 1' in text
    assert "qwqq_queue_depth 3" in text and "qwqq_tokens_generated_total 5" in text
    assert 'qwqq_time_to_first_token_seconds_bucket{le="0.25"} 0' in text
    assert 'qwqq_time_to_first_token_seconds_bucket{le="0.5"} 1' in text
    assert "qwqq_decode_tokens_per_second 8" in text  # 4 tokens after the first in 0.5 s


def test_while_loading_health_and_generation_answer_503(tmp_path):
    """The app before its model is loaded, called through ASGI directly (no socket, no model)."""
    import asyncio

    pytest.importorskip("fastapi")
    from qwqq.serve.app import ServerState, create_app

    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    app = create_app(ServerState(opts=ServeOptions(model=model), model_id="m", key=None, metrics=Metrics()))

    async def call(method: str, path: str, body: bytes = b"") -> tuple[int, dict, dict]:
        sent, messages = [], [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "path": path,
                 "raw_path": path.encode(), "query_string": b"", "headers": [(b"content-type", b"application/json")],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000), "scheme": "http", "root_path": ""}
        await app(scope, receive, send)
        start = next(m for m in sent if m["type"] == "http.response.start")
        text = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, json.loads(text)

    status, headers, body = asyncio.run(call("GET", "/health"))
    assert status == 503 and body["status"] == "loading" and headers["retry-after"]
    status, headers, body = asyncio.run(call("POST", "/v1/completions", b'{"prompt": "hi"}'))
    assert status == 503 and body["error"]["code"] == "loading" and headers["retry-after"]
    assert asyncio.run(call("GET", "/v1/models"))[2]["data"][0]["id"] == "m"


# ---------------------------------------------------------------- servers
class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path):
        self.proc, self.url, self.log = proc, url, log
        u = urlsplit(url)
        self.host, self.port = u.hostname, u.port

    def client(self, key: str | None = KEY, **kw):
        import openai

        return openai.OpenAI(base_url=self.url, api_key=key or "none", max_retries=0, timeout=60, **kw)

    def raw(self, method: str, path: str, body: bytes | None = None, key: str | None = KEY) -> tuple[int, dict, bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        try:
            conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            conn.close()

    def metric(self, name: str) -> float:
        status, _, text = self.raw("GET", "/metrics")
        assert status == 200
        return float(re.search(rf"^{name} (\S+)$", text.decode(), re.M).group(1))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def needs_server_packages() -> None:
    """Skip unless llama-cpp-python, FastAPI and the openai client are installed (`pip install ".[llama,serve]"`)."""
    for name in ("llama_cpp", "fastapi", "openai"):
        pytest.importorskip(name)


def start_server(model: Path, log: Path, *args: str) -> Server:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("QWQQ_DEBUG", None)
    # One thread: the test suite runs two workers on two cores, and llama.cpp's threads spin.
    cmd = [sys.executable, "-m", "qwqq.cli", "serve", str(model), "--port", "0", "--threads", "1", "--ctx", "1024", *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    deadline = time.monotonic() + 120
    while True:
        text = log.read_text(errors="replace")
        url = re.search(r" at (http://\S+/v1): ", text)
        if url and "ready:" in text:
            return Server(proc, url.group(1), log)
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"qwqq serve did not start:\n{text}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def server(smollm2_gguf, tmp_path_factory):
    needs_server_packages()
    d = tmp_path_factory.mktemp("serve")
    (d / "key.txt").write_text(KEY + "\n")
    s = start_server(Path(smollm2_gguf), d / "server.log", "--api-key-file", str(d / "key.txt"), "--max-queue", "1",
                     "--parallel", "1")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def thinking_server(smollm2_gguf, tmp_path_factory):
    needs_server_packages()
    d = tmp_path_factory.mktemp("serve-think")
    model = d / "SmolLM2-thinking.gguf"
    (d / "template.jinja").write_text(THINKING_TEMPLATE)
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(smollm2_gguf), str(model),
                    "--chat-template-file", str(d / "template.jinja"), "--force"], check=True, capture_output=True)
    s = start_server(model, d / "server.log")
    yield s
    s.stop()


# ---------------------------------------------------------------- the API through the openai client
@pytest.mark.slow
def test_models_and_the_startup_line(server):
    models = server.client().models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct.Q4_1"]
    assert server.client().models.retrieve("SmolLM2-135M-Instruct.Q4_1").id == models[0].id
    line = server.log.read_text().splitlines()[0]
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in line and "ctx 1024, f16 KV cache" in line and "API key required" in line


@pytest.mark.slow
def test_chat_not_streamed_and_streamed(server):
    c = server.client()
    r = c.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1", messages=HELLO, max_tokens=12, temperature=0)
    answer = r.choices[0].message.content
    assert answer.strip() and "<|im_end|>" not in answer and "<|im_start|>" not in answer
    assert r.choices[0].finish_reason in ("stop", "length") and r.object == "chat.completion"
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert getattr(r.choices[0].message, "reasoning_content", None) is None  # this template never thinks

    chunks = list(c.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1", messages=HELLO, max_tokens=12,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed.strip() == answer.strip()  # greedy: the same answer both ways
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


@pytest.mark.slow
def test_completions_with_stop_and_seed(server):
    c = server.client()
    kw = dict(model="SmolLM2-135M-Instruct.Q4_1", prompt="Count: 1, 2, 3,", max_tokens=24, seed=7)
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    assert a.choices[0].text and a.choices[0].text == b.choices[0].text  # same seed, same text
    assert a.choices[0].finish_reason == "length" and a.usage.completion_tokens == 24
    r = c.completions.create(**{**kw, "temperature": 0}, stop=[" 6"])
    assert r.choices[0].text == " 4, 5," and r.choices[0].finish_reason == "stop"
    pieces = [ch.choices[0].text for ch in c.completions.create(**{**kw, "temperature": 0}, stop=[" 6"], stream=True)]
    assert "".join(pieces) == " 4, 5,"


@pytest.mark.slow
def test_api_key_is_enforced(server):
    import openai

    with pytest.raises(openai.AuthenticationError) as e:
        server.client(key="wrong").models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    assert server.raw("GET", "/v1/models", key=None)[0] == 401
    assert server.raw("GET", "/metrics", key=None)[0] == 401
    status, _, body = server.raw("GET", "/health", key=None)  # public
    assert status == 200 and json.loads(body) == {"status": "ok"}
    assert server.client().models.list().data


@pytest.mark.slow
def test_bad_requests_get_openai_errors_and_the_server_goes_on(server):
    import openai

    c = server.client()
    chat = dict(model="SmolLM2-135M-Instruct.Q4_1", messages=HELLO, max_tokens=4)
    cases = [  # (call, error class, status, error code or message part)
        (lambda: c.chat.completions.create(**{**chat, "model": "gpt-4"}), openai.NotFoundError, 404, "model_not_found"),
        (lambda: c.chat.completions.create(**chat, n=2), openai.BadRequestError, 400, "n=1"),
        (lambda: c.chat.completions.create(**{**chat, "max_tokens": 5000}), openai.BadRequestError, 400,
         "context_length_exceeded"),
        (lambda: c.completions.create(model=chat["model"], prompt="word " * 1500, max_tokens=4), openai.BadRequestError,
         400, "context_length_exceeded"),
        (lambda: c.chat.completions.create(**chat, temperature=5), openai.BadRequestError, 400, "temperature"),
        (lambda: c.chat.completions.create(**{**chat, "messages": []}), openai.BadRequestError, 400, "messages"),
        # llama.cpp's GBNF parser recurses per nested group: 100,000 deep would take the whole server down
        (lambda: c.chat.completions.create(**chat, extra_body={"grammar": "root ::= " + "(" * 1000 + '"a"' + ")" * 1000}),
         openai.BadRequestError, 400, "nested more than 64"),
        (lambda: c.chat.completions.create(**chat, extra_body={"grammar": "root ::= " + '"a" ' * 20000}),
         openai.BadRequestError, 400, "grammar"),
        (lambda: c.chat.completions.create(**chat, extra_body={"top_k": 2**40}), openai.BadRequestError, 400, "top_k"),
    ]
    for call, cls, status, what in cases:
        with pytest.raises(cls) as e:
            call()
        assert e.value.status_code == status
        assert what in (e.value.body.get("code") or "") or what in e.value.body["message"], e.value.body
    for body, status in [(b"{not json", 400), (b"[1, 2]", 400), (b"", 400), (b"\xff\xfe", 400)]:
        got, _, text = server.raw("POST", "/v1/chat/completions", body)
        assert got == status and json.loads(text)["error"]["type"] == "invalid_request_error"
    big = b'{"prompt": "' + b"x" * (17 << 20) + b'"}'
    try:
        got, _, text = server.raw("POST", "/v1/completions", big)
        assert got == 413 and "larger than" in json.loads(text)["error"]["message"]
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered 413 and closed before the client had sent it all
    assert server.raw("GET", "/health")[0] == 200
    assert server.client().chat.completions.create(**chat).choices[0].message.content is not None


@pytest.mark.slow
def test_a_disconnect_frees_the_server_and_a_full_queue_answers_503(server):
    import openai

    c = server.client()
    long = dict(model="SmolLM2-135M-Instruct.Q4_1", prompt="Count: 1, 2, 3,", max_tokens=900, temperature=0)
    cancelled, generated = server.metric("qwqq_requests_cancelled_total"), server.metric("qwqq_tokens_generated_total")
    stream = c.completions.create(**long, stream=True)
    for _, _ in zip(range(3), stream):
        pass
    stream.close()  # the client goes away mid-stream
    start = time.monotonic()
    r = c.completions.create(**{**long, "max_tokens": 4})
    assert r.usage.completion_tokens == 4
    assert time.monotonic() - start < 10  # not behind the 900-token stream (about 20 s on one core)
    assert server.metric("qwqq_requests_cancelled_total") == cancelled + 1
    assert server.metric("qwqq_tokens_generated_total") - generated < 200

    # One stream decoding, one waiting (--max-queue 1): a third request is turned away with Retry-After.
    first = c.completions.create(**long, stream=True)
    next(iter(first))
    second = c.completions.create(**long, stream=True)
    try:
        deadline = time.monotonic() + 10
        while server.metric("qwqq_queue_depth") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(openai.InternalServerError) as e:
            c.completions.create(**{**long, "max_tokens": 4})
        assert e.value.status_code == 503 and e.value.response.headers["retry-after"]
        assert e.value.body["code"] == "queue_full"
    finally:
        first.close()
        second.close()
    assert c.completions.create(**{**long, "max_tokens": 4}).usage.completion_tokens == 4


@pytest.mark.slow
def test_thinking_is_split_out_of_the_answer(thinking_server):
    c = thinking_server.client()
    kw = dict(model="SmolLM2-thinking", messages=[{"role": "user", "content": "What is 2+2?"}], max_tokens=16,
              temperature=0)
    r = c.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert msg.reasoning_content.strip() and "<think>" not in msg.reasoning_content
    assert msg.content == ""  # a 135M model never closes the block: all of it was thinking

    chunks = list(c.chat.completions.create(**kw, stream=True))
    reasoning = "".join(getattr(ch.choices[0].delta, "reasoning_content", None) or "" for ch in chunks)
    assert reasoning.strip() == msg.reasoning_content
    assert not "".join(ch.choices[0].delta.content or "" for ch in chunks)

    # The template's switch, passed through: no thinking, and the text comes back as the answer.
    off = c.chat.completions.create(**kw, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert off.choices[0].message.content.strip()
    assert getattr(off.choices[0].message, "reasoning_content", None) is None

    # vLLM's newer field name, and none (left inline), per request as llama-server allows.
    named = c.chat.completions.create(**kw, extra_body={"reasoning_format": "reasoning"}).choices[0].message
    assert named.reasoning == msg.reasoning_content and getattr(named, "reasoning_content", None) is None
    inline = c.chat.completions.create(**kw, extra_body={"reasoning_format": "none"}).choices[0].message
    assert inline.content.strip() == msg.reasoning_content


@pytest.mark.slow
def test_sigterm_shuts_down_cleanly(thinking_server):
    thinking_server.proc.send_signal(signal.SIGTERM)
    assert thinking_server.proc.wait(30) == 0

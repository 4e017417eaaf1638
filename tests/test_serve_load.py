"""`qwqq serve` under load, loopback only and bounded: 240 requests from 16 concurrent clients mixing chat and
completions, streamed and not, clients that hang up mid-stream and malformed bodies. No crash; every valid
request answered completely (a finish_reason, usage, a stream ended by [DONE]); every malformed one a 400
with OpenAI's error JSON; the server healthy afterwards, its memory flat after warm-up."""

from __future__ import annotations

import http.client
import json
import random
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.test_serve import needs_server_packages, start_server

pytestmark = pytest.mark.slow  # a real server and a few hundred generations (about half a minute)
CLIENTS, REQUESTS = 16, 240
MODEL = "SmolLM2-135M-Instruct.Q4_1"  # the file name, as /v1/models lists it
KINDS = ("chat", "chat-stream", "completion", "completion-stream", "hang-up", "malformed", "bad-field")


@pytest.fixture(scope="module")
def server(smollm2_gguf, tmp_path_factory):
    needs_server_packages()
    s = start_server(Path(smollm2_gguf), tmp_path_factory.mktemp("load") / "server.log", "--max-queue", str(REQUESTS))
    yield s
    s.stop()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _hang_up(server, n: int) -> str:
    """A streamed request whose client reads its first event and closes the socket."""
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": f"Count to {n}."}], "max_tokens": 64,
                       "stream": True}).encode()
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    try:
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200, r.status
        assert r.readline().startswith(b"data: ")
        conn.sock.shutdown(socket.SHUT_RDWR)
    finally:
        conn.close()
    return "hung up"


def _one(server, kind: str, n: int) -> str:
    c = server.client(key=None)
    prompt = f"Say a word about the number {n}."
    if kind == "chat":
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=6)
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    elif kind == "chat-stream":
        chunks = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                                max_tokens=6, stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].usage.prompt_tokens > 0
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("stop", "length")
    elif kind == "completion":
        r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=6)
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    elif kind == "completion-stream":
        chunks = list(c.completions.create(model=MODEL, prompt=prompt, max_tokens=6, stream=True))
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    elif kind == "hang-up":
        return _hang_up(server, n)
    else:
        body = b'{"model": MODEL, "messages": [' if kind == "malformed" else json.dumps(
            {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": -3}).encode()
        status, _, raw = server.raw("POST", "/v1/chat/completions", body, key=None)
        assert status == 400, (status, raw)
        assert json.loads(raw)["error"]["type"] == "invalid_request_error"
    return "ok"


def test_hundreds_of_mixed_requests_from_many_clients(server):
    warm = [_one(server, kind, i) for i, kind in enumerate(KINDS * 2)]
    assert warm.count("ok") == len(warm) - 2
    before = _rss_kib(server.proc.pid)
    rng = random.Random(0)
    work = [(rng.choice(KINDS), i) for i in range(REQUESTS)]
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(lambda job: _one(server, *job), work))  # a failed assertion re-raises here
    assert len(results) == REQUESTS and server.proc.poll() is None
    status, _, body = server.raw("GET", "/health", key=None)
    assert status == 200 and json.loads(body)["status"] == "ok"
    assert _one(server, "chat", 0) == "ok"  # hung-up slots were freed: it is answered
    grown = _rss_kib(server.proc.pid) - before
    assert grown < 64 * 1024, f"the server grew by {grown} KiB over {REQUESTS} requests"
    valid = sum(k not in ("malformed", "bad-field") for k, _ in work)
    assert server.metric("qwqq_queue_depth") == 0
    assert valid > REQUESTS // 2

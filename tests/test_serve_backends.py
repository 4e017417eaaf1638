"""`qwqq serve` on its other backends: an MLX folder on mlx-lm (BatchGenerator: requests decoded together) and
an unquantized folder on transformers (one request at a time), driven by the official `openai` client."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests import fixtures
from tests.conftest import run_qwqq
from tests.test_serve import start_server

PROMPTS = ["Count: 1, 2, 3,", "The capital of France is", "def fibonacci(n):"]
N = 12


def _needs(*modules: str) -> None:
    for name in ("fastapi", "openai", *modules):
        pytest.importorskip(name)


@pytest.fixture(scope="module")
def mlx_folder(tmp_path_factory) -> Path:
    _needs("mlx", "mlx_lm")
    from qwqq.mlx.quantize import quantize_to_mlx
    from tests.test_mlx import hub_clone

    root = tmp_path_factory.mktemp("serve-mlx")
    src = hub_clone(fixtures.tiny_model_dir("qwen3"), root / "src")
    return quantize_to_mlx(src, bits=8, out=root / "tiny-qwen3-mlx-8bit", progress=False).path


def _greedy(server, model: str, prompt: str) -> tuple[str, int]:
    r = server.client(key=None).completions.create(model=model, prompt=prompt, max_tokens=N, temperature=0)
    return r.choices[0].text, r.usage.completion_tokens


def _streamed(server, model: str, prompt: str) -> str:
    chunks = server.client(key=None).completions.create(model=model, prompt=prompt, max_tokens=N, temperature=0,
                                                        stream=True)
    return "".join(c.choices[0].text for c in chunks if c.choices)


def _stops_cleanly(server) -> None:
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(60) == 0, server.log.read_text(errors="replace")


@pytest.mark.slow
def test_mlx_requests_decoded_together_give_mlx_lm_s_tokens(mlx_folder, tmp_path):
    """Three streams in one BatchGenerator give the greedy text each gives alone, which is mlx_lm.generate's;
    GBNF grammars are refused with a 400; SIGTERM ends the server with status 0."""
    from mlx_lm import generate, load

    model, tokenizer = load(str(mlx_folder))
    reference = [generate(model, tokenizer, prompt=tokenizer.encode(p, add_special_tokens=False), max_tokens=N)
                 for p in PROMPTS]
    del model

    s = start_server(mlx_folder, tmp_path / "server.log", "--parallel", "3")
    try:
        startup = s.log.read_text()
        assert "(mlx)" in startup and "3 requests decoded in one batch" in startup
        name = s.client(key=None).models.list().data[0].id
        alone = [_greedy(s, name, p) for p in PROMPTS]
        assert [text for text, _ in alone] == reference
        with ThreadPoolExecutor(3) as pool:
            together = list(pool.map(lambda p: _streamed(s, name, p), PROMPTS))
        assert together == reference
        assert all(n <= N for _, n in alone) and any(n == N for _, n in alone)
        assert s.metric("qwqq_slots") == 3

        import openai

        with pytest.raises(openai.BadRequestError, match="GBNF grammars are llama.cpp's"):
            s.client(key=None).completions.create(model=name, prompt="x", max_tokens=2,
                                                  extra_body={"grammar": 'root ::= "a"'})
        _stops_cleanly(s)
    finally:
        s.stop()

    # --parallel 1: one request at a time through mlx_lm.stream_generate (as for a model mlx-lm cannot batch)
    s = start_server(mlx_folder, tmp_path / "server-1.log", "--parallel", "1")
    try:
        assert "one request at a time" in s.log.read_text()
        assert _greedy(s, name, PROMPTS[0]) == alone[0]
        assert s.metric("qwqq_slots") == 1
        _stops_cleanly(s)
    finally:
        s.stop()


@pytest.mark.slow
def test_transformers_answers_one_request_at_a_time_with_run_s_tokens(tmp_path):
    """An unquantized folder on --backend transformers: two requests at once are both answered, one after the
    other, with the greedy tokens `qwqq run`'s backend gives."""
    _needs("torch", "transformers")
    from qwqq.run.backends import LoadOptions, pick_backend
    from qwqq.run.sampling import Sampling

    folder = fixtures.tiny_model_dir("qwen3")
    m = pick_backend("transformers", folder).load(folder, LoadOptions(ctx=1024, threads=1))
    try:
        want = ["".join(m.stream_tokens(m.tokens(p), Sampling(greedy=True), N)) for p in PROMPTS[:2]]
    finally:
        m.close()

    s = start_server(folder, tmp_path / "server.log", "--backend", "transformers")
    try:
        assert "(transformers)" in s.log.read_text() and "one request at a time" in s.log.read_text()
        name = s.client(key=None).models.list().data[0].id
        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(lambda p: _streamed(s, name, p), PROMPTS[:2]))
        assert got == want
        assert s.metric("qwqq_slots") == 1
        assert s.metric("qwqq_requests_running") == 0 and s.metric("qwqq_queue_depth") == 0
        import openai

        with pytest.raises(openai.BadRequestError, match="presence_penalty is not applied by this server's backend"):
            s.client(key=None).completions.create(model=name, prompt="x", max_tokens=2, presence_penalty=1.0)
        _stops_cleanly(s)
    finally:
        s.stop()


def test_llama_cpp_placement_is_refused_on_other_backends(tmp_path):
    _needs()
    folder = fixtures.tiny_model_dir("qwen3")
    p = run_qwqq("serve", folder, "--backend", "transformers", "--n-cpu-moe", "2", "--port", "0", cwd=tmp_path,
                 timeout=120)
    assert p.returncode == 2 and "do not apply to the transformers backend" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    p = run_qwqq("run", folder, "--backend", "transformers", "--kv", "q8_0", "-p", "hi", cwd=tmp_path, timeout=120)
    assert p.returncode == 2 and "--kv sets llama.cpp's KV cache type" in p.stderr
    p = run_qwqq("serve", folder, "--engine", "vllm", "--backend", "mlx", cwd=tmp_path, timeout=120)
    assert p.returncode == 2 and "--backend" in p.stderr


def test_a_batch_loop_that_cannot_start_answers_every_request(monkeypatch):
    """mlx-lm's generator failing to start (or to recover) must not leave requests waiting for a loop that is
    gone: the queued one gets the error, and a later one is refused at once with the reason."""
    import asyncio

    from qwqq.serve.engine import GenParams, Job, QueueFull
    from qwqq.serve.metrics import Metrics
    from qwqq.serve.mlx import MlxBatchScheduler

    def broken(self):
        raise RuntimeError("no Metal device")

    monkeypatch.setattr(MlxBatchScheduler, "_generator", broken)

    async def go():
        scheduler = MlxBatchScheduler(model=None, parallel=2, max_queue=4, metrics=Metrics())
        job = Job(GenParams(tokens=[1, 2], max_tokens=4, temperature=0, top_p=1, top_k=0, min_p=0, seed=0),
                  asyncio.get_running_loop())
        scheduler.submit(job)
        scheduler.start()
        event = await asyncio.wait_for(job.events.get(), 10)
        later = Job(GenParams(tokens=[1], max_tokens=1, temperature=0, top_p=1, top_k=0, min_p=0, seed=0),
                    asyncio.get_running_loop())
        with pytest.raises(QueueFull, match="mlx-lm stopped: RuntimeError: no Metal device"):
            scheduler.submit(later)
        assert scheduler.stop()
        return event

    assert asyncio.run(go()) == ("error", "mlx-lm stopped: RuntimeError: no Metal device")

"""Continuous batching in `qwqq serve`: one real server (SmolLM2-135M Q4_1, 3 slots, each with its own
share of the KV cache) driven by the official `openai` client from several threads at once."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.test_serve import needs_server_packages, start_server

MODEL = "SmolLM2-135M-Instruct.Q4_1"
SLOTS = 3
PROMPTS = ["Count: 1, 2, 3,", "The capital of France is", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def batch_server(smollm2_gguf, tmp_path_factory):
    needs_server_packages()
    d = tmp_path_factory.mktemp("serve-batch")
    # --no-kv-unified: each sequence has its own KV cells, so where other sequences' cells lie cannot change
    # the order of its attention sums (with one unified pool greedy tokens may differ in the last bits).
    s = start_server(Path(smollm2_gguf), d / "server.log", "--parallel", str(SLOTS), "--no-kv-unified",
                     "--max-queue", "4")
    yield s
    s.stop()


def _greedy(server, prompt: str, n: int) -> str:
    r = server.client(key=None).completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0)
    assert r.usage.completion_tokens == n
    return r.choices[0].text


def _stream(server, prompt: str, n: int, log: dict) -> str:
    """Streamed greedy text, with the times of its first and last piece in `log`."""
    pieces = []
    for chunk in server.client(key=None).completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0,
                                                            stream=True):
        if chunk.choices and chunk.choices[0].text:
            log.setdefault("first", time.monotonic())
            pieces.append(chunk.choices[0].text)
    log["last"] = time.monotonic()
    return "".join(pieces)


def _wait_for(server, metric: str, value: float, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while server.metric(metric) != value:
        assert time.monotonic() < deadline, f"{metric} never became {value}"
        time.sleep(0.05)


@pytest.mark.slow
def test_streams_decoded_in_one_batch_give_the_tokens_of_runs_alone(batch_server):
    assert batch_server.metric("qwqq_slots") == SLOTS
    alone = [_greedy(batch_server, p, 24) for p in PROMPTS]
    logs = [{} for _ in PROMPTS]
    with ThreadPoolExecutor(SLOTS) as pool:
        together = list(pool.map(lambda i: _stream(batch_server, PROMPTS[i], 24, logs[i]), range(len(PROMPTS))))
    assert together == alone
    # Decoded together: every stream had its first token before any had its last.
    assert max(log["first"] for log in logs) < min(log["last"] for log in logs)


@pytest.mark.slow
def test_a_request_joins_while_others_decode_and_a_disconnect_frees_its_slot(batch_server):
    c = batch_server.client(key=None)
    want = _greedy(batch_server, PROMPTS[1], 8)
    cancelled = batch_server.metric("qwqq_requests_cancelled_total")
    long = [c.completions.create(model=MODEL, prompt=p, max_tokens=300, temperature=0, stream=True)
            for p in (PROMPTS[0], PROMPTS[2])]
    try:
        for stream in long:
            next(iter(stream))
        _wait_for(batch_server, "qwqq_requests_running", 2)
        assert _greedy(batch_server, PROMPTS[1], 8) == want  # joined the two running streams, same tokens
        long[0].close()  # the client goes away mid-stream: its slot is free at the next step
        _wait_for(batch_server, "qwqq_requests_running", 1)
        assert batch_server.metric("qwqq_requests_cancelled_total") == cancelled + 1
        assert _greedy(batch_server, PROMPTS[1], 8) == want
        assert batch_server.metric("qwqq_requests_running") == 1  # the other long stream still decodes
    finally:
        for stream in long:
            stream.close()
    _wait_for(batch_server, "qwqq_requests_running", 0)


@pytest.mark.slow
def test_more_requests_than_slots_all_complete(batch_server):
    results, errors = [], []

    def one(i: int) -> None:
        try:
            results.append(_greedy(batch_server, PROMPTS[i % len(PROMPTS)], 12))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(SLOTS + 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == SLOTS + 1
    assert batch_server.metric("qwqq_queue_depth") == 0 and batch_server.metric("qwqq_requests_running") == 0


# ---------------------------------------------------------------- a hybrid model, in process
@pytest.mark.slow
def test_a_hybrid_model_decodes_sequences_together(tmp_path):
    """Qwen3.5's shape (recurrent state per sequence beside the KV cache): two sequences decoded in one batch
    give the tokens each gives alone, and a slot whose recurrent state cannot be cut back to a shared prefix
    evaluates the prompt again (the same tokens once more)."""
    import asyncio

    pytest.importorskip("llama_cpp")
    from qwqq.gguf.quantize import quantize_to_gguf, resolve_mixture
    from qwqq.run.backends import LoadOptions, pick_backend
    from qwqq.serve.batch import BatchScheduler
    from qwqq.serve.engine import GenParams, Job
    from qwqq.serve.llamacpp import LlamaCppEngine
    from qwqq.serve.metrics import Metrics
    from tests.fixtures_hybrid import tiny_hybrid_dir

    gguf = quantize_to_gguf(tiny_hybrid_dir("qwen3_5"), resolve_mixture(type_name="Q8_0"), out=tmp_path / "h.gguf",
                            progress=False, threads=2).path
    model = pick_backend("llama.cpp", gguf).load(gguf, LoadOptions(ctx=256, threads=1))
    engine = LlamaCppEngine(model, 2, unified=False)
    scheduler = BatchScheduler(engine, 4, Metrics())
    scheduler.start()

    async def generate(text: str) -> tuple[str, int]:
        job = Job(GenParams(tokens=engine.tokens(text), max_tokens=12, temperature=0, top_p=1, top_k=0, min_p=0,
                            seed=0), asyncio.get_running_loop())
        scheduler.submit(job)
        pieces = []
        while True:
            event = await job.events.get()
            if event[0] == "text":
                pieces.append(event[1])
            else:
                assert event[0] == "done", event
                return "".join(pieces), event[3]

    async def alone_then_together():
        texts = ["Hello there", "The weather today"]
        alone = [await generate(t) for t in texts]
        together = await asyncio.gather(*(generate(t) for t in texts))
        again = await generate(texts[0])  # its slot holds prompt + answer: cut back to the prompt, or start over
        return alone, together, again

    try:
        alone, together, again = asyncio.run(alone_then_together())
    finally:
        scheduler.stop()
        model.close()
    assert alone[0][1] > 0 and list(together) == alone and again == alone[0]


# ---------------------------------------------------------------- the order of a batch, in process
@pytest.mark.slow
def test_a_batch_goes_to_llama_cpp_in_sequence_order_whatever_the_arrival_order(smollm2_gguf, monkeypatch):
    """With a KV stream per sequence llama.cpp puts only runs of consecutive sequence ids in one ubatch
    (split_equal), so a batch in arrival order was decoded as up to one ubatch per sequence: 8 streams at half
    llama-server's speed. Three prompts cached in slots 0, 1 and 2 come back in the order 2, 0, 1; each
    returns to its own slot (the longest shared prefix), and every batch llama.cpp is given lists its
    sequences in increasing order, with the tokens each prompt gives alone."""
    import asyncio

    import llama_cpp

    from qwqq.run.backends import LoadOptions, pick_backend
    from qwqq.serve.batch import BatchScheduler
    from qwqq.serve.engine import GenParams, Job
    from qwqq.serve.llamacpp import LlamaCppEngine
    from qwqq.serve.metrics import Metrics

    gguf = Path(smollm2_gguf)
    model = pick_backend("llama.cpp", gguf).load(gguf, LoadOptions(ctx=3 * 256, threads=2))
    engine = LlamaCppEngine(model, 3, unified=False)
    scheduler = BatchScheduler(engine, 4, Metrics())
    batches: list[list[int]] = []
    decode = llama_cpp.llama_decode

    def recording_decode(ctx, batch):
        batches.append([batch.seq_id[i][0] for i in range(batch.n_tokens)])
        return decode(ctx, batch)

    monkeypatch.setattr(llama_cpp, "llama_decode", recording_decode)
    scheduler.start()

    async def generate(text: str) -> str:
        job = Job(GenParams(tokens=engine.tokens(text), max_tokens=8, temperature=0, top_p=1, top_k=0, min_p=0,
                            seed=0), asyncio.get_running_loop())
        scheduler.submit(job)
        pieces = []
        while (event := await job.events.get())[0] == "text":
            pieces.append(event[1])
        assert event[0] == "done", event
        return "".join(pieces)

    async def cached_then_shuffled():
        alone = [await generate(p) for p in PROMPTS]  # one at a time: the free slot with the lowest id, 0, 1, 2
        slots_after_alone = [s.cached[:3] for s in scheduler.slots]
        shuffled = await asyncio.gather(*(generate(PROMPTS[i]) for i in (2, 0, 1)))
        return alone, slots_after_alone, shuffled

    prompt_starts = [engine.tokens(p)[:3] for p in PROMPTS]
    try:
        alone, slots_after_alone, shuffled = asyncio.run(cached_then_shuffled())
    finally:
        scheduler.stop()
        model.close()
    assert slots_after_alone == prompt_starts
    assert shuffled == [alone[2], alone[0], alone[1]]
    together = [b for b in batches if len(set(b)) > 1]
    assert together and all(b == sorted(b) for b in together)
    assert max(len(set(b)) for b in together) == 3


@pytest.mark.slow
def test_a_full_shared_pool_ends_the_biggest_request_and_the_other_finishes(smollm2_gguf):
    """One unified KV pool, two slots, two requests that each need nearly all of it: when a step finds no
    room (llama_decode returns 1) and no idle slot holds cells to drop, the request holding the most cells
    ends with an error naming the full context, and the other one runs to its max_tokens."""
    import asyncio

    from qwqq.run.backends import LoadOptions, pick_backend
    from qwqq.serve.batch import BatchScheduler
    from qwqq.serve.engine import GenParams, Job
    from qwqq.serve.llamacpp import LlamaCppEngine
    from qwqq.serve.metrics import Metrics

    gguf = Path(smollm2_gguf)
    model = pick_backend("llama.cpp", gguf).load(gguf, LoadOptions(ctx=256, threads=2))
    engine = LlamaCppEngine(model, 2, unified=True)
    scheduler = BatchScheduler(engine, 4, Metrics())
    scheduler.start()

    async def generate(text: str) -> tuple:
        tokens = engine.tokens(text)
        job = Job(GenParams(tokens=tokens, max_tokens=engine.n_ctx - len(tokens) - 1, temperature=0, top_p=1,
                            top_k=0, min_p=0, seed=0), asyncio.get_running_loop())
        scheduler.submit(job)
        while (event := await job.events.get())[0] == "text":
            pass
        return event, job.params.max_tokens

    async def both():
        return await asyncio.gather(generate(PROMPTS[0]), generate(PROMPTS[1]))

    try:
        results = asyncio.run(both())
    finally:
        scheduler.stop()
        model.close()
    errors = [e for e, _ in results if e[0] == "error"]
    done = [(e, n) for e, n in results if e[0] == "done"]
    assert len(errors) == 1 and "the context is full" in errors[0][1], results
    assert len(done) == 1 and done[0][0][1] == "length" and done[0][0][3] == done[0][1], results

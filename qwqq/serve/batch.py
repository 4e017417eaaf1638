"""Continuous batching on one llama.cpp context: `parallel` slots, one decode loop.

Each slot owns one sequence id of the context's KV cache (n_seq_max = parallel, one unified pool of
n_ctx cells: LlamaCppEngine). One thread runs the loop; each step it
  - moves waiting jobs into free slots (the free slot whose cached tokens share the longest prefix with
    the prompt; the KV of that prefix is kept, the rest removed with llama_memory_seq_rm),
  - drops jobs whose client went away (their sequence removed at once),
  - builds one llama_batch: the last sampled token of every generating slot, then prompt chunks of newly
    admitted ones up to n_batch tokens, logits asked for where a token is to be sampled,
  - calls llama_decode once and samples each of those slots with its own sampler chain.
Jobs join and leave between steps. A finished job's KV stays in its slot for the next prompt that shares
its prefix, until the pool needs the room (then idle slots are cleared first, as llama-server does; if
that is not enough the job holding the most cells ends with an error). The last sampled token of a slot
is never in its cache, so a cache is exactly the tokens it lists (recurrent state included).

Events go to each job as in qwqq.serve.engine: ("text", str), ("done", finish, prompt_tokens,
completion_tokens), ("error", message).
"""

from __future__ import annotations

import codecs

from qwqq.serve.engine import Answer, Job, Scheduler
from qwqq.serve.llamacpp import LlamaCppEngine, sampler_chain
from qwqq.serve.metrics import Metrics


class Output(Answer):
    """What one job's llama.cpp tokens become: text (UTF-8 across tokens), EOS, max_tokens, and the rest as
    every answer (engine.Answer)."""

    def __init__(self, job: Job, engine: LlamaCppEngine, metrics: Metrics):
        super().__init__(job, metrics)
        self.engine = engine
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def token(self, token: int) -> bool:
        """One sampled token; True when the job is done (its "done" event in self.result, for the caller to
        send once the slot is free)."""
        self.arrived()
        if self.engine.is_eog(token):
            return self.done("stop")
        self.n += 1
        if self.show(self.utf8.decode(self.engine.piece(token))):
            return self.done("stop", flush=False)
        return self.done("length") if self.n >= self.job.params.max_tokens else False

    def done(self, finish: str, flush: bool = True, tail: str = "") -> bool:
        return super().done(finish, flush, self.utf8.decode(b"", final=True) if flush else "")


class Slot:
    def __init__(self, seq: int):
        self.seq = seq
        self.job: Job | None = None
        self.cached: list[int] = []  # the tokens whose KV (or recurrent state) sequence `seq` holds
        self.pending: list[int] = []  # prompt tokens still to evaluate
        self.next: int | None = None  # the last sampled token, evaluated in the next step
        self.sampler = None
        self.out: Output | None = None


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class BatchScheduler(Scheduler):
    """The scheduler the app uses (submit, cancel, stop, depth, running) over `parallel` slots."""

    def __init__(self, engine: LlamaCppEngine, max_queue: int, metrics: Metrics):
        import llama_cpp

        super().__init__(max_queue, metrics, "qwqq-serve-decode")
        self.engine = engine
        self.slots = [Slot(i) for i in range(engine.parallel)]
        self.active: list[Slot] = []  # in the order they were admitted (prompt chunks go first come, first served)
        self._turn = 0  # where the next step's generating slots start, when they do not all fit one batch
        self._batch = llama_cpp.llama_batch_init(engine.n_batch, 0, 1)

    def _running_jobs(self) -> list[Job]:
        return [s.job for s in self.active]

    def stop(self, timeout: float = 10.0) -> bool:
        stopped = super().stop(timeout)
        if stopped and self._batch is not None:
            import llama_cpp

            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        return stopped

    # ------------------------------------------------------------ the decode loop (its own thread)
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self.waiting and not self.active:
                    self._cond.wait()
                if self._stopping:
                    for slot in list(self.active):
                        self._release(slot, keep=False)
                    return
            try:
                with self._cond:
                    self._admit()
                self._step()
            except Exception as e:  # every job in the batch is answered with the error, the server goes on
                for slot in list(self.active):
                    self._fail(slot, e)

    def _admit(self) -> None:
        """Waiting jobs into free slots (called with the lock held)."""
        while self.waiting:
            free = [s for s in self.slots if s.job is None]
            if not free:
                return
            job = self.waiting.popleft()
            tokens = job.params.tokens
            # The longest shared prefix; else the emptiest cache, then the lowest sequence id (the batch is
            # decoded in fewer ubatches when the running sequence ids are consecutive: _plan).
            slot = max(free, key=lambda s: (common_prefix(s.cached, tokens), -len(s.cached), -s.seq))
            keep = min(common_prefix(slot.cached, tokens), len(tokens) - 1)  # at least one token to evaluate
            if keep < len(slot.cached) and not self._forget(slot, keep):
                self._forget(slot, 0)  # a recurrent state cannot be cut back: evaluate the whole prompt
                keep = 0
            slot.cached, slot.pending, slot.next = slot.cached[:keep], tokens[keep:], None
            slot.job, slot.out = job, Output(job, self.engine, self.metrics)
            self.active.append(slot)
            try:
                slot.sampler = sampler_chain(job.params, self.engine.vocab)
            except Exception as e:  # this job alone is answered with the error; the running ones go on
                self._fail(slot, e)

    def _fail(self, slot: Slot, e: Exception) -> None:
        slot.job.emit("error", f"generation failed: {type(e).__name__}: {e}")
        if slot.out is not None:
            slot.out.count()
        self._release(slot, keep=False)

    def _forget(self, slot: Slot, keep: int) -> bool:
        """Remove the slot's cache from position `keep` on; False if llama.cpp cannot cut it there."""
        import llama_cpp

        ok = bool(llama_cpp.llama_memory_seq_rm(self.engine.memory, slot.seq, keep if keep else -1, -1))
        if ok:
            del slot.cached[keep:]
        return ok

    def _release(self, slot: Slot, keep: bool) -> None:
        """The slot is free for the next job; its cache kept for prefix reuse, or removed at once."""
        import llama_cpp

        if slot.sampler is not None:
            llama_cpp.llama_sampler_free(slot.sampler)
        if not keep:
            self._forget(slot, 0)
        with self._cond:
            slot.job, slot.out, slot.sampler, slot.pending, slot.next = None, None, None, [], None
            if slot in self.active:
                self.active.remove(slot)

    def _plan(self) -> list[tuple[Slot, list[int], bool]]:
        """This step's batch: (slot, tokens to evaluate, sample after them)."""
        # Never more than n_batch tokens (a tiny --ctx with many slots: the rest generate next step).
        ready = [s for s in self.active if s.next is not None]
        if len(ready) > self.engine.n_batch:  # more generating slots than a batch holds: they take turns
            k = self._turn % len(ready)
            ready, self._turn = ready[k:] + ready[:k], self._turn + self.engine.n_batch
        plan = [(s, [s.next], True) for s in ready[: self.engine.n_batch]]
        room = self.engine.n_batch - len(plan)
        for s in self.active:
            if s.pending and room > 0:
                chunk = s.pending[:room]
                plan.append((s, chunk, len(chunk) == len(s.pending)))
                room -= len(chunk)
        # In increasing sequence order: with a KV stream per sequence (--no-kv-unified) llama.cpp puts only
        # runs of consecutive sequence ids in one ubatch (llama_batch_allocr::split_equal), so a batch in
        # arrival order would be decoded as up to one ubatch per sequence.
        return sorted(plan, key=lambda entry: entry[0].seq)

    def _step(self) -> None:
        import llama_cpp

        for slot in list(self.active):
            if slot.job.cancelled.is_set():  # the client went away: the slot is free from this step on
                slot.out.count()
                self._release(slot, keep=False)
        while True:
            plan = self._plan()
            if not plan:
                return
            b, n = self._batch, 0
            for slot, tokens, sample in plan:
                for i, token in enumerate(tokens):
                    b.token[n], b.pos[n], b.n_seq_id[n] = token, len(slot.cached) + i, 1
                    b.seq_id[n][0] = slot.seq
                    b.logits[n] = int(sample and i == len(tokens) - 1)
                    n += 1
            b.n_tokens = n
            ret = llama_cpp.llama_decode(self.engine.ctx, b)
            if ret == 0:
                break
            if ret != 1:
                raise RuntimeError(f"llama_decode returned {ret}")
            self._make_room()  # 1: no room in the KV cache for this batch; nothing of it was evaluated
        at = 0
        for slot, tokens, sample in plan:
            at += len(tokens)
            slot.cached += tokens
            if slot.next is not None:  # a generating slot: its one token
                slot.next = None
            else:
                slot.pending = slot.pending[len(tokens):]
            if sample:
                token = llama_cpp.llama_sampler_sample(slot.sampler, self.engine.ctx, at - 1)
                out = slot.out
                if out.token(token):
                    self._release(slot, keep=True)  # free before the answer is: a next request finds the slot
                    out.job.emit(*out.result)
                else:
                    slot.next = token

    def _make_room(self) -> None:
        idle = [s for s in self.slots if s.job is None and s.cached]
        for slot in idle:
            self._forget(slot, 0)
        if idle:
            return
        biggest = max(self.active, key=lambda s: len(s.cached) + len(s.pending))
        biggest.job.emit("error", f"the context is full: its {self.engine.n_ctx} tokens are shared by "
                                  f"{len(self.slots)} slots; retry, or give max_tokens")
        biggest.out.count()
        self._release(biggest, keep=False)

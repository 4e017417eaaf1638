"""MLX under `qwqq serve`: mlx-lm's BatchGenerator (continuous batching) over the model qwqq.run.backends.mlx
loaded.

The routes ask the model through qwqq.serve.serial.ModelEngine. `MlxBatchScheduler` has the scheduler interface the app uses (submit, cancel, stop, depth,
running, slots): one thread owns the BatchGenerator; each step it inserts waiting jobs while fewer than
--parallel run (each with its own sampler and presence / frequency penalties), removes the ones whose
client went away, and hands every sequence's next token to its job (streamed text through mlx-lm's
detokenizer, stop strings held back as everywhere, EOS and max_tokens). A model whose caches mlx-lm cannot
merge into a batch (its server's test) is served one request at a time (qwqq.serve.serial).

Differences from llama.cpp's slots: no prompt-prefix reuse between requests, and one random generator for
the whole batch (a request's seed is applied when it starts alone).
"""

from __future__ import annotations

import gc

from qwqq.run.sampling import PENALTY_LAST_N
from qwqq.serve.engine import Answer, Job, Scheduler
from qwqq.serve.metrics import Metrics



def batchable(model) -> bool:
    """Whether mlx-lm can decode this model's sequences in one batch (every cache can merge, as mlx_lm.server
    asks)."""
    from mlx_lm.models.cache import make_prompt_cache

    return all(hasattr(c, "merge") for c in make_prompt_cache(model.model))


def sampler_of(p):
    """One request's sampler and logits processors for mlx-lm."""
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    if p.temperature <= 0:
        sampler = make_sampler(temp=0.0)
    else:
        sampler = make_sampler(temp=p.temperature, top_p=p.top_p, min_p=p.min_p, top_k=p.top_k)
    processors = make_logits_processors(
        presence_penalty=p.presence_penalty or None, presence_context_size=PENALTY_LAST_N,
        frequency_penalty=p.frequency_penalty or None, frequency_context_size=PENALTY_LAST_N)
    return sampler, processors


class _Stream(Answer):
    """One job's mlx-lm tokens as text (mlx-lm's streaming detokenizer), and the rest as every answer."""

    def __init__(self, job: Job, detokenizer, metrics: Metrics):
        super().__init__(job, metrics)
        self.detok = detokenizer

    def token(self, token: int, finish: str | None) -> bool:
        """One generated token and mlx-lm's finish reason for it; True when the job is done (self.result)."""
        self.arrived()
        if finish != "stop":  # "stop": the token is an end-of-generation token, not part of the answer
            self.n += 1
            self.detok.add_token(token)
        if finish is not None:
            self.detok.finalize()
        if self.show(self.detok.last_segment):
            return self.done("stop", flush=False)
        return self.done(finish) if finish is not None else False


class MlxBatchScheduler(Scheduler):
    def __init__(self, model, parallel: int, max_queue: int, metrics: Metrics):
        super().__init__(max_queue, metrics, "qwqq-serve-mlx")
        self.model = model
        self.slots = [None] * parallel
        self.streams: dict[int, _Stream] = {}  # by BatchGenerator uid
        self._admitting: list[Job] = []  # taken from the queue, not yet in the generator

    def _running_jobs(self) -> list[Job]:
        return [*self._admitting, *(s.job for s in list(self.streams.values()))]

    # ------------------------------------------------------------ the decode loop (its own thread)
    def _generator(self):
        from mlx_lm.generate import BatchGenerator

        eos = sorted(getattr(self.model.tokenizer, "eos_token_ids", None) or [])
        return BatchGenerator(self.model.model, stop_tokens=[[t] for t in eos],
                              completion_batch_size=len(self.slots), prefill_batch_size=len(self.slots))

    def _loop(self) -> None:
        gen = None
        try:
            gen = self._generator()
            while True:
                with self._cond:
                    while not self._stopping and not self.waiting and not self.streams:
                        self._cond.wait()
                    if self._stopping:
                        return
                    while self.waiting and len(self.streams) + len(self._admitting) < len(self.slots):
                        self._admitting.append(self.waiting.popleft())
                try:
                    self._admit(gen, self._admitting)
                    self._drop_cancelled(gen)
                    if self.streams:
                        self._step(gen)
                except Exception as e:  # every running job is answered with the error, the server goes on
                    for stream in list(self.streams.values()):
                        stream.job.emit("error", f"generation failed: {type(e).__name__}: {e}")
                        stream.count()
                    try:
                        if self.streams:
                            gen.remove(list(self.streams))
                    except Exception:  # a generator left broken by the failure: a fresh one
                        gen.close()
                        gen = self._generator()
                    self.streams.clear()
                finally:
                    self._admitting.clear()
        except Exception as e:  # mlx-lm could not start or recover: nothing would decode what is queued
            self.give_up(f"mlx-lm stopped: {type(e).__name__}: {e}")
        finally:
            # Freed here, on this thread, with its cycles: at exit a collection on another thread destroys
            # MLX objects under the interpreter's feet (std::terminate, exit status 134).
            if gen is not None:
                gen.close()
            del gen
            self.streams.clear()
            gc.collect()

    def _admit(self, gen, jobs: list[Job]) -> None:
        import mlx.core as mx

        for job in jobs:
            p = job.params
            try:
                sampler, processors = sampler_of(p)
                if not self.streams:  # alone: its seed makes it reproducible
                    mx.random.seed(p.seed)
                uid = gen.insert([p.tokens], max_tokens=[p.max_tokens], samplers=[sampler],
                                 logits_processors=[processors])[0]
            except Exception as e:  # this job alone is answered with the error
                job.emit("error", f"generation failed: {type(e).__name__}: {e}")
                continue
            self.streams[uid] = _Stream(job, self.model.tokenizer.detokenizer, self.metrics)

    def _drop_cancelled(self, gen) -> None:
        gone = [uid for uid, s in self.streams.items() if s.job.cancelled.is_set()]
        if gone:
            gen.remove(gone)
            for uid in gone:
                self.streams.pop(uid).count()

    def _step(self, gen) -> None:
        for r in gen.next_generated():
            stream = self.streams.get(r.uid)
            if stream is None:
                continue
            if stream.token(int(r.token), r.finish_reason):
                del self.streams[r.uid]
                if r.finish_reason is None:  # a stop string: mlx-lm would go on
                    gen.remove([r.uid])
                stream.job.emit(*stream.result)

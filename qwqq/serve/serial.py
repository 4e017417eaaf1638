"""One request at a time: the scheduler for backends without a batch API here (transformers and GPTQ
folders, and MLX models whose caches mlx-lm cannot batch), and `ModelEngine`, what the routes ask of an
MLX or transformers model.

`SerialScheduler` has the interface the app uses (submit, cancel, stop, depth, running, slots), like
qwqq.serve.batch.BatchScheduler, over a model with `stream_tokens(tokens, sampling, max_tokens)` (text
pieces; then `finish_reason` and `n_generated`). One thread takes the waiting jobs in turn; stop strings
are held back and cut as in the batch scheduler, and a job whose client went away stops at its next piece.
"""

from __future__ import annotations

from qwqq.run.sampling import Sampling
from qwqq.serve.engine import Answer, Job, Scheduler
from qwqq.serve.metrics import Metrics


class ModelEngine:
    """What the routes ask of a model served by mlx-lm or transformers: tokens, context, vocabulary. GBNF
    grammars are llama.cpp's, refused here (a 400)."""

    def __init__(self, model, backend: str, penalties: tuple[str, ...] = ()):
        self.model, self.backend, self.penalties = model, backend, penalties  # penalties: the ones it applies
        self.n_ctx = model.n_ctx
        self.n_vocab = len(model.tokenizer)

    def tokens(self, text: str) -> list[int]:
        return self.model.tokens(text)

    def grammar(self, text: str):
        raise ValueError(f"GBNF grammars are llama.cpp's; this server runs the model on {self.backend}")


def sampling_of(p) -> Sampling:
    """A request's GenParams as the Sampling a backend's stream takes (temperature 0: greedy)."""
    return Sampling(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p,
                    presence_penalty=p.presence_penalty, seed=p.seed, source="request")


class SerialScheduler(Scheduler):
    def __init__(self, model, max_queue: int, metrics: Metrics):
        super().__init__(max_queue, metrics, "qwqq-serve-serial")
        self.model = model
        self.slots = [None]  # one: what /metrics reports as qwqq_slots
        self.current: Job | None = None

    def _running_jobs(self) -> list[Job]:
        current = self.current
        return [current] if current is not None else []

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self.waiting:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self.current = self.waiting.popleft()
            try:
                last = self._run(job)
            except Exception as e:  # this request is answered with the error; the server goes on
                last = ("error", f"generation failed: {type(e).__name__}: {e}")
            with self._cond:
                self.current = None  # free before the answer is: a client that sees it done finds no one running
            if last is not None:
                job.emit(*last)

    def _run(self, job: Job) -> tuple | None:
        """Stream the job's text; its last event (None for a job whose client went away)."""
        if job.cancelled.is_set():  # its client went away while it waited
            return None
        p, answer, stopped = job.params, Answer(job, self.metrics), False
        pieces = self.model.stream_tokens(p.tokens, sampling_of(p), p.max_tokens)
        try:
            for piece in pieces:
                answer.arrived()
                if job.cancelled.is_set():
                    break
                if answer.show(piece):
                    stopped = True
                    break
        finally:
            pieces.close()
        answer.n = self.model.n_generated
        if job.cancelled.is_set():
            answer.count()
            return None
        answer.done("stop" if stopped else (self.model.finish_reason or "stop"), flush=not stopped)
        return answer.result

"""Jobs: one request's generation parameters and the events it is answered with; `Scheduler`, the queue every
scheduler shares; `StopMatcher`, which holds back text that may be the start of a stop string, and `Answer`,
a job's answer as its tokens come (text, stop strings, usage, timing), every scheduler's.

A scheduler (`Scheduler`: qwqq.serve.batch, .mlx, .serial) decodes jobs on its own thread and talks to the event loop through
each job's asyncio queue (call_soon_threadsafe); events are ("text", str), ("done", finish_reason,
prompt_tokens, completion_tokens) and ("error", message). A full queue raises QueueFull (a 503).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from qwqq.run.chat import partial_suffix


@dataclass
class GenParams:
    tokens: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    grammar: object = None  # the backend's compiled form of a request's GBNF grammar (engine.grammar), or None


class Job:
    def __init__(self, params: GenParams, loop: asyncio.AbstractEventLoop):
        self.params, self.loop = params, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.arrived = time.monotonic()
        self.finished = False

    def emit(self, *event) -> None:
        """From the worker thread: hand one event to the request's handler."""
        if event[0] in ("done", "error"):
            self.finished = True
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is gone (shutting down): nobody is listening
            pass


class QueueFull(Exception):
    pass


class Scheduler:
    """What every scheduler shares (llama.cpp's batch, mlx-lm's batch, one at a time): the waiting queue and
    its limit, cancellation, shutdown and the decode thread. A scheduler sets `slots` and gives
    `_running_jobs()` (the jobs being decoded) and `_loop()` (its thread's body)."""

    slots: list

    def __init__(self, max_queue: int, metrics, thread_name: str):
        self.max_queue, self.metrics = max_queue, metrics
        self.waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self.failure: str | None = None  # why the loop gave up, for the requests that come after
        self._thread = threading.Thread(target=self._loop, name=thread_name, daemon=True)

    def _running_jobs(self) -> list[Job]:
        raise NotImplementedError

    def _loop(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._thread.start()

    @property
    def depth(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> int:
        return len(self._running_jobs())

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise QueueFull(self.failure or "the server is shutting down")
            if self.running + len(self.waiting) >= len(self.slots) and len(self.waiting) >= self.max_queue:
                busy = "the one slot is busy" if len(self.slots) == 1 else f"all {len(self.slots)} slots are busy"
                raise QueueFull(f"{busy} and {len(self.waiting)} requests wait already")
            self.waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job if it waits; if it decodes, it leaves before the next step."""
        if job.finished or job.cancelled.is_set():
            return
        job.cancelled.set()
        with self._cond:
            try:
                self.waiting.remove(job)
            except ValueError:
                pass
        self.metrics.cancel()

    def give_up(self, why: str) -> None:
        """From the loop, when it cannot go on: every queued and running request is answered with `why`, and
        so is every later one (a 503), rather than left waiting for a loop that is gone."""
        with self._cond:
            self._stopping, self.failure = True, why
            jobs = [*self.waiting, *self._running_jobs()]
            self.waiting.clear()
        for job in jobs:
            job.emit("error", why)

    def stop(self, timeout: float = 10.0) -> bool:
        """Cancel whatever waits or runs and end the loop; False if the loop is still inside a step after
        `timeout` (then the model must not be freed under it)."""
        with self._cond:
            self._stopping = True
            jobs = [*self.waiting, *self._running_jobs()]
            self.waiting.clear()
            self._cond.notify_all()
        for job in jobs:
            job.cancelled.set()
            job.emit("error", "the server is shutting down")
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()


class StopMatcher:
    """Feed text, get back what may be shown and whether a stop string was met (text from it on is dropped)."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.held += text
        hits = [at for at in (self.held.find(s) for s in self.stops) if at >= 0]
        if hits:
            out, self.held = self.held[: min(hits)], ""
            return out, True
        keep = max((partial_suffix(self.held, s) for s in self.stops), default=0)
        out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


class Answer:
    """One job's answer as its tokens come, whatever generates them: the time of the first one, the text
    through the stop strings, the count and timing for /metrics, and the "done" event (`result`), which the
    scheduler sends once the job has left its slot."""

    def __init__(self, job: Job, metrics):
        self.job, self.metrics = job, metrics
        self.stops = StopMatcher(job.params.stop)
        self.n, self.first, self.last = 0, None, None  # tokens generated; times of the first and the last
        self.result: tuple | None = None

    def arrived(self) -> None:
        """A token (or a piece of text) came."""
        self.last = time.monotonic()
        if self.first is None:
            self.first = self.last
            self.metrics.first_token(self.first - self.job.arrived)

    def show(self, text: str) -> bool:
        """Text for the client, stop strings held back; True when one was met (the text from it on dropped)."""
        shown, hit = self.stops.feed(text)
        if shown:
            self.job.emit("text", shown)
        return hit

    def done(self, finish: str, flush: bool = True, tail: str = "") -> bool:
        """The answer ends with `finish`: held-back text (and `tail`) sent unless a stop string ended it."""
        if flush:
            rest = self.stops.flush() + tail
            if rest:
                self.job.emit("text", rest)
        self.count()
        self.result = ("done", finish, len(self.job.params.tokens), self.n)
        return True

    def count(self) -> None:
        seconds = (self.last - self.first) if self.first is not None else 0.0
        self.metrics.finished(len(self.job.params.tokens), self.n, seconds)

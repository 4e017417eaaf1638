"""Jobs and the scheduler: a bounded queue in front of one worker thread that decodes one job at a
time on the model's single llama.cpp context.

This first slice does not batch: requests wait their turn (queue depth in /metrics) and a full queue
answers 503. A job whose client went away is dropped from the queue, or stopped at its next token
when it is the one being decoded, so the next request starts at once.

The worker talks to the event loop through each job's asyncio queue (call_soon_threadsafe); events are
("text", str), ("done", finish_reason, prompt_tokens, completion_tokens) and ("error", message).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable


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
    """One worker thread running `decode(job)` for each job in turn."""

    def __init__(self, decode: Callable[[Job], None], max_queue: int, on_cancel: Callable[[], None] = lambda: None):
        self.decode, self.max_queue, self.on_cancel = decode, max_queue, on_cancel
        self.waiting: deque[Job] = deque()
        self.running: Job | None = None
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="qwqq-serve-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def depth(self) -> int:
        return len(self.waiting)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if self.running is not None and len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already")
            self.waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job if it waits, stop it at its next token if it runs."""
        if job.finished or job.cancelled.is_set():
            return
        job.cancelled.set()
        with self._cond:
            try:
                self.waiting.remove(job)
            except ValueError:
                pass
        self.on_cancel()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel whatever waits or runs and end the worker."""
        with self._cond:
            self._stopping = True
            jobs = [*self.waiting, *([self.running] if self.running else [])]
            self.waiting.clear()
            self._cond.notify_all()
        for job in jobs:
            job.cancelled.set()
            job.emit("error", "the server is shutting down")
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self.waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self.running = self.waiting.popleft()
            try:
                if not job.cancelled.is_set():
                    self.decode(job)
            except Exception as e:  # a failed decode answers that request and the server goes on
                job.emit("error", f"generation failed: {type(e).__name__}: {e}")
            finally:
                with self._cond:
                    self.running = None

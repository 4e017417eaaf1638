"""Jobs: one request's generation parameters and the events it is answered with, and `StopMatcher`, which
holds back text that may be the start of a stop string (every scheduler's).

The scheduler (qwqq.serve.batch) decodes jobs on its own thread and talks to the event loop through
each job's asyncio queue (call_soon_threadsafe); events are ("text", str), ("done", finish_reason,
prompt_tokens, completion_tokens) and ("error", message). A full queue raises QueueFull (a 503).
"""

from __future__ import annotations

import asyncio
import threading
import time
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

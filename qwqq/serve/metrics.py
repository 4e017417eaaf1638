"""The server's counters, rendered in Prometheus' text exposition format (version 0.0.4) for /metrics.

Names follow Prometheus' conventions (qwqq_ prefix, _total for counters, base units: seconds):
requests by route and status, prompt and generated tokens, requests waiting and running, cancelled
requests, a time-to-first-token histogram (from the request's arrival: queueing and prompt processing
included) and the decode speed (tokens after the first over the time they took).
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Callable

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self, depth: Callable[[], int] = lambda: 0, running: Callable[[], int] = lambda: 0):
        self._depth, self._running, self._slots = depth, running, lambda: 0
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.cancelled = 0
        self.ttft_buckets = [0] * len(TTFT_BUCKETS)
        self.ttft_sum, self.ttft_count = 0.0, 0
        self.decode_tokens, self.decode_seconds = 0, 0.0
        self.last_decode_rate = 0.0

    def watch(self, depth: Callable[[], int], running: Callable[[], int], slots: Callable[[], int] = lambda: 1) -> None:
        """Where the queue depth, the running count and the number of slots are read from (the scheduler, once loaded)."""
        self._depth, self._running, self._slots = depth, running, slots

    def request(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[(route, status)] += 1

    def cancel(self) -> None:
        with self._lock:
            self.cancelled += 1

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft_sum += seconds
            self.ttft_count += 1
            for i, le in enumerate(TTFT_BUCKETS):
                if seconds <= le:
                    self.ttft_buckets[i] += 1

    def finished(self, prompt_tokens: int, generated: int, decode_seconds: float) -> None:
        """One generation ended: its prompt, its tokens, and the seconds from its first token to its last."""
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.generated_tokens += generated
            if generated > 1 and decode_seconds > 0:
                self.decode_tokens += generated - 1
                self.decode_seconds += decode_seconds
                self.last_decode_rate = (generated - 1) / decode_seconds

    def render(self) -> str:
        with self._lock:
            lines: list[str] = []

            def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
                lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
                lines.extend(f"{name}{labels} {_num(v)}" for labels, v in samples)

            metric("qwqq_requests_total", "counter", "HTTP requests answered, by route and status code.",
                   [(f'{{route="{r}",code="{c}"}}', n) for (r, c), n in sorted(self.requests.items())] or [("", 0)])
            metric("qwqq_prompt_tokens_total", "counter", "Prompt tokens of finished generations.", [("", self.prompt_tokens)])
            metric("qwqq_tokens_generated_total", "counter", "Tokens generated.", [("", self.generated_tokens)])
            metric("qwqq_requests_cancelled_total", "counter", "Requests whose client went away before the end.",
                   [("", self.cancelled)])
            metric("qwqq_queue_depth", "gauge", "Requests waiting for a free slot.", [("", self._depth())])
            metric("qwqq_requests_running", "gauge", "Requests being decoded (slots in use).", [("", self._running())])
            metric("qwqq_slots", "gauge", "Slots: requests that can be decoded together in one batch.", [("", self._slots())])
            cumulative = [(f'{{le="{_num(le)}"}}', n) for le, n in zip(TTFT_BUCKETS, self.ttft_buckets)]
            metric("qwqq_time_to_first_token_seconds", "histogram",
                   "Seconds from a request's arrival to its first generated token.", [])
            name = "qwqq_time_to_first_token_seconds"
            lines.extend(f"{name}_bucket{labels} {n}" for labels, n in cumulative)
            lines += [f'{name}_bucket{{le="+Inf"}} {self.ttft_count}', f"{name}_sum {_num(self.ttft_sum)}",
                      f"{name}_count {self.ttft_count}"]
            metric("qwqq_decode_tokens_total", "counter", "Tokens generated after each request's first.",
                   [("", self.decode_tokens)])
            metric("qwqq_decode_seconds_total", "counter", "Seconds spent generating those tokens.",
                   [("", self.decode_seconds)])
            metric("qwqq_decode_tokens_per_second", "gauge", "Decode speed of the last finished request.",
                   [("", self.last_decode_rate)])
            return "\n".join(lines) + "\n"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))

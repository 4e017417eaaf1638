"""Decoding one job on llama-cpp-python's `Llama` (the model qwqq.run.backends.llamacpp loads).

Token by token through `Llama.generate`, which keeps the context between calls and reuses the longest
common prefix of the previous prompt (a chat's earlier turns are not evaluated again). Here: the
sampler settings and seed, EOS (any end-of-generation token), stop strings (held back while they may
still be starting), UTF-8 split across tokens, max_tokens, exact token counts, and a cancel flag
looked at before each token. Stopping between tokens leaves the context consistent (the last sampled
token is not evaluated yet), so the next request still reuses its prefix.
"""

from __future__ import annotations

import codecs
import time

from qwqq.run.template import with_bos
from qwqq.serve.engine import Job
from qwqq.serve.metrics import Metrics


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
        keep = max((_partial(self.held, s) for s in self.stops), default=0)
        out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


def _partial(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a proper start of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-n:]):
            return n
    return 0


class LlamaCppEngine:
    """Tokenizes (safe from any thread: llama.cpp's tokenizer only reads the vocabulary) and decodes
    (on the scheduler's worker thread only)."""

    def __init__(self, model, metrics: Metrics):
        import llama_cpp

        self.model, self.llm, self.metrics = model, model.llm, metrics
        self._is_eog = lambda t: bool(llama_cpp.llama_vocab_is_eog(self.llm._model.vocab, t))
        self.n_ctx = self.llm.n_ctx()

    def tokens(self, text: str) -> list[int]:
        """A rendered chat prompt or a raw completion prompt: special tokens parsed, BOS as the model wants."""
        tokens = self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        return with_bos(tokens, self.llm.token_bos(), bool(self.llm._model.add_bos_token()))

    def grammar(self, text: str):
        """A request's GBNF grammar (llama-server's `grammar` field) for decode; ValueError if llama.cpp refuses it."""
        import llama_cpp

        grammar = llama_cpp.LlamaGrammar.from_string(text)
        sampler = llama_cpp.llama_sampler_init_grammar(self.llm._model.vocab, text.encode(), grammar._root.encode())
        if not sampler:
            raise ValueError("llama.cpp cannot parse this GBNF grammar")
        llama_cpp.llama_sampler_free(sampler)
        return grammar

    def decode(self, job: Job) -> None:
        p = job.params
        llm = self.llm
        llm.set_seed(p.seed)
        gen = llm.generate(p.tokens, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p, temp=p.temperature,
                           repeat_penalty=1.0, presence_penalty=p.presence_penalty,
                           frequency_penalty=p.frequency_penalty, grammar=p.grammar)
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopMatcher(p.stop)
        n, finish, first, last = 0, "length", None, None
        try:
            for token in gen:
                if job.cancelled.is_set():
                    finish = None
                    break
                last = time.monotonic()
                if first is None:
                    first = last
                    self.metrics.first_token(first - job.arrived)
                if self._is_eog(token):
                    finish = "stop"
                    break
                n += 1
                text, hit = stops.feed(utf8.decode(llm.detokenize([token])))
                if text:
                    job.emit("text", text)
                if hit:
                    finish = "stop"
                    stops = None
                    break
                if n >= p.max_tokens:
                    break
        except BaseException:
            llm.reset()  # a failure inside llama.cpp may leave the context half-updated: start the next one afresh
            raise
        finally:
            gen.close()
            self.metrics.finished(len(p.tokens), n, (last - first) if first is not None else 0.0)
        if finish is None:
            return  # cancelled: nobody is listening
        if stops is not None:
            tail = stops.flush() + utf8.decode(b"", final=True)
            if tail:
                job.emit("text", tail)
        job.emit("done", finish, len(p.tokens), n)

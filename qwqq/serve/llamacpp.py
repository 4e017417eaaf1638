"""The llama-cpp-python layer under the batch engine (qwqq.serve.batch).

`LlamaCppEngine` wraps the model `qwqq.run.backends.llamacpp` loaded: it tokenizes (safe from any
thread: llama.cpp's tokenizer only reads the vocabulary), checks a request's GBNF grammar, and swaps the
`Llama`'s own context for one whose KV cache holds `parallel` sequences (n_seq_max; one unified pool, as
llama-server's default, or a share of the context per sequence, as its --parallel N --no-kv-unified). `sampler_chain` builds one request's llama_sampler chain.
"""

from __future__ import annotations

import contextlib

from qwqq.run.sampling import PENALTY_LAST_N
from qwqq.run.template import with_bos
from qwqq.serve.engine import GenParams



class LlamaCppEngine:
    """The loaded model with a context for `parallel` sequences. Everything but tokens() and grammar()
    (and the text of a token) is for the decode loop's thread only."""

    def __init__(self, model, parallel: int = 1, unified: bool = True):
        import llama_cpp

        self.model, self.llm = model, model.llm
        self.vocab = self.llm._model.vocab
        self.parallel = parallel
        self.ctx = _shared_context(self.llm, parallel, unified)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        # What one slot may use, as llama-server's n_ctx_slot: the whole context when the KV cells are one
        # pool shared by the slots, else its share; never more than the model's training length.
        self.n_ctx = min(llama_cpp.llama_n_ctx_seq(self.ctx), self.llm._model.n_ctx_train() or 1 << 30)
        self.n_batch = llama_cpp.llama_n_batch(self.ctx)
        self.n_vocab = self.llm.n_vocab()
        self.backend, self.penalties = "llama.cpp", ("presence_penalty", "frequency_penalty")

    def tokens(self, text: str) -> list[int]:
        """A rendered chat prompt or a raw completion prompt: special tokens parsed, BOS as the model wants."""
        tokens = self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        return with_bos(tokens, self.llm.token_bos(), bool(self.llm._model.add_bos_token()))

    def piece(self, token: int) -> bytes:
        return self.llm.detokenize([token])

    def is_eog(self, token: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def grammar(self, text: str):
        """A request's GBNF grammar (llama-server's `grammar` field) for decode; ValueError if llama.cpp refuses it."""
        import llama_cpp

        grammar = llama_cpp.LlamaGrammar.from_string(text, verbose=False)
        sampler = llama_cpp.llama_sampler_init_grammar(self.vocab, text.encode(), grammar._root.encode())
        if not sampler:
            raise ValueError("llama.cpp cannot parse this GBNF grammar")
        llama_cpp.llama_sampler_free(sampler)
        return grammar


def _shared_context(llm, parallel: int, unified: bool):
    """Replace the Llama's context (freed first, so its KV memory is not held twice) by one with the same
    settings whose KV cache holds `parallel` sequences: one unified pool of n_ctx cells, or n_ctx / parallel
    cells of its own for each."""
    import llama_cpp
    from llama_cpp import _internals

    params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
    params.n_seq_max = parallel
    params.kv_unified = unified
    llm._ctx.close()
    ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=llm.verbose)
    llm._ctx = llm._stack.enter_context(contextlib.closing(ctx))
    return ctx.ctx


def sampler_chain(p: GenParams, vocab):
    """One request's sampler, in llama-cpp-python's order: penalties, grammar, then greedy (temperature 0)
    or top_k, top_p, min_p, temperature and a draw seeded with the request's seed. Free it with
    llama_sampler_free."""
    import llama_cpp as L

    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    parts = []
    if p.presence_penalty or p.frequency_penalty:
        parts.append(L.llama_sampler_init_penalties(PENALTY_LAST_N, 1.0, p.frequency_penalty, p.presence_penalty))
    if p.grammar is not None:
        parts.append(L.llama_sampler_init_grammar(vocab, p.grammar._grammar.encode(), p.grammar._root.encode()))
    if p.temperature <= 0:
        parts.append(L.llama_sampler_init_greedy())
    else:
        parts += [L.llama_sampler_init_top_k(p.top_k), L.llama_sampler_init_top_p(p.top_p, 1),
                  L.llama_sampler_init_min_p(p.min_p, 1), L.llama_sampler_init_temp(p.temperature),
                  L.llama_sampler_init_dist(p.seed)]
    if not chain or not all(parts):  # llama.cpp could not make one: free what it did make
        for part in filter(None, parts):
            L.llama_sampler_free(part)
        if chain:
            L.llama_sampler_free(chain)
        raise ValueError("llama.cpp could not build this request's sampler")
    for part in parts:
        L.llama_sampler_chain_add(chain, part)  # the chain owns it from here
    return chain

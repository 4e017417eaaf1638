"""The llama.cpp backend (llama-cpp-python): runs GGUF files, streamed.

The prompt comes from the model's own chat template (GGUF `tokenizer.chat_template`),
rendered here in jinja2's ImmutableSandboxedEnvironment with the same settings as
Hugging Face transformers, so qwqq knows the exact prompt (and whether it already
opened a <think> block). The prompt is tokenized by llama.cpp and fed as tokens.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import random
import re
from collections import deque
from pathlib import Path
from typing import Iterator

from qwqq.run import experts
from qwqq.run.backends import LoadOptions
from qwqq.run.backends.llamacpp_buft import overridden_load
from qwqq.run.template import ChatTemplate, prompt_room, with_bos
from qwqq.errors import QwqqError

# Used when a GGUF carries no chat template: ChatML, what every Qwen model speaks.
INSTALL_HINT = 'install it with: pip install "qwqq[llama]"'
_ERROR_LOG_LEVEL = 4  # GGML_LOG_LEVEL_ERROR in ggml.h (llama-cpp-python's _logger.py has an older numbering)
_CONTINUE_LOG_LEVEL = 5
_OVERRIDDEN = re.compile(r"tensor (\S+) \(.*\) buffer type overridden to (\S+)")


KV_GGML_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}  # ggml_type ids for type_k / type_v


def _usable_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


# ---------------------------------------------------------------- llama.cpp logging
class _QuietLog:
    """Replaces llama-cpp-python's log callback: drops llama.cpp's chatter but keeps
    the last error lines, so a failed load can say why in one line."""

    def __init__(self):
        import llama_cpp

        self.errors: deque[str] = deque(maxlen=8)
        self.overridden: list[str] = []  # tensors llama.cpp placed by a buffer-type override, as its log says
        self._last_level = 0

        @llama_cpp.llama_log_callback
        def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            if level != _CONTINUE_LOG_LEVEL:
                self._last_level = level
            if self._last_level == _ERROR_LOG_LEVEL:
                line = text.decode("utf-8", "replace").strip()
                if line:
                    self.errors.append(line)
            elif b"buffer type overridden" in text and (m := _OVERRIDDEN.search(text.decode("utf-8", "replace"))):
                self.overridden.append(m.group(1))

        self._callback = callback  # keep a reference: llama.cpp holds a raw pointer
        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))

    def reason(self) -> str:
        """The first error line, without llama.cpp's function-name prefixes."""
        if not self.errors:
            return ""
        return re.sub(r"^(\w+: )?(error loading model: )?", "", self.errors[0])


_quiet: _QuietLog | None = None


def _silence_llama_cpp() -> _QuietLog:
    global _quiet
    if _quiet is None:
        _quiet = _QuietLog()
    return _quiet


# ---------------------------------------------------------------- the model
class LlamaCppChatModel:
    def __init__(self, llm, path: Path, overrides=None, overridden: list[str] | None = None):
        self.llm, self.path = llm, path
        self._overrides = overrides  # the tensor_buft_overrides array: llama.cpp keeps a pointer to it
        self.overridden = overridden  # tensors llama.cpp moved by it (None: not known, its log went elsewhere)
        self.metadata: dict[str, str] = dict(llm.metadata)
        self.finish_reason: str | None = None
        self._bos_id, self._eos_id = llm.token_bos(), llm.token_eos()
        self.template = ChatTemplate(self.metadata.get("tokenizer.chat_template"), self._token_text(self._bos_id),
                                      self._token_text(self._eos_id), path)

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self.llm.detokenize([token], special=True).decode("utf-8", "replace")

    def render(self, messages: list[dict]) -> str:
        return self.template.render(messages)

    def _tokens(self, prompt: str) -> list[int]:
        tokens = self.llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        return with_bos(tokens, self._bos_id, bool(self.llm._model.add_bos_token()))

    def stream_chat(self, messages: list[dict], sampling, max_tokens: int) -> Iterator[str]:
        self.finish_reason = None
        tokens = self._tokens(self.render(messages))
        room = prompt_room(len(tokens), self.llm.n_ctx())
        seed = sampling.seed if sampling.seed is not None else random.randrange(2**31)
        greedy = sampling.greedy
        stream = self.llm.create_completion(
            tokens,
            max_tokens=min(max_tokens, room),
            temperature=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            top_k=1 if greedy else sampling.top_k,
            min_p=0.0 if greedy else sampling.min_p,
            presence_penalty=0.0 if greedy else sampling.presence_penalty,  # over the last 64 tokens (last_n_tokens_size)
            repeat_penalty=1.0,
            seed=seed,
            stream=True,
        )
        done = False
        try:
            for chunk in stream:
                choice = chunk["choices"][0]
                if choice.get("text"):
                    yield choice["text"]
                if choice.get("finish_reason"):
                    self.finish_reason = choice["finish_reason"]
            done = True
        finally:
            stream.close()
            if not done:  # stopped mid-answer (Ctrl-C): the cached state may be half-updated
                self.llm.reset()

    def close(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.close()


# ---------------------------------------------------------------- the backend
class LlamaCppBackend:
    name = "llama.cpp"
    sampling_extras = ("presence_penalty",)  # what it applies beyond temperature, top_p, top_k, min_p
    formats = ("gguf",)

    def unavailable_reason(self) -> str | None:
        if importlib.util.find_spec("llama_cpp") is None:
            return f"llama-cpp-python is not installed; {INSTALL_HINT}"
        return None

    def load(self, path: Path, options: LoadOptions) -> LlamaCppChatModel:
        reason = self.unavailable_reason()
        if reason:
            raise QwqqError(reason)
        from llama_cpp import Llama

        patterns = expert_patterns(path, options.n_cpu_moe)
        quiet = None if options.debug else _silence_llama_cpp()
        if quiet:
            quiet.errors.clear()
            quiet.overridden.clear()
        threads = options.threads or _usable_threads()
        try:
            with overridden_load(patterns) as overrides:
                llm = Llama(
                    model_path=str(path),
                    n_ctx=options.ctx,
                    n_gpu_layers=options.n_gpu_layers,
                    tensor_split=options.tensor_split,
                    n_threads=threads,
                    n_threads_batch=threads,
                    seed=options.seed if options.seed is not None else random.randrange(2**31),
                    flash_attn=options.flash_attn,
                    type_k=KV_GGML_TYPES[options.kv_type],
                    type_v=KV_GGML_TYPES[options.kv_type],
                    verbose=options.debug,
                )
        except ValueError as e:
            why = (quiet.reason() if quiet else "") or str(e)
            raise QwqqError(f"llama.cpp cannot load this model: {why}", path) from None
        return LlamaCppChatModel(llm, path, overrides, list(quiet.overridden) if quiet else None)


def expert_patterns(path: Path, n_cpu_moe: int) -> list[str]:
    """llama.cpp's --n-cpu-moe / --cpu-moe patterns for this file, after checking N against its layers."""
    experts.check_file(path, n_cpu_moe)
    return experts.expert_patterns(n_cpu_moe)


backend = LlamaCppBackend()

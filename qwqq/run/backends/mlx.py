"""The mlx backend (mlx-lm): runs MLX folders (Apple Silicon GPU; Linux CPU with mlx[cpu], slowly).

The prompt is the model's own chat template rendered exactly as the llama.cpp backend renders it
(jinja2's ImmutableSandboxedEnvironment, transformers' settings), so both backends send the same
text and qwqq knows whether the template already opened a <think> block. Tokens are fed to
mlx_lm.stream_generate with a sampler from mlx_lm.sample_utils.make_sampler built from the same
Sampling values (qwqq.run.sampling) the llama.cpp backend uses.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import platform
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from qwqq.run.backends import LoadOptions
from qwqq.run.folder import folder_metadata
from qwqq.run.sampling import PENALTY_LAST_N
from qwqq.run.template import ChatTemplate, prompt_room, with_bos
from qwqq.errors import QwqqError

INSTALL_HINT = 'install it with: pip install "qwqq[mlx]"'


@contextmanager
def _quiet(enabled: bool):
    """Keep transformers' and Python's warnings (tokenizer notices) off the terminal while loading."""
    if not enabled:
        yield
        return
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ---------------------------------------------------------------- the model
class MLXChatModel:
    def __init__(self, model, tokenizer, path: Path, ctx: int):
        self.model, self.tokenizer, self.path = model, tokenizer, path
        self.metadata = folder_metadata(path)
        self.finish_reason: str | None = None
        self.n_generated = 0  # tokens of the last answer
        max_pos = int(float(self.metadata.get("max_position_embeddings", 0) or 0))
        self.n_ctx = ctx if ctx > 0 else (max_pos or 4096)
        self.template = ChatTemplate(getattr(tokenizer, "chat_template", None),
                                      getattr(tokenizer, "bos_token", None) or "",
                                      getattr(tokenizer, "eos_token", None) or "", path)
        self._bos_id = getattr(tokenizer, "bos_token_id", None)

    def render(self, messages: list[dict]) -> str:
        return self.template.render(messages)

    def tokens(self, prompt: str) -> list[int]:
        tokens = list(self.tokenizer.encode(prompt, add_special_tokens=False))
        return with_bos(tokens, self._bos_id, bool(getattr(self.tokenizer, "add_bos_token", False)))

    def stream_chat(self, messages: list[dict], sampling, max_tokens: int) -> Iterator[str]:
        return self.stream_tokens(self.tokens(self.render(messages)), sampling, max_tokens)

    def stream_tokens(self, tokens: list[int], sampling, max_tokens: int) -> Iterator[str]:
        """The answer to a tokenized prompt, as text pieces; then finish_reason and n_generated are set."""
        import mlx.core as mx
        from mlx_lm import stream_generate
        from mlx_lm.sample_utils import make_logits_processors, make_sampler

        self.finish_reason, self.n_generated = None, 0
        room = prompt_room(len(tokens), self.n_ctx)
        mx.random.seed(sampling.seed if sampling.seed is not None else random.randrange(2**31))
        greedy = sampling.greedy or sampling.temperature <= 0
        sampler = make_sampler(
            temp=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            min_p=0.0 if greedy else sampling.min_p,
            top_k=0 if greedy else sampling.top_k,
        )
        # over the last PENALTY_LAST_N tokens, as llama.cpp's; like it, at temperature 0 too (only --greedy turns it off)
        penalty = 0.0 if sampling.greedy else sampling.presence_penalty
        processors = make_logits_processors(presence_penalty=penalty, presence_context_size=PENALTY_LAST_N) if penalty else None
        for response in stream_generate(self.model, self.tokenizer, mx.array(tokens), max_tokens=min(max_tokens, room),
                                        sampler=sampler, logits_processors=processors):
            # mlx-lm counts the end-of-generation token it stopped at; qwqq (as llama.cpp) does not
            self.n_generated = response.generation_tokens - (response.finish_reason == "stop")
            if response.text:
                yield response.text
            if response.finish_reason:
                self.finish_reason = response.finish_reason

    def close(self) -> None:
        self.model = self.tokenizer = None
        gc.collect()  # the model's cycles go now, on this thread, not in a collection at exit on another one
        try:
            import mlx.core as mx

            mx.clear_cache()
        except Exception:  # freeing is best effort
            pass


# ---------------------------------------------------------------- the backend
class MLXBackend:
    name = "mlx"
    sampling_extras = ("presence_penalty",)  # mlx-lm's logits processor
    formats = ("mlx",)

    def unavailable_reason(self) -> str | None:
        system = platform.system()
        if system == "Darwin" and platform.machine() != "arm64":
            return "MLX needs Apple Silicon (this Mac has an Intel CPU); quantize to GGUF and use llama.cpp instead"
        if system not in ("Darwin", "Linux"):
            return f"MLX runs on macOS (Apple Silicon) and Linux, not {system}; quantize to GGUF and use llama.cpp instead"
        missing = [m for m in ("mlx", "mlx_lm") if importlib.util.find_spec(m) is None]
        if missing:
            return f"{' and '.join(n.replace('_', '-') for n in missing)} not installed; {INSTALL_HINT}"
        return None

    def load(self, path: Path, options: LoadOptions) -> MLXChatModel:
        reason = self.unavailable_reason()
        if reason:
            raise QwqqError(reason)
        path = Path(path)
        if not path.is_dir():
            raise QwqqError("an MLX model is a folder (config.json + safetensors)", path)
        try:
            with _quiet(not options.debug):
                from mlx_lm import load

                model, tokenizer = load(str(path))
        except (ValueError, KeyError, TypeError, FileNotFoundError, OSError, ImportError) as e:
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise QwqqError(f"mlx-lm cannot load this model: {why}", path) from None
        return MLXChatModel(model, tokenizer, path, options.ctx)


backend = MLXBackend()

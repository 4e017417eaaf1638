"""The transformers backend (PyTorch): runs GPTQ folders and unquantized (bf16/fp16/fp32) Hugging Face
folders, streamed, on CUDA, Apple's MPS or the CPU.

Formats (how each is loaded: qwqq.run.backends.transformers_weights):
- "gptq": a folder whose config.json has quantization_config.quant_method "gptq" (what
  `qwqq quantize --format gptq` writes, and most published GPTQ models): on GPTQModel's kernels where GPTQModel
  and optimum are installed, else its weights dequantized into float in a plain transformers model (the same
  weights, more memory, slower; a note on stderr says so).
- "safetensors": an unquantized folder, loaded with AutoModelForCausalLM.from_pretrained. `auto` does not
  pick this backend for such folders (qwqq is a quantization tool: `auto` says to quantize first); it runs
  with an explicit `--backend transformers`.

Never remote code (trust_remote_code=False everywhere), never pickles: qwqq.source validates every
safetensors header first and refuses folders that only hold .bin/.pt files, and from_pretrained is told
use_safetensors=True.

Device: CUDA, else MPS, else the CPU (--n-gpu-layers 0: the CPU). Dtypes: on a GPU the checkpoint's own
(GPTQ: float16); on the CPU float32, except a bf16 checkpoint, which stays bf16 (float32 would double its
memory). Dequantized GPTQ weights are float32 on the CPU, i.e. exactly dequantize's values (on a GPU they are
rounded to float16, as GPTQModel's kernels round them). Loaders' chatter (GPTQModel logs on stdout, which
carries only the answer) is muted unless --debug, which sends it to stderr.

The prompt is the model's chat template rendered as the llama.cpp and mlx backends render it
(qwqq.run.template, Jinja's immutable sandbox); its tokens go through a plain token loop with a KV cache
(a transformers DynamicCache, passed as the `cache` argument the models' forward takes), sampled with the
Sampling values (temperature, top_k, top_p, min_p in the order transformers' generate applies them; greedy =
argmax); text is detokenized incrementally, so multi-byte characters are never split. LoadOptions.ctx bounds
prompt + answer (0: the model's max_position_embeddings).

`--load-in-4bit` (LoadOptions.load_in_4bit): an unquantized folder quantized while it loads, by bitsandbytes
(NF4, double-quantized scales, blocks of 64, as QLoRA), on whatever device bitsandbytes supports (CUDA, and the
CPU since bitsandbytes 0.46; where it cannot, its error is one line).

Other quantization methods (AWQ, FP8, ...) are refused in one line.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import random
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from qwqq.errors import QwqqError, UnsupportedError
from qwqq.run.backends import LoadOptions
from qwqq.run.backends.transformers_weights import (dequantized_note, load_dequantized, load_gptq_kernels,
                                                     load_unquantized, missing_kernels, one_line, release)
from qwqq.run.folder import folder_metadata
from qwqq.run.template import ChatTemplate, prompt_room, with_bos
from qwqq.source import open_checkpoint

INSTALL_HINT = 'install it with: pip install "qwqq[gptq]"'
NF4_HINT = 'pip install "qwqq[nf4]"'
KERNEL_FALLBACK_LOGGER = "transformers.integrations.hub_kernels"  # "falling back to its reference implementation"


@contextmanager
def _stdout_to(target) -> Iterator[None]:
    """Send stdout (Python's and file descriptor 1) to `target` (a text file): GPTQModel logs and prints its banner
    on stdout, which in `qwqq run` carries the answer only."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no file descriptor 1 (an embedding host): Python's stdout only
        saved = None
    try:
        if saved is not None:
            target.flush()
            os.dup2(target.fileno(), 1)
        with contextlib.redirect_stdout(target):
            yield
    finally:
        sys.stdout.flush()
        target.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


@contextmanager
def _quiet(enabled: bool):
    """Keep the loaders' chatter off the terminal: transformers' warnings, notices and progress bars, library
    log records below ERROR (torch, torchao) and anything printed on stdout (GPTQModel's banner and log);
    with --debug, that stdout output goes to stderr instead."""
    from transformers.utils import logging as tlog

    if not enabled:
        with _stdout_to(sys.stderr):
            yield
        return
    level = tlog.get_verbosity()
    bars = tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    logging.disable(logging.WARNING)
    try:
        with open(os.devnull, "w") as devnull, _stdout_to(devnull), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)
        tlog.set_verbosity(level)
        if bars:
            tlog.enable_progress_bar()


def pick_device(options: LoadOptions):
    """CUDA, then MPS, then the CPU; --n-gpu-layers 0 keeps the model on the CPU."""
    import torch

    if options.n_gpu_layers == 0:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(config: dict, device, gptq: bool):
    import torch

    name = str(config.get("dtype") or config.get("torch_dtype") or ("float16" if gptq else "bfloat16"))
    stored = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(name, torch.float16)
    if device.type == "cpu":
        return torch.bfloat16 if stored == torch.bfloat16 and not gptq else torch.float32
    if stored == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return stored


# ---------------------------------------------------------------- the model
class TransformersChatModel:
    def __init__(self, model, tokenizer, path: Path, ctx: int, weights: str, chat_template: str | None):
        self.model, self.tokenizer, self.path = model, tokenizer, path
        self.device = next(model.parameters()).device
        self.metadata = folder_metadata(path)
        self.metadata.update({"transformers.weights": weights, "transformers.device": str(self.device),
                              "transformers.dtype": str(next(model.parameters()).dtype).removeprefix("torch.")})
        self.finish_reason: str | None = None
        self.generated: list[int] = []  # the token ids of the last answer
        max_pos = int(float(self.metadata.get("max_position_embeddings", 0) or 0))
        self.n_ctx = ctx if ctx > 0 else (max_pos or 4096)
        self.template = ChatTemplate(chat_template or getattr(tokenizer, "chat_template", None),
                                      getattr(tokenizer, "bos_token", None) or "",
                                      getattr(tokenizer, "eos_token", None) or "", path)
        self._bos_id = getattr(tokenizer, "bos_token_id", None)
        self.eos_ids = self._eos_ids()

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        gen = getattr(self.model, "generation_config", None)
        for source in (getattr(gen, "eos_token_id", None), self.metadata_eos(), getattr(self.tokenizer, "eos_token_id", None)):
            for t in source if isinstance(source, (list, tuple)) else [source]:
                if isinstance(t, int) and t >= 0:
                    ids.add(t)
        return ids

    def metadata_eos(self):
        try:
            gen = json.loads((self.path / "generation_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return gen.get("eos_token_id") if isinstance(gen, dict) else None

    def render(self, messages: list[dict]) -> str:
        return self.template.render(messages)

    def tokens(self, prompt: str) -> list[int]:
        tokens = list(self.tokenizer.encode(prompt, add_special_tokens=False))
        return with_bos(tokens, self._bos_id, bool(getattr(self.tokenizer, "add_bos_token", False)))

    def _forward(self, ids, cache, first: bool):
        import torch

        with torch.inference_mode():
            kw = {"input_ids": ids, "cache": cache, "use_cache": True}
            if first:
                try:
                    return self.model(**kw, logits_to_keep=1).logits[:, -1, :]
                except TypeError:  # an architecture without logits_to_keep
                    pass
            return self.model(**kw).logits[:, -1, :]

    def _next(self, logits, sampling, generator, greedy: bool):
        import torch

        logits = logits.float()
        if greedy:
            return int(torch.argmax(logits, dim=-1)[0])
        from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper,
                                                            TopKLogitsWarper, TopPLogitsWarper)

        warpers = [TemperatureLogitsWarper(sampling.temperature)]
        if sampling.top_k and sampling.top_k > 0:
            warpers.append(TopKLogitsWarper(int(sampling.top_k)))
        if 0 < sampling.top_p < 1:
            warpers.append(TopPLogitsWarper(float(sampling.top_p)))
        if 0 < sampling.min_p <= 1:
            warpers.append(MinPLogitsWarper(float(sampling.min_p)))
        for w in warpers:
            logits = w(None, logits)
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=generator)[0, 0])

    @property
    def n_generated(self) -> int:
        return len(self.generated)

    def stream_chat(self, messages: list[dict], sampling, max_tokens: int) -> Iterator[str]:
        return self.stream_tokens(self.tokens(self.render(messages)), sampling, max_tokens)

    def stream_tokens(self, tokens: list[int], sampling, max_tokens: int) -> Iterator[str]:
        """The answer to a tokenized prompt, as text pieces; then finish_reason and n_generated are set."""
        import torch
        from transformers import DynamicCache

        self.finish_reason = None
        self.generated = []
        room = prompt_room(len(tokens), self.n_ctx)
        limit = min(max_tokens, room)
        greedy = sampling.greedy or sampling.temperature <= 0
        generator = torch.Generator(device=self.device)
        generator.manual_seed(sampling.seed if sampling.seed is not None else random.randrange(2**31))
        cache = DynamicCache(config=self.model.config)
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        text = _Detokenizer(self.tokenizer)
        logits = self._forward(ids, cache, first=True)
        if cache.get_seq_length() == 0:  # the model took no `cache` argument: each step would forget the last
            import transformers

            raise QwqqError(f"transformers {transformers.__version__} does not take the KV cache as `cache`; "
                            "qwqq needs a newer one: pip install -U transformers")
        while True:
            token = self._next(logits, sampling, generator, greedy)
            if token in self.eos_ids:
                self.finish_reason = "stop"
                break
            self.generated.append(token)
            piece = text.add(token)
            if piece:
                yield piece
            if len(self.generated) >= limit:
                self.finish_reason = "length"
                break
            logits = self._forward(torch.tensor([[token]], dtype=torch.long, device=self.device), cache, first=False)
        rest = text.flush()
        if rest:
            yield rest

    def close(self) -> None:
        model, self.model, self.tokenizer = self.model, None, None
        if model is not None:
            release(model)
            try:
                import torch

                del model
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except Exception:  # freeing is best effort
                pass


class _Detokenizer:
    """Incremental decoding (as vLLM and TGI do it): text appears once its bytes form whole characters."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids = tokenizer, []
        self.prefix = self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return now[len(before):] if len(now) > len(before) else ""


# ---------------------------------------------------------------- the backend
class TransformersBackend:
    name = "transformers"
    formats = ("gptq", "safetensors")
    auto_formats = ("gptq",)  # `--backend auto` on an unquantized folder says to quantize it first

    def unavailable_reason(self) -> str | None:
        missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
        if missing:
            return f"{' and '.join(missing)} not installed; {INSTALL_HINT}"
        return None

    def load(self, path: Path, options: LoadOptions) -> TransformersChatModel:
        reason = self.unavailable_reason()
        if reason:
            raise QwqqError(reason)
        path = Path(path)
        if not path.is_dir():
            raise QwqqError("the transformers backend runs a model folder (config.json + *.safetensors), not a file", path)
        ckpt = open_checkpoint(path)  # validates config.json and every safetensors header; refuses pickle-only folders
        qcfg = ckpt.config.get("quantization_config")
        method = str((qcfg or {}).get("quant_method", "")).lower() if isinstance(qcfg, dict) else ""
        if qcfg is not None and method != "gptq":
            raise UnsupportedError(f"quantization method {method or qcfg!r} is not supported by the transformers backend "
                                   "(it runs GPTQ and unquantized folders)", path)
        gptq = method == "gptq"
        if options.load_in_4bit:
            if qcfg is not None:
                raise QwqqError(f"is already quantized ({method}); --load-in-4bit quantizes unquantized folders", path)
            if importlib.util.find_spec("bitsandbytes") is None:
                raise QwqqError(f"--load-in-4bit needs bitsandbytes: {NF4_HINT}")
        import torch

        if options.threads > 0:
            torch.set_num_threads(options.threads)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        device = pick_device(options)
        dtype = pick_dtype(ckpt.config, device, gptq)
        missing = missing_kernels() if gptq else []
        try:
            with _quiet(not options.debug):
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
                if gptq and missing:
                    model, weights = load_dequantized(ckpt, path, device, dtype), "gptq dequantized"
                elif gptq:
                    model, weights = load_gptq_kernels(ckpt, path, device, dtype)
                else:
                    model, weights = load_unquantized(ckpt, path, device, dtype, options.load_in_4bit)
        except QwqqError:
            raise
        except (ValueError, KeyError, TypeError, OSError, RuntimeError, ImportError, AttributeError, AssertionError) as e:
            what = "GPTQModel" if gptq and not missing else "bitsandbytes" if options.load_in_4bit else "transformers"
            raise QwqqError(f"{what} cannot load this model: {one_line(e)}", path) from None
        if gptq and missing:
            print(dequantized_note(missing), file=sys.stderr)
        if not options.debug:  # a hybrid's Gated DeltaNet on transformers' reference kernels (exact): not a user's concern
            logging.getLogger(KERNEL_FALLBACK_LOGGER).setLevel(logging.ERROR)
        return TransformersChatModel(model, tokenizer, path, options.ctx, weights, ckpt.chat_template)


backend = TransformersBackend()

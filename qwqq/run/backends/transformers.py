"""The transformers backend (PyTorch): runs GPTQ folders and unquantized (bf16/fp16/fp32) Hugging Face
folders, streamed, on CUDA, Apple's MPS or the CPU.

Formats:
- "gptq": a folder whose config.json has quantization_config.quant_method "gptq" (what
  `qwqq quantize --format gptq` writes, and most published GPTQ models). With GPTQModel (and optimum,
  through which transformers loads GPTQ checkpoints) installed, it runs on GPTQModel's kernels: loaded by
  transformers' from_pretrained, or by GPTQModel.load where transformers would leave weights unloaded
  (transformers 5.23 + optimum 2.3 skip Qwen3-MoE's per-expert GPTQ linears). Without them, the packed
  weights are dequantized into float (qwqq.gptq.checkpoint.dequantize: scale[g] * (q - zero[g]), as
  the kernels compute them) and run in a plain transformers model built from
  the config without its quantization_config: the same weights, more memory, slower; a note on stderr says
  so. That model is built on the meta device and its parameters filled one tensor at a time (read from the
  validated safetensors by qwqq.source), so memory is the model's float weights plus one tensor.
- "safetensors": an unquantized folder, loaded with AutoModelForCausalLM.from_pretrained (a parameter it
  finds no weights for is an error, never a silently random weight). `auto` does not
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
(transformers' DynamicCache), sampled with the Sampling values (temperature, top_k, top_p, min_p in the order
transformers' generate applies them; greedy = argmax); text is detokenized incrementally, so multi-byte
characters are never split. LoadOptions.ctx bounds prompt + answer (0: the model's max_position_embeddings).

`--load-in-4bit` (LoadOptions.load_in_4bit): an unquantized folder quantized while it loads, by bitsandbytes
(NF4 with double-quantized scales, blocks of 64, as QLoRA; transformers' BitsAndBytesConfig), on whatever device
bitsandbytes supports (CUDA, and the CPU since bitsandbytes 0.46; where it cannot, its error is one line).
The embedding and lm_head stay in the checkpoint's dtype, as bitsandbytes leaves them.

Other quantization methods (AWQ, FP8, ...) are refused in one line.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from qwqq.run.backends import LoadOptions
from qwqq.run.template import ChatTemplate, prompt_room, with_bos
from qwqq.archs.experts import FUSED_PARAMS, PER_EXPERT, expert_weight
from qwqq.errors import QwqqError, SourceError, UnsupportedError

INSTALL_HINT = 'install it with: pip install "qwqq[gptq]"'
NF4_HINT = 'pip install "qwqq[nf4]"'
KERNEL_PACKAGES = ("gptqmodel", "optimum")  # transformers loads GPTQ checkpoints through both
GPTQ_FORMATS = ("gptq", "gptq_v2")  # checkpoint formats qwqq can dequantize (not marlin, bitblas, ...)
LAYER_PARAM = re.compile(r"^(model\.layers\.\d+\.)(.+)$")


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def missing_kernels() -> list[str]:
    """The packages transformers needs for GPTQ kernels that are not installed here."""
    return [m for m in KERNEL_PACKAGES if importlib.util.find_spec(m) is None]


def dequantized_note(missing: list[str]) -> str:
    who = " and ".join("GPTQModel" if m == "gptqmodel" else m for m in missing)
    return (f"note: {who} {'is' if len(missing) == 1 else 'are'} not installed: running the GPTQ weights dequantized "
            f"to float (same weights, more memory, slower); pip install {' '.join(missing)} for its kernels")


@contextmanager
def _stdout_to(target) -> Iterator[None]:
    """Send stdout (Python's and file descriptor 1) to `target` (a text file): GPTQModel logs and prints its banner
    on stdout, which in `qwqq run` carries the answer only."""
    import contextlib

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
    import logging
    import warnings

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


# ---------------------------------------------------------------- GPTQ weights dequantized
class DequantizedLoader:
    """Fills a meta-device transformers model with a GPTQ checkpoint's weights, dequantized, one tensor at a time."""

    def __init__(self, ckpt, qcfg: dict):
        from qwqq.gptq.packing import GPTQ_BITS
        from qwqq.source import RowReader

        self.ckpt, self.reader = ckpt, RowReader()
        try:
            self.bits = int(qcfg.get("bits", 4))
            self.group_size = int(qcfg.get("group_size", 128))
        except (TypeError, ValueError):
            raise SourceError("quantization_config bits / group_size are not numbers", ckpt.root / "config.json") from None
        self.fmt = str(qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq").lower()
        if self.bits not in GPTQ_BITS:
            raise UnsupportedError(f"{self.bits}-bit GPTQ is not a width qwqq can dequantize "
                                   f"({', '.join(map(str, GPTQ_BITS))}); pip install gptqmodel", ckpt.root)
        if self.fmt not in GPTQ_FORMATS:
            raise UnsupportedError(f"GPTQ checkpoint format {self.fmt!r} cannot be dequantized by qwqq "
                                   f"(it reads {', '.join(GPTQ_FORMATS)}); pip install gptqmodel optimum for its kernels",
                                   ckpt.root)

    def close(self) -> None:
        self.reader.close()

    def _raw(self, name: str, dtype) -> np.ndarray:
        ref = self.ckpt.tensors[name]
        want = {"I32": np.int32, "F16": np.float16}
        if want.get(ref.dtype) != dtype:
            raise SourceError(f"tensor {name}: dtype {ref.dtype}, a GPTQ checkpoint stores "
                              f"{'I32' if dtype == np.int32 else 'F16'}", ref.file)
        return self.reader.read_raw(ref, 0, ref.rows).view(dtype).reshape(ref.shape)

    def linear(self, module: str) -> np.ndarray:
        """float32 [out, in]: scale[g_idx] * (q - zero[g_idx])."""
        from qwqq.gptq.packing import default_g_idx, dequantize

        qweight = self._raw(f"{module}.qweight", np.int32)
        packed = {"qweight": qweight, "qzeros": self._raw(f"{module}.qzeros", np.int32),
                  "scales": self._raw(f"{module}.scales", np.float16)}
        in_features = qweight.shape[0] * 32 // self.bits
        if f"{module}.g_idx" in self.ckpt.tensors:
            packed["g_idx"] = self._raw(f"{module}.g_idx", np.int32)
        else:  # older checkpoints without act-order leave it out
            packed["g_idx"] = default_g_idx(in_features, self.group_size)
        try:
            return dequantize(packed, self.bits, self.fmt)
        except (ValueError, IndexError) as e:
            raise SourceError(f"GPTQ tensors of {module} do not fit together ({_one_line(e)})", self.ckpt.root) from None

    def tensor(self, name: str) -> np.ndarray:
        """One weight (Hugging Face name) as float32: stored as is, or a GPTQ linear dequantized."""
        ref = self.ckpt.tensors.get(name)
        if ref is not None:
            return self.reader.read_f32(ref, 0, ref.rows).reshape(ref.shape)
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and f"{module}.qweight" in self.ckpt.tensors:
            return self.linear(module)
        raise SourceError(f"tensor {name} is missing", self.ckpt.root)

    def param(self, name: str) -> np.ndarray:
        """A parameter of the transformers model by its own name (fused experts built from per-expert tensors)."""
        m = LAYER_PARAM.match(name)
        if m and m.group(2) in FUSED_PARAMS and name not in self.ckpt.tensors:
            prefix, which = m.group(1), m.group(2)
            layer = prefix.split(".")[2]
            experts = sorted({int(k.group(2)) for t in self.ckpt.tensors
                              if (k := PER_EXPERT.match(t)) and k.group(1) == layer})
            if which.endswith("down_proj"):
                parts = [self.tensor(expert_weight(layer, e, "down")) for e in experts]
            else:  # transformers 5 fuses gate and up: rows [gate; up]
                parts = [np.concatenate([self.tensor(expert_weight(layer, e, "gate")),
                                         self.tensor(expert_weight(layer, e, "up"))]) for e in experts]
            return np.stack(parts) if parts else np.zeros((0,), np.float32)
        return self.tensor(name)


def _rebuild_buffers(model, device) -> None:
    """Modules built on the meta device have meta buffers (rotary inv_freq): build those modules again for real."""
    import torch

    for name, module in list(model.named_modules()):
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        try:
            with torch.device(device):
                fresh = type(module)(config=model.config)
        except TypeError as e:
            raise UnsupportedError(f"cannot rebuild {type(module).__name__} ({_one_line(e)})") from None
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, fresh)


def load_dequantized(ckpt, path: Path, device, dtype):
    """A GPTQ folder as a plain transformers model whose weights are the dequantized GPTQ weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qwqq.archs import arch_of, check_config

    arch = arch_of(ckpt.config, path / "config.json")
    check_config(ckpt.config, arch, path / "config.json")
    loader = DequantizedLoader(ckpt, ckpt.config.get("quantization_config") or {})
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False,
                                                     attn_implementation="sdpa")
        real: dict[int, torch.nn.Parameter] = {}  # meta parameter -> its real one (tied weights share one)
        for name, meta in list(model.named_parameters(remove_duplicate=False)):
            param = real.get(id(meta))
            if param is None:
                if name == "lm_head.weight" and name not in ckpt.tensors and getattr(config, "tie_word_embeddings", False):
                    arr = loader.param("model.embed_tokens.weight")
                else:
                    arr = loader.param(name)
                if tuple(arr.shape) != tuple(meta.shape):
                    raise SourceError(f"tensor {name} is {list(arr.shape)}, the config implies {list(meta.shape)}", path)
                param = torch.nn.Parameter(torch.from_numpy(arr).to(device=device, dtype=dtype), requires_grad=False)
                real[id(meta)] = param
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._parameters[leaf] = param
        _rebuild_buffers(model, device)
    finally:
        loader.close()
    return model.eval()


# ---------------------------------------------------------------- bitsandbytes NF4 on load
def nf4_config(dtype):
    """NF4 4-bit weights, their per-64 scales themselves quantized (double quant: about 4.13 bits a weight),
    computing in the model's dtype (bf16 on the CPU for a bf16 checkpoint)."""
    import torch
    from transformers import BitsAndBytesConfig

    compute = dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


# ---------------------------------------------------------------- GPTQ with GPTQModel's kernels
_KEEP: dict[int, object] = {}


def _unloaded(info: dict, config: dict) -> list[str]:
    """Parameters from_pretrained left without weights (a tied lm_head is not one)."""
    tied = bool(config.get("tie_word_embeddings"))
    return sorted(k for k in info.get("missing_keys", ()) if not (tied and k == "lm_head.weight"))


def load_gptq_kernels(ckpt, path: Path, device, dtype):
    """A GPTQ folder on GPTQModel's kernels: through transformers' own GPTQ loader (optimum), or, where that
    leaves weights unloaded, through GPTQModel's loader. transformers 5.23 + optimum 2.3 do not load Qwen3-MoE
    experts (the model fuses them, the checkpoint has a GPTQ linear per expert), which GPTQModel.load does."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.float16 if dtype == torch.float32 else dtype  # the kernels compute in float16 / bfloat16
    if not any(PER_EXPERT.match(name) for name in ckpt.tensors):
        model, info = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, device_map=str(device), trust_remote_code=False, use_safetensors=True,
            attn_implementation="sdpa", output_loading_info=True)
        if not _unloaded(info, ckpt.config) and not info.get("unexpected_keys"):
            return model.eval(), "gptq kernels (GPTQModel via transformers)"
        del model
    from gptqmodel import GPTQModel

    loaded = GPTQModel.load(str(path), device=str(device), dtype=dtype, trust_remote_code=False)
    model = loaded.model
    _KEEP[id(model)] = loaded  # GPTQModel's wrapper (a Module holding the model) lives as long as the model
    return model.eval(), "gptq kernels (GPTQModel)"


# ---------------------------------------------------------------- the model
class TransformersChatModel:
    def __init__(self, model, tokenizer, path: Path, ctx: int, weights: str, chat_template: str | None):
        from qwqq.run.backends.mlx import folder_metadata

        self.model, self.tokenizer, self.path = model, tokenizer, path
        self.device = next(model.parameters()).device
        self.metadata = folder_metadata(path)
        self.metadata.update({"transformers.weights": weights, "transformers.device": str(self.device),
                              "transformers.dtype": str(next(model.parameters()).dtype).removeprefix("torch.")})
        self.finish_reason: str | None = None
        self.generated: list[int] = []  # the token ids of the last answer
        max_pos = int(float(self.metadata.get("max_position_embeddings", 0) or 0))
        self.n_ctx = ctx if ctx > 0 else (max_pos or 4096)
        self._template = ChatTemplate(chat_template or getattr(tokenizer, "chat_template", None),
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
        return self._template.render(messages)

    def _tokens(self, prompt: str) -> list[int]:
        tokens = list(self.tokenizer.encode(prompt, add_special_tokens=False))
        return with_bos(tokens, self._bos_id, bool(getattr(self.tokenizer, "add_bos_token", False)))

    def _forward(self, ids, cache, first: bool):
        import torch

        with torch.inference_mode():
            kw = {"input_ids": ids, "past_key_values": cache, "use_cache": True}
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

    def stream_chat(self, messages: list[dict], sampling, max_tokens: int) -> Iterator[str]:
        import torch
        from transformers import DynamicCache

        self.finish_reason = None
        self.generated = []
        tokens = self._tokens(self.render(messages))
        room = prompt_room(len(tokens), self.n_ctx)
        limit = min(max_tokens, room)
        greedy = sampling.greedy or sampling.temperature <= 0
        generator = torch.Generator(device=self.device)
        generator.manual_seed(sampling.seed if sampling.seed is not None else random.randrange(2**31))
        cache = DynamicCache(config=self.model.config)
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        text = _Detokenizer(self.tokenizer)
        logits = self._forward(ids, cache, first=True)
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
            _KEEP.pop(id(model), None)
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
        from qwqq.source import open_checkpoint

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
                from transformers import AutoModelForCausalLM, AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
                if gptq and missing:
                    model, weights = load_dequantized(ckpt, path, device, dtype), "gptq dequantized"
                elif gptq:
                    model, weights = load_gptq_kernels(ckpt, path, device, dtype)
                else:
                    extra = {"quantization_config": nf4_config(dtype)} if options.load_in_4bit else {}
                    model, info = AutoModelForCausalLM.from_pretrained(
                        str(path), dtype=dtype, device_map=str(device), trust_remote_code=False, use_safetensors=True,
                        attn_implementation="sdpa", output_loading_info=True, **extra)
                    unloaded = _unloaded(info, ckpt.config)
                    if unloaded:
                        raise SourceError(f"transformers found no weights for {len(unloaded)} parameters "
                                          f"(first: {unloaded[0]})", path)
                    model, weights = model.eval(), "bitsandbytes nf4" if options.load_in_4bit else "unquantized"
        except QwqqError:
            raise
        except (ValueError, KeyError, TypeError, OSError, RuntimeError, ImportError, AttributeError, AssertionError) as e:
            what = "GPTQModel" if gptq and not missing else "bitsandbytes" if options.load_in_4bit else "transformers"
            raise QwqqError(f"{what} cannot load this model: {_one_line(e)}", path) from None
        if gptq and missing:
            print(dequantized_note(missing), file=sys.stderr)
        return TransformersChatModel(model, tokenizer, path, options.ctx, weights, ckpt.chat_template)


backend = TransformersBackend()

"""What `qwqq serve` is asked to do, checked before anything is loaded or bound."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from qwqq.errors import QwqqError
from qwqq.run import experts

REASONING_FORMATS = ("deepseek", "reasoning", "none")
# The message / delta field the thinking goes into, by --reasoning-format ("none": left inline in content).
REASONING_FIELD = {"deepseek": "reasoning_content", "reasoning": "reasoning"}
KV_TYPES = ("f16", "q8_0", "q4_0")
MAX_PARALLEL = 256  # llama.cpp's LLAMA_MAX_SEQ
MAX_BODY = 16 << 20  # bytes of one request body; more is a 413
INSTALL_HINT = 'install the server with: pip install "qwqq[serve]"'


@dataclass
class ServeOptions:
    model: Path
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (said on start-up)
    api_key: str | None = None
    api_key_file: Path | None = None
    ctx: int | None = None  # None: fitted, as `qwqq run` does
    kv: str | None = None
    n_gpu_layers: int | None = None
    n_cpu_moe: int | None = None  # MoE experts of the first N layers in RAM; None: fitted with the GPU layers
    cpu_moe: bool = False  # every layer's experts in RAM
    tensor_split: list[float] | None = None  # llama.cpp: layers over several GPUs; None: fitted (qwqq.run.split)
    profile: str | None = None
    threads: int = 0
    reasoning_format: str = "deepseek"
    backend: str = "auto"  # auto: by the model's format (GGUF: llama.cpp, MLX: mlx, GPTQ: transformers)
    parallel: int = 4  # slots: sequences decoded together in one batch (llama-server's --parallel; its auto is 4)
    kv_unified: bool = True  # one KV pool shared by the slots (each may use all of ctx); False: ctx / parallel each
    max_queue: int = 64  # requests waiting for a free slot; more get 503 + Retry-After
    flash_attn: bool = True
    debug: bool = False
    max_body: int = MAX_BODY


def check_options(opts: ServeOptions) -> None:
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise QwqqError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed; {INSTALL_HINT}")
    if not Path(opts.model).exists():
        raise QwqqError("no such file", opts.model)
    if opts.reasoning_format not in REASONING_FORMATS:
        raise QwqqError(f"unknown --reasoning-format {opts.reasoning_format!r}; choose {', '.join(REASONING_FORMATS)}")
    if opts.kv is not None and opts.kv not in KV_TYPES:
        raise QwqqError(f"unknown --kv {opts.kv!r}; choose f16, q8_0 or q4_0")
    if opts.ctx is not None and opts.ctx < 0:
        raise QwqqError("--ctx must be positive (0: the model's own context length)")
    if not 0 <= opts.port <= 65535:
        raise QwqqError(f"--port {opts.port} is not a TCP port (0-65535; 0: any free one)")
    if opts.max_queue < 0:
        raise QwqqError("--max-queue must be 0 or more")
    if not 1 <= opts.parallel <= MAX_PARALLEL:
        raise QwqqError(f"--parallel must be 1 to {MAX_PARALLEL} (llama.cpp's most sequences in one context)")
    if opts.threads < 0:
        raise QwqqError("--threads must be 0 (all cores) or more")
    if opts.kv not in (None, "f16") and not opts.flash_attn:
        raise QwqqError("a quantized KV cache needs flash attention in llama.cpp (drop --no-flash-attn)")
    experts.requested(opts.n_cpu_moe, opts.cpu_moe)


def api_key(opts: ServeOptions) -> str | None:
    """The key clients must send as `Authorization: Bearer KEY`, from --api-key or the first line of
    --api-key-file; None: no key asked for."""
    if opts.api_key is not None and opts.api_key_file is not None:
        raise QwqqError("give --api-key or --api-key-file, not both")
    key = opts.api_key
    if opts.api_key_file is not None:
        try:
            text = Path(opts.api_key_file).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise QwqqError("the API key file is not UTF-8 text", opts.api_key_file) from None
        except OSError as e:
            raise QwqqError(f"cannot read the API key file: {e.strerror or e}", opts.api_key_file) from None
        key = text.splitlines()[0] if text.strip() else ""
    if key is None:
        return None
    key = key.strip()
    if not key:
        raise QwqqError("the API key is empty")
    if not key.isprintable() or " " in key:
        raise QwqqError("the API key must be one word of printable characters")
    return key

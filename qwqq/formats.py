"""What a path holds: a GGUF file, an MLX folder, a GPTQ folder or an unquantized safetensors folder.

Read from the first bytes of a file or a folder's config.json, nothing more; run, eval and inspect ask it.
"""

from __future__ import annotations

import json
from pathlib import Path

from qwqq.errors import QwqqError, UnsupportedError
from qwqq.outputs import check_not_being_written

GGUF_MAGIC = b"GGUF"
GGUF_HEADER_BYTES = 24  # magic, u32 version, u64 tensor count, u64 key/value count
GGUF_VERSIONS = (2, 3)


def _check_gguf_header(path: Path, head: bytes, size: int) -> None:
    if size < GGUF_HEADER_BYTES:
        raise QwqqError(f"GGUF file is truncated ({size} bytes)", path)
    version = int.from_bytes(head[4:8], "little")
    if version not in GGUF_VERSIONS:
        raise QwqqError(f"unsupported GGUF version {version} (or a damaged file)", path)


def _folder_format(path: Path) -> str | None:
    config_file = path / "config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise QwqqError(f"config.json is not readable JSON ({e})", path) from None
        if isinstance(config, dict):
            if "quantization" in config:
                return "mlx"
            method = (config.get("quantization_config") or {}).get("quant_method")
            if isinstance(method, str) and method.lower() == "gptq":
                return "gptq"
    if any(path.glob("*.safetensors")):
        return "safetensors"
    return None


def detect_format(path: str | Path) -> str:
    """"gguf", "mlx", "gptq" or "safetensors"; a QwqqError for anything else."""
    path = Path(path)
    if not path.exists():
        raise QwqqError("no such file or folder", path)
    check_not_being_written(path)
    if path.is_dir():
        fmt = _folder_format(path)
        if fmt is None:
            raise UnsupportedError("folder holds no model qwqq can run (no .gguf file, safetensors or MLX/GPTQ config)", path)
        return fmt
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(GGUF_HEADER_BYTES)
    except OSError as e:
        raise QwqqError(f"cannot read: {e.strerror or e}", path) from None
    if head[:4] == GGUF_MAGIC:
        _check_gguf_header(path, head, size)
        return "gguf"
    if path.suffix == ".safetensors":
        return "safetensors"
    if path.suffix == ".gguf":
        raise QwqqError("not a GGUF file (bad magic bytes; damaged or not a model)", path)
    raise UnsupportedError("unknown model format (qwqq runs .gguf files)", path)

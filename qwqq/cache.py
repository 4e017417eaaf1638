"""qwqq's on-disk cache: eval's reference logits and the sensitivity measurements, keyed by what they
depend on. $QWQQ_CACHE, else $XDG_CACHE_HOME/qwqq, else ~/.cache/qwqq."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def cache_root() -> Path:
    root = os.environ.get("QWQQ_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache",
                                                        "qwqq")
    return Path(root)


def identity(path: Path) -> dict:
    """What makes a model the same model: its weight files' names, sizes and mtimes."""
    path = Path(path).resolve()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir()
                                                 if p.suffix in (".safetensors", ".json", ".gguf"))
    return {"path": str(path), "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def cache_path(key: dict, prefix: str = "") -> Path:
    """The sensitivity cache file for a measurement's key (every setting its numbers depend on)."""
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache_root() / "sensitivity" / f"{prefix}{h}.json"


def read_cached(path: Path):
    """The JSON a measurement cached, or None (absent or unreadable: measure again)."""
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def write_cached(path: Path, data) -> None:
    """Cache a measurement, atomically (a concurrent reader sees the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)

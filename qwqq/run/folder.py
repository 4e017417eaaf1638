"""A model folder's key/values (config.json and generation_config.json scalars), what the chat loop reads for
sampling defaults: the metadata of the backends that run folders (mlx, transformers)."""

from __future__ import annotations

import json
from pathlib import Path

from qwqq.errors import QwqqError

SCALAR = (str, int, float, bool)


def read_json(path: Path) -> dict:
    """A JSON object file ({} when absent or not an object); unreadable: one line."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise QwqqError(f"cannot read {path.name}: {e}", path.parent) from None
    return data if isinstance(data, dict) else {}


def folder_metadata(path: Path) -> dict[str, str]:
    """What the chat loop reads for sampling defaults: config.json and generation_config.json
    scalars (model_type, temperature, top_p, ...) and the folder's name as general.name."""
    meta: dict[str, str] = {}
    for name in ("config.json", "generation_config.json"):
        for k, v in read_json(path / name).items():
            if isinstance(v, SCALAR):
                meta[k] = str(v)
    meta["general.name"] = path.name
    return meta

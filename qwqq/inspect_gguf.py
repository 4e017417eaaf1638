"""`qwqq inspect`: what is in a GGUF file, as a dict (for --json) or rich tables.

Tensor shapes are in GGUF "ne" order, as gguf.GGUFReader reports them: the
contiguous (fastest-varying) dimension first, i.e. reversed from PyTorch/NumPy
order. token_embd.weight of a 576-wide, 49152-token model is [576, 49152].
"""

from __future__ import annotations

from pathlib import Path

from qwqq.errors import QwqqError

# Arrays longer than this are summarised as "[array of N type]".
SHORT_ARRAY = 16
# Keys never dumped, however short (they are the vocabulary).
NEVER_DUMP = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"}
# Keys rendered by their length only in the rich view.
LONG_TEXT = {"tokenizer.chat_template"}


def _open(path: Path):
    import gguf

    from qwqq.backends import check_not_being_written

    if not path.exists():
        raise QwqqError("no such file", path)
    if path.is_dir():
        raise QwqqError("is a folder, not a .gguf file", path)
    check_not_being_written(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise QwqqError(f"cannot read: {e.strerror or e}", path) from None
    if magic != b"GGUF":
        raise QwqqError("not a GGUF file (bad magic bytes)", path)
    try:
        return gguf.GGUFReader(path, "r")
    except OSError as e:
        raise QwqqError(f"cannot read: {e.strerror or e}", path) from None
    except Exception as e:  # ValueError, struct.error, IndexError, ... on damaged or truncated files
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise QwqqError(f"damaged or truncated GGUF file ({detail})", path) from None


def _value(field):
    """A field's value: scalar, string, short list, or a one-line array summary."""
    import gguf

    types = field.types
    if not types:
        return None
    if types[0] == gguf.GGUFValueType.ARRAY:
        sub = types[1].name.lower() if len(types) > 1 else "?"
        if field.name in NEVER_DUMP or len(field.data) > SHORT_ARRAY or sub == "array":
            return f"[array of {len(field.data)} {sub}]"
        return [_scalar(field.parts[i], types[1]) for i in field.data]
    return _scalar(field.parts[field.data[0]], types[0])


def _scalar(part, vtype):
    import gguf

    if vtype == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8", "replace")
    value = part[0].item() if len(part) else None
    return bool(value) if vtype == gguf.GGUFValueType.BOOL else value


def _file_type_name(code) -> str | None:
    import gguf

    if code is None:
        return None
    try:
        return gguf.LlamaFileType(int(code)).name
    except ValueError:
        return f"UNKNOWN({code})"


def inspect(path: str | Path) -> dict:
    import gguf

    path = Path(path)
    reader = _open(path)
    file_bytes = path.stat().st_size
    try:
        metadata = {name: _value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")}
        tensors = [
            {
                "name": t.name,
                "type": gguf.GGMLQuantizationType(t.tensor_type).name,
                "shape": [int(d) for d in t.shape],
                "bytes": int(t.n_bytes),
                "_n": int(t.n_elements),
                "_end": int(t.data_offset) + int(t.n_bytes),
            }
            for t in reader.tensors
        ]
    except Exception as e:  # odd value or tensor types in a damaged file
        raise QwqqError(f"damaged GGUF file ({e})", path) from None
    end = max((t.pop("_end") for t in tensors), default=0)
    if end > file_bytes:
        raise QwqqError(f"truncated GGUF file: tensor data needs {end} bytes, the file has {file_bytes}", path)
    n_params = sum(t.pop("_n") for t in tensors)
    tensor_bytes = sum(t["bytes"] for t in tensors)
    type_counts: dict[str, dict] = {}
    for t in tensors:
        entry = type_counts.setdefault(t["type"], {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += t["bytes"]
    version = reader.fields.get("GGUF.version")
    return {
        "path": str(path),
        "file_bytes": file_bytes,
        "gguf_version": _value(version) if version else None,
        "architecture": metadata.get("general.architecture"),
        "name": metadata.get("general.name"),
        "file_type": _file_type_name(metadata.get("general.file_type")),
        "n_params": n_params,
        "bits_per_weight": 8 * tensor_bytes / n_params if n_params else 0.0,
        "tensor_bytes": tensor_bytes,
        "type_counts": dict(sorted(type_counts.items(), key=lambda kv: -kv[1]["bytes"])),
        "tensors": tensors,
        "tensor_shape_order": "ne (GGUF order: contiguous dimension first, reversed from PyTorch)",
        "metadata": metadata,
    }


# ---------------------------------------------------------------- rich view
def _human_params(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _short(value, width: int = 80) -> str:
    text = str(value).replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 1] + "…"


def render(report: dict, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    for label, value in (
        ("file", report["path"]),
        ("architecture", report["architecture"]),
        ("name", report["name"]),
        ("file type", report["file_type"]),
        ("size", f"{report['file_bytes'] / 2**30:.2f} GiB ({report['file_bytes']:,} bytes)"),
        ("parameters", f"{_human_params(report['n_params'])} ({report['n_params']:,})"),
        ("bits/weight", f"{report['bits_per_weight']:.2f}"),
        ("tensors", str(len(report["tensors"]))),
    ):
        summary.add_row(label, escape(str(value)))
    console.print(summary)

    types = Table(title="tensor types", title_justify="left")
    for col, justify in (("type", "left"), ("count", "right"), ("bytes", "right"), ("share", "right")):
        types.add_column(col, justify=justify)
    total = report["tensor_bytes"] or 1
    for name, entry in report["type_counts"].items():
        types.add_row(name, str(entry["count"]), f"{entry['bytes']:,}", f"{100 * entry['bytes'] / total:.1f}%")
    console.print(types)

    meta = Table(title="metadata", title_justify="left")
    meta.add_column("key")
    meta.add_column("value", overflow="fold")
    for key, value in report["metadata"].items():
        shown = f"[{len(value)} characters]" if key in LONG_TEXT and isinstance(value, str) else _short(value)
        meta.add_row(escape(key), escape(shown))
    console.print(meta)

    tensors = Table(title="tensors (shape in GGUF ne order, contiguous dimension first)", title_justify="left")
    for col, justify in (("name", "left"), ("type", "left"), ("shape", "left"), ("bytes", "right")):
        tensors.add_column(col, justify=justify)
    for t in report["tensors"]:
        tensors.add_row(escape(t["name"]), t["type"], "×".join(map(str, t["shape"])), f"{t['bytes']:,}")
    console.print(tensors)

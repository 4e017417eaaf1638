"""`qwqq inspect`: what is in a GGUF file, as a dict (for --json) or rich tables.

Tensor shapes are in GGUF "ne" order (as llama.cpp and gguf.GGUFReader report them): the
contiguous (fastest-varying) dimension first, i.e. reversed from PyTorch/NumPy
order. token_embd.weight of a 576-wide, 49152-token model is [576, 49152].
"""

from __future__ import annotations

from pathlib import Path

from qwqq.gguf.reader import GGUFFile, LazyArray, read_gguf
from qwqq.outputs import check_not_being_written

# Arrays longer than this are summarised as "[array of N type]".
SHORT_ARRAY = 16
# Keys never dumped, however short (they are the vocabulary).
NEVER_DUMP = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"}
# Keys rendered by their length only in the rich view.
LONG_TEXT = {"tokenizer.chat_template"}


def _open(path: Path) -> GGUFFile:
    if path.exists() and not path.is_dir():
        check_not_being_written(path)
    return read_gguf(path)


def _value(key: str, value):
    """A metadata value for the report: scalars and short lists as they are, long arrays summarised."""
    if key in NEVER_DUMP and isinstance(value, list):
        return f"[array of {len(value)}]"
    if isinstance(value, LazyArray) or (isinstance(value, list) and len(value) > SHORT_ARRAY):
        return repr(value) if isinstance(value, LazyArray) else f"[array of {len(value)}]"
    return value


def _file_type_name(code) -> str | None:
    import gguf

    if code is None:
        return None
    try:
        return gguf.LlamaFileType(int(code)).name
    except (TypeError, ValueError, OverflowError):
        return f"UNKNOWN({code})"


def inspect(path: str | Path) -> dict:
    path = Path(path)
    g = _open(path)
    metadata = {k: _value(k, v) for k, v in g.metadata.items()}
    tensors = [{"name": t.name, "type": t.type.name, "shape": list(t.shape), "bytes": t.nbytes} for t in g.tensors]
    n_params = sum(t.n_elements for t in g.tensors)
    tensor_bytes = sum(t.nbytes for t in g.tensors)
    type_counts: dict[str, dict] = {}
    for t in tensors:
        entry = type_counts.setdefault(t["type"], {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += t["bytes"]
    return {
        "path": str(path),
        "file_bytes": g.file_bytes,
        "gguf_version": g.version,
        "architecture": g.architecture,
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

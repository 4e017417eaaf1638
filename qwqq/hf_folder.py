"""What every Hugging Face-style output folder (MLX, GPTQ) shares: the files copied from the source
beside the weights, the checks on the output path, durable JSON writes, and safetensors shards laid
out up front (headers first, then each array pwritten at its offset)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Callable, Iterable

from qwqq.errors import OutputError, QwqqError

# Files copied beside the weights when the source has them (loaders read the tokenizer with
# transformers, which takes any of these).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model")
COPIED_FILES = TOKENIZER_FILES + ("generation_config.json",)


def side_files(root: Path) -> list[Path]:
    """The COPIED_FILES the source folder has."""
    return [root / f for f in COPIED_FILES if (root / f).is_file()]


def copy_side_files(files: list[Path], dest: Path) -> None:
    for p in files:
        shutil.copyfile(p, dest / p.name)
        fsync_file(dest / p.name)


def check_folder_output(out: Path, root: Path, kind: str) -> None:
    """An output folder must not be a file name, an existing file, or the source (or one of its parents)."""
    if out.suffix.lower() in (".gguf", ".safetensors"):
        raise QwqqError(f"an {kind} output is a folder, not a {out.suffix} file", out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"exists and is not a folder (an {kind} output is a folder)", out)
    o, r = out.resolve(), root.resolve()
    if o == r or o in r.parents:
        raise OutputError("would overwrite the source model", out)


def write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=4)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- safetensors shards laid out up front
DTYPE_BYTES = {"U32": 4, "I32": 4, "F32": 4, "BF16": 2, "F16": 2, "U8": 1, "I8": 1}


@dataclass
class Slot:
    """One stored array: its shard and absolute byte offset there."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: int
    offset: int = 0

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * DTYPE_BYTES[self.dtype]

    @property
    def row_bytes(self) -> int:
        return self.nbytes // max(1, prod(self.shape[:-1]) if len(self.shape) > 1 else 1)


@dataclass
class Layout:
    files: list[str]
    headers: list[bytes]
    sizes: list[int]
    slots: dict[str, Slot]

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes)

    @property
    def tensor_bytes(self) -> int:
        return sum(s.nbytes for s in self.slots.values())


def shard_name(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def layout_shards(arrays: Iterable[tuple[str, str, tuple[int, ...]]], max_shard_bytes: int,
                  metadata_format: str, order: Callable[[Slot], object] | None = None) -> Layout:
    """Shards filled in the given order, a new one when the next array would pass the limit; each
    file is an 8-byte header length, the JSON header (padded with spaces to a multiple of 8), then
    the arrays back to back (in `order` within a shard when given, else as they came)."""
    groups: list[list[Slot]] = []
    size = 0
    for name, dtype, shape in arrays:
        slot = Slot(name, dtype, tuple(shape), 0)
        if not groups or size + slot.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        slot.shard = len(groups) - 1
        groups[-1].append(slot)
        size += slot.nbytes
    if order is not None:
        groups = [sorted(g, key=order) for g in groups]
    files = [shard_name(i, len(groups)) for i in range(len(groups))]
    headers, sizes, slots = [], [], {}
    for group in groups:
        header: dict = {"__metadata__": {"format": metadata_format}}
        pos = 0
        for s in group:
            header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
            pos += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        blob = len(raw).to_bytes(8, "little") + raw
        start = len(blob)
        for s in group:  # absolute offsets in the file
            s.offset = start
            start += s.nbytes
            slots[s.name] = s
        headers.append(blob)
        sizes.append(len(blob) + pos)
    return Layout(files, headers, sizes, slots)


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


class ShardFiles:
    """The laid-out shard files, created at full size with their headers written."""

    def __init__(self, folder: Path, lay: Layout):
        self.fds: list[int] = []
        try:
            for name, header, size in zip(lay.files, lay.headers, lay.sizes):
                fd = os.open(folder / name, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
                self.fds.append(fd)
                pwrite_all(fd, memoryview(header), 0)
                os.ftruncate(fd, size)
        except BaseException:
            self.close()
            raise

    def sync(self) -> None:
        for fd in self.fds:
            os.fsync(fd)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

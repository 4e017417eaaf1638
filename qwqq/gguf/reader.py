"""Read a GGUF file's header: metadata, tensor infos, data offsets. Fast and strict.

gguf.GGUFReader builds a numpy view per array element, which takes seconds on a Qwen vocabulary
(300k strings); inspect, fit and the tests only need the header, so this reader walks it once with
struct, keeps long arrays as lazy (offset, count) records, and checks every count, length, type and
offset against the file's size, so a truncated or hostile file is one clear error, never a crash.
"""

from __future__ import annotations

import hashlib
import mmap
import struct
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType as V

from qwqq.errors import QwqqError

MAGIC = b"GGUF"
MAX_DIMS = 4
_SCALAR = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
           V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d"}
KEEP_ARRAY = 64  # arrays up to this length are decoded eagerly; longer ones stay lazy


class GGUFError(QwqqError):
    """Not a GGUF file, or a damaged one."""


@dataclass(frozen=True)
class LazyArray:
    """A long metadata array (tokens, merges, token types): decoded only on request."""

    type: V
    count: int
    offset: int  # of the first element

    def __repr__(self) -> str:
        return f"[array of {self.count} {self.type.name.lower()}]"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF ne order: contiguous dimension first
    type: GGMLQuantizationType
    offset: int  # absolute, in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return prod(self.shape)


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, object]
    tensors: list[TensorInfo]
    data_offset: int
    file_bytes: int
    alignment: int = 32
    _types: dict[str, V] = field(default_factory=dict, repr=False)

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str | None:
        a = self.metadata.get("general.architecture")
        return a if isinstance(a, str) else None

    def arch_value(self, key: str, default=None):
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def array(self, key: str) -> list:
        """Decode a (possibly lazy) array value in full."""
        v = self.metadata.get(key)
        if not isinstance(v, LazyArray):
            return v
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            values, _ = _read_array_items(mm, v.offset, v.type, v.count, self.path, len(mm))
            return values

    def tensor_sha256(self, t: TensorInfo) -> str:
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            f.seek(t.offset)
            left = t.nbytes
            while left:
                b = f.read(min(left, 16 * 2**20))
                if not b:
                    raise GGUFError(f"tensor {t.name} runs past the end of the file", self.path)
                h.update(b)
                left -= len(b)
        return h.hexdigest()


def tensor_nbytes(t: GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    blck, size = GGML_QUANT_SIZES[t]
    return prod(shape[1:]) * (shape[0] // blck) * size if shape else size


class _Cursor:
    def __init__(self, mm, path: Path):
        self.mm, self.pos, self.path, self.size = mm, 0, path, len(mm)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(f"truncated or damaged GGUF file (runs out while reading {what})", self.path)

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        v = struct.unpack_from(fmt, self.mm, self.pos)[0]
        self.pos += n
        return v

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        self.need(n, what)
        raw = self.mm[self.pos:self.pos + n]
        self.pos += n
        return raw.decode("utf-8", "replace")


def _read_array_items(mm, pos: int, vtype: V, count: int, path: Path, size: int) -> tuple[list, int]:
    if vtype == V.STRING:
        out = []
        for _ in range(count):
            if pos + 8 > size:
                raise GGUFError("truncated or damaged GGUF file (in a string array)", path)
            (n,) = struct.unpack_from("<Q", mm, pos)
            pos += 8
            if pos + n > size:
                raise GGUFError("truncated or damaged GGUF file (in a string array)", path)
            out.append(mm[pos:pos + n].decode("utf-8", "replace"))
            pos += n
        return out, pos
    fmt = _SCALAR.get(vtype)
    if fmt is None:
        raise GGUFError(f"damaged GGUF file (array of unsupported type {int(vtype)})", path)
    width = struct.calcsize(fmt)
    if pos + width * count > size:
        raise GGUFError("truncated or damaged GGUF file (in an array)", path)
    vals = list(struct.unpack_from(f"<{count}{fmt[1:]}", mm, pos)) if count else []
    return vals, pos + width * count


def _skip_array(c: _Cursor, vtype: V, count: int) -> None:
    if vtype == V.STRING:
        pos, mm, size = c.pos, c.mm, c.size
        for _ in range(count):
            if pos + 8 > size:
                raise GGUFError("truncated or damaged GGUF file (in a string array)", c.path)
            (n,) = struct.unpack_from("<Q", mm, pos)
            pos += 8 + n
        if pos > size:
            raise GGUFError("truncated or damaged GGUF file (in a string array)", c.path)
        c.pos = pos
        return
    fmt = _SCALAR.get(vtype)
    if fmt is None:
        raise GGUFError(f"damaged GGUF file (array of unsupported type {int(vtype)})", c.path)
    n = struct.calcsize(fmt) * count
    c.need(n, "an array")
    c.pos += n


def _value(c: _Cursor, vtype: int, key: str):
    try:
        vt = V(vtype)
    except ValueError:
        raise GGUFError(f"damaged GGUF file (key {key!r} has unknown value type {vtype})", c.path) from None
    if vt == V.STRING:
        return c.string(key)
    if vt == V.ARRAY:
        sub = c.unpack("<I", key)
        count = c.unpack("<Q", key)
        try:
            st = V(sub)
        except ValueError:
            raise GGUFError(f"damaged GGUF file (array {key!r} of unknown type {sub})", c.path) from None
        if st == V.ARRAY:
            raise GGUFError(f"nested arrays are not supported (key {key!r})", c.path)
        if count > c.size:  # every element takes at least one byte
            raise GGUFError(f"damaged GGUF file (array {key!r} claims {count} elements)", c.path)
        if count <= KEEP_ARRAY:
            vals, c.pos = _read_array_items(c.mm, c.pos, st, count, c.path, c.size)
            return vals
        start = c.pos
        _skip_array(c, st, count)
        return LazyArray(st, count, start)
    return c.unpack(_SCALAR[vt], key)


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse and validate a GGUF header. Raises GGUFError (a QwqqError) naming the file."""
    path = Path(path)
    if not path.exists():
        raise GGUFError("no such file", path)
    if path.is_dir():
        raise GGUFError("is a folder, not a .gguf file", path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise GGUFError(f"cannot read: {e.strerror or e}", path) from None
    with f:
        size = path.stat().st_size
        if size < 24:
            with_magic = size >= 4 and f.read(4) == MAGIC
            raise GGUFError(f"truncated GGUF file (only {size} bytes)" if with_magic else "not a GGUF file (too short)", path)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _parse(mm, path, size)


def _parse(mm, path: Path, size: int) -> GGUFFile:
    if mm[:4] != MAGIC:
        raise GGUFError("not a GGUF file (bad magic bytes)", path)
    c = _Cursor(mm, path)
    c.pos = 4
    version = c.unpack("<I", "the version")
    if version not in (2, 3):
        raise GGUFError(f"unsupported GGUF version {version}", path)
    n_tensors = c.unpack("<Q", "the tensor count")
    n_kv = c.unpack("<Q", "the metadata count")
    if n_tensors > size // 24 or n_kv > size // 12:
        raise GGUFError(f"truncated or damaged GGUF file (claims {n_tensors} tensors and {n_kv} keys in {size} bytes)", path)
    meta: dict[str, object] = {}
    for _ in range(n_kv):
        key = c.string("a metadata key")
        vtype = c.unpack("<I", key)
        meta[key] = _value(c, vtype, key)
    infos = []
    for _ in range(n_tensors):
        name = c.string("a tensor name")
        n_dims = c.unpack("<I", name)
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(f"damaged GGUF file (tensor {name} has {n_dims} dimensions)", path)
        shape = tuple(c.unpack("<Q", name) for _ in range(n_dims))
        ttype = c.unpack("<I", name)
        offset = c.unpack("<Q", name)
        try:
            t = GGMLQuantizationType(ttype)
        except ValueError:
            raise GGUFError(f"tensor {name} has unknown type {ttype}", path) from None
        if t not in GGML_QUANT_SIZES:
            raise GGUFError(f"tensor {name} has unsupported type {t.name}", path)
        if shape[0] % GGML_QUANT_SIZES[t][0]:
            raise GGUFError(f"tensor {name}: row of {shape[0]} is not a multiple of the {t.name} block", path)
        infos.append((name, shape, t, offset))
    alignment = meta.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"damaged GGUF file (alignment {alignment!r})", path)
    data = -(-c.pos // alignment) * alignment
    tensors, seen = [], set()
    for name, shape, t, offset in infos:
        if name in seen:
            raise GGUFError(f"tensor {name} appears twice", path)
        seen.add(name)
        nbytes = tensor_nbytes(t, shape)
        if data + offset + nbytes > size:
            raise GGUFError(f"truncated GGUF file: tensor {name} ends at byte {data + offset + nbytes}, "
                            f"the file has {size}", path)
        tensors.append(TensorInfo(name, shape, t, data + offset, nbytes))
    return GGUFFile(path, version, meta, tensors, data, size, alignment)

"""llama.cpp's importance-matrix files: read (GGUF and the legacy .dat), write (GGUF), and the
per-column weights llama-quantize hands to ggml_quantize_chunk.

Re-derived from the llama-cpp-python 0.3.36 sdist's vendor/llama.cpp:

GGUF (tools/imatrix/imatrix.cpp IMatrixCollector::save_imatrix; read by common/imatrix-loader.cpp
common_imatrix_load):
  * metadata ``general.type = "imatrix"``, ``imatrix.datasets`` (string array, may be empty),
    ``imatrix.chunk_count`` (u32) and ``imatrix.chunk_size`` (u32, n_ctx / n_parallel); no
    ``general.architecture``. llama-quantize refuses a GGUF imatrix without the three imatrix.* keys.
  * per weight (its GGUF name, e.g. ``blk.0.ffn_gate_exps.weight``), in sorted name order, two F32
    tensors: ``<name>.in_sum2`` with ne ``[n_per_row, n_mat]`` (raw sums of squared activations, one
    row per expert; n_mat is 1 for a dense weight) and ``<name>.counts`` with ne ``[1, n_mat]``
    (tokens seen per expert, stored as floats, read back with lround). gguf_write drops trailing
    dimensions of 1, so a dense weight's are stored as ne ``[n_per_row]`` and ``[1]``.
  * llama-quantize (tools/quantize/quantize.cpp load_imatrix) turns an entry into
    ``in_sum2[j] / counts[j]`` per expert j, or all ones for an expert with count 0, and passes
    the flat ``[n_mat * n_per_row]`` array; src/llama-quant.cpp uses it only if its size is
    ``ne[0] * ne[2]`` of the weight and gives the rows of expert e ``imatrix + e * n_per_row``.

Legacy .dat (common_imatrix_load_legacy, written by save_imatrix_legacy), little-endian:
  ``int32 n_entries``; per entry ``int32 len, char name[len], int32 ncall, int32 nval,
  float32 values[nval]`` (values are mean squares times ncall, experts flattened); then optionally
  ``int32 chunk_count, int32 len, char dataset[len]``. llama-quantize divides values by ncall
  (or keeps them when ncall is 0).
"""

from __future__ import annotations

import hashlib
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qwqq.errors import QwqqError, SourceError
from qwqq.gguf.reader import read_gguf
from qwqq.outputs import atomic_output

KEY_TYPE = "general.type"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUM2, COUNTS = ".in_sum2", ".counts"


@dataclass
class Imatrix:
    """An importance matrix: per GGUF weight name, (in_sum2 float32 [n_mat, n_per_row], counts float32 [n_mat]).

    ``legacy`` marks data read from a .dat file: in_sum2 is then [1, nval] (experts flattened,
    mean squares times ncall) and counts is [ncall], which llama-quantize treats differently.
    """

    entries: dict[str, tuple[np.ndarray, np.ndarray]]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False
    path: str | None = None  # where it was read from (recorded in a quantized GGUF as llama-quantize does)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def values(self, name: str, expert: int | None = None, n_per_row: int | None = None) -> np.ndarray | None:
        """The float32 per-column weights llama-quantize passes to ggml_quantize_chunk for `name`
        (flat, ``[n_mat * n_per_row]``), or None where the file has no entry.

        With `expert`, only that expert's slice ``[expert * n_per_row : (expert + 1) * n_per_row]``,
        n_per_row being the weight's row length (default: the entry's own).
        """
        entry = self.entries.get(name)
        if entry is None:
            return None
        sums, counts = entry
        if self.legacy:
            ncall = int(counts[0])
            flat = sums.reshape(-1) / np.float32(ncall) if ncall > 0 else sums.reshape(-1).copy()
        else:
            c = _lround(counts).astype(np.float32)[:, None]
            safe = np.where(c > 0, c, np.float32(1))
            flat = np.where(c > 0, sums / safe, np.float32(1)).astype(np.float32).reshape(-1)
        if expert is None:
            return flat
        n = sums.shape[1] if n_per_row is None else int(n_per_row)
        if not 0 <= expert < flat.size // max(n, 1) or flat.size % n:
            raise IndexError(f"{name}: no expert {expert} in {flat.size} values of rows of {n}")
        return flat[expert * n:(expert + 1) * n]

    def digest(self) -> str:
        """sha256 of the data (names, sums, counts, format): the identity a resume journal records."""
        h = hashlib.sha256(b"legacy" if self.legacy else b"gguf")
        for name in sorted(self.entries):
            sums, counts = self.entries[name]
            h.update(name.encode() + b"\0" + struct.pack("<QQ", *sums.shape))
            h.update(np.ascontiguousarray(sums, "<f4").tobytes())
            h.update(np.ascontiguousarray(counts, "<f4").tobytes())
        return h.hexdigest()


def _lround(x: np.ndarray) -> np.ndarray:
    """C's lround: nearest integer, halves away from zero (counts are checked finite and >= 0)."""
    return np.floor(np.asarray(x, np.float64) + 0.5)


# --------------------------------------------------------------------------- checks
def _check_entry(name: str, sums: np.ndarray, counts: np.ndarray, path) -> None:
    if not np.isfinite(sums).all():
        raise SourceError(f"imatrix entry {name} holds NaN or Inf values", path)
    if (sums < 0).any():
        raise SourceError(f"imatrix entry {name} holds negative sums of squares", path)
    if not np.isfinite(counts).all() or (counts < 0).any() or (counts > 2.0**53).any():
        raise SourceError(f"imatrix entry {name} has an invalid count ({counts.tolist()[:4]})", path)


# --------------------------------------------------------------------------- reading
def read_imatrix(path: str | Path) -> Imatrix:
    """Read a llama.cpp importance matrix (GGUF, or the legacy .dat). Raises SourceError naming the file."""
    path = Path(path)
    if not path.exists():
        raise SourceError("no such imatrix file", path)
    if path.is_dir():
        raise SourceError("is a folder, not an imatrix file", path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise SourceError(f"cannot read: {e.strerror or e}", path) from None
    im = _read_gguf(path) if magic == b"GGUF" else _read_legacy(path)
    im.path = str(path)
    return im


def _read_gguf(path: Path) -> Imatrix:
    from gguf import GGMLQuantizationType as T

    try:
        g = read_gguf(path)
    except QwqqError as e:
        msg = str(e)
        raise SourceError(msg[len(e.path) + 2:] if e.path and msg.startswith(e.path) else msg, path) from None
    kind = g.get(KEY_TYPE)
    if kind is not None and kind != "imatrix":
        raise SourceError(f"is not an importance matrix ({KEY_TYPE} is {kind!r})", path)
    missing = [k for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE) if k not in g.metadata]
    if missing:
        what = "is not an importance matrix" if kind is None else "lacks imatrix metadata"
        raise SourceError(f"{what} (no {', '.join(missing)})", path)
    datasets = g.array(KEY_DATASETS)
    if not isinstance(datasets, list) or not all(isinstance(d, str) for d in datasets):
        raise SourceError(f"{KEY_DATASETS} is not a list of strings", path)
    counts_meta = {}
    for k in (KEY_CHUNK_COUNT, KEY_CHUNK_SIZE):
        v = g.get(k)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise SourceError(f"{k} is {v!r}, not a count", path)
        counts_meta[k] = v

    pairs: dict[str, list] = {}
    for t in g.tensors:
        for i, suffix in enumerate((SUM2, COUNTS)):
            if t.name.endswith(suffix) and len(t.name) > len(suffix):
                pairs.setdefault(t.name[: -len(suffix)], [None, None])[i] = t
    if not pairs:
        raise SourceError("holds no imatrix entries (no <name>.in_sum2 / <name>.counts tensors)", path)
    entries: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        for name in sorted(pairs):
            ts, tc = pairs[name]
            if ts is None or tc is None:
                raise SourceError(f"imatrix entry {name} has {'no ' + SUM2 if ts is None else 'no ' + COUNTS} tensor",
                                  path)
            if ts.type != T.F32 or tc.type != T.F32:
                raise SourceError(f"imatrix entry {name}: sums and counts must be F32, not "
                                  f"{ts.type.name} / {tc.type.name}", path)
            n_mat, nval = tc.n_elements, ts.n_elements
            if n_mat < 1 or nval < 1 or nval % n_mat:
                raise SourceError(f"imatrix entry {name}: {nval} sums do not split into {n_mat} experts", path)
            if len(ts.shape) > 1 and ts.shape[0] * n_mat != nval:
                raise SourceError(f"imatrix entry {name}: in_sum2 {list(ts.shape)} does not match {n_mat} counts",
                                  path)
            sums = np.frombuffer(mm, "<f4", nval, ts.offset).astype(np.float32).reshape(n_mat, nval // n_mat)
            counts = np.frombuffer(mm, "<f4", n_mat, tc.offset).astype(np.float32)
            _check_entry(name, sums, counts, path)
            entries[name] = (sums, counts)
    return Imatrix(entries, list(datasets), counts_meta[KEY_CHUNK_COUNT], counts_meta[KEY_CHUNK_SIZE])


def _read_legacy(path: Path) -> Imatrix:
    data = path.read_bytes()
    size, pos = len(data), 0
    bad = "is neither a GGUF nor a legacy .dat importance matrix"

    def i32(what: str) -> int:
        nonlocal pos
        if pos + 4 > size:
            raise SourceError(f"truncated imatrix file (runs out while reading {what})" if pos else bad, path)
        v = struct.unpack_from("<i", data, pos)[0]
        pos += 4
        return v

    n_entries = i32("the entry count")
    if n_entries < 1 or n_entries > size // 12:  # an entry takes at least 12 bytes
        raise SourceError(bad, path)
    entries: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for i in range(n_entries):
        n = i32(f"the name of entry {i + 1}")
        if n < 1 or pos + n > size:
            raise SourceError(f"truncated or damaged imatrix file (name of entry {i + 1})" if i else bad, path)
        raw = data[pos:pos + n].split(b"\0", 1)[0]  # llama.cpp reads the name as a C string
        pos += n
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise SourceError(f"{bad} (entry {i + 1} has a name that is not UTF-8)", path) from None
        ncall = i32(f"entry {name}")
        nval = i32(f"entry {name}")
        if nval < 1 or pos + 4 * nval > size:
            raise SourceError(f"truncated or damaged imatrix file (entry {name}: {nval} values)", path)
        if ncall < 0:
            raise SourceError(f"imatrix entry {name} has a negative call count {ncall}", path)
        if name in entries:
            raise SourceError(f"imatrix entry {name} appears twice", path)
        sums = np.frombuffer(data, "<f4", nval, pos).astype(np.float32).reshape(1, nval)
        pos += 4 * nval
        counts = np.array([ncall], np.float32)
        _check_entry(name, sums, counts, path)
        entries[name] = (sums, counts)
    chunk_count, datasets = 0, []
    if pos < size:  # optional trailer: chunk count, then the dataset name
        chunk_count = i32("the chunk count")
        if pos < size:
            n = i32("the dataset name")
            if n < 0 or pos + n != size:
                raise SourceError("damaged imatrix file (bytes after the entries do not make a dataset name)", path)
            if n:
                datasets.append(data[pos:pos + n].split(b"\0", 1)[0].decode("utf-8", "replace"))
    return Imatrix(entries, datasets, max(chunk_count, 0), 0, legacy=True)


# --------------------------------------------------------------------------- writing
def _gguf_entries(im: Imatrix) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Entries as a GGUF imatrix stores them. Legacy data is rewritten so that llama-quantize reads the
    same per-column values: sums with counts = ncall, or counts = 1 where ncall is 0 (kept raw)."""
    out = {}
    for name, (sums, counts) in im.entries.items():
        sums = np.ascontiguousarray(sums, np.float32)
        counts = np.ascontiguousarray(counts, np.float32).reshape(-1)
        if sums.ndim != 2 or sums.shape[0] != counts.size or sums.size == 0:
            raise QwqqError(f"imatrix entry {name}: in_sum2 {list(sums.shape)} does not match counts {list(counts.shape)}")
        if im.legacy:
            counts = np.array([max(int(counts[0]), 1)], np.float32)
        _check_entry(name, sums, counts, im.path)
        out[name] = (sums, counts)
    return out


def write_imatrix(imatrix: Imatrix, path: str | Path, *, force: bool = False) -> Path:
    """Write `imatrix` as a llama.cpp GGUF importance matrix (what llama-imatrix writes), atomically."""
    import gguf

    path = Path(path)
    entries = _gguf_entries(imatrix)
    if not entries:
        raise QwqqError("an importance matrix needs at least one entry")

    class _W(gguf.GGUFWriter):  # the gguf package refuses empty arrays; llama.cpp writes them
        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if vtype == gguf.GGUFValueType.ARRAY and len(val) == 0 and sub_type is not None:
                return (self._pack("I", vtype) if add_vtype else b"") + self._pack("I", sub_type) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    with atomic_output(path, force=force) as tmp:
        w = _W(tmp, arch="")
        w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama-imatrix writes none
        w.add_string(KEY_TYPE, "imatrix")
        w.add_key_value(KEY_DATASETS, list(imatrix.datasets), gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING)
        w.add_uint32(KEY_CHUNK_COUNT, int(imatrix.chunk_count))
        w.add_uint32(KEY_CHUNK_SIZE, int(imatrix.chunk_size))
        for name in sorted(entries):
            sums, counts = entries[name]
            if sums.shape[0] == 1:  # gguf drops trailing dimensions of 1: ne [n_per_row] and [1]
                sums = sums.reshape(-1)
            w.add_tensor(name + SUM2, sums)
            w.add_tensor(name + COUNTS, counts.reshape(-1, 1) if counts.size > 1 else counts)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path

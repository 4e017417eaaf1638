"""Open a Hugging Face checkpoint (local folder or hub id) and read its tensors in row chunks.

Only safetensors are read, through our own header parser: every header is validated (lengths,
dtypes, shapes against byte counts, offsets inside the file and not overlapping) before a byte of
tensor data is touched, and data is read with pread into caller-owned buffers, so memory does not
grow with the model and nothing is ever memory-mapped whole. Pickle checkpoints (.bin/.pt) are
refused; nothing from the model folder is executed.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

import numpy as np

from qwqq import fp8
from qwqq.errors import SourceError

# safetensors dtype -> (numpy dtype used to hold the raw bytes, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("<f8", 8), "F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2),
    "I64": ("<i8", 8), "I32": ("<i4", 4), "I16": ("<i2", 2), "I8": ("i1", 1), "U8": ("u1", 1),
    "U16": ("<u2", 2), "U32": ("<u4", 4), "U64": ("<u8", 8), "BOOL": ("u1", 1),
    "F8_E4M3": ("u1", 1), "F8_E5M2": ("u1", 1),
}
FLOAT_DTYPES = {"F32", "F16", "BF16"}
MAX_HEADER = 100 * 2**20  # safetensors' own limit

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
HUB_FILES = [
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "*.safetensors",
    "model.safetensors.index.json", "vocab.json", "merges.txt",
]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes live: absolute byte range [start, end) in `file`."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int
    scale: "TensorRef | None" = None  # a block-scaled FP8 weight's scales (qwqq.fp8)
    block: tuple[int, int] | None = None

    @property
    def quantizable(self) -> bool:
        """A float type qwqq reads as float32: F32, F16, BF16, or FP8 with its block scales."""
        return self.dtype in FLOAT_DTYPES or self.scale is not None

    @property
    def rows(self) -> int:
        return prod(self.shape[:-1]) if len(self.shape) > 1 else 1

    @property
    def cols(self) -> int:
        return self.shape[-1] if self.shape else 1

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1]


@dataclass
class Checkpoint:
    root: Path
    config: dict
    tensors: dict[str, TensorRef]
    tokenizer_json: Path | None = None
    tokenizer_config: dict = field(default_factory=dict)
    chat_template: str | None = None
    generation_config: dict = field(default_factory=dict)
    hub_id: str | None = None

    @property
    def name(self) -> str:
        """A model name for file names and general.name: the hub id's tail or the folder name."""
        name = (self.hub_id or self.root.name).rstrip("/").split("/")[-1]
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")  # a folder name not in UTF-8


# --------------------------------------------------------------------------- safetensors headers
def read_safetensors_header(path: Path) -> dict[str, TensorRef]:
    """Parse and validate one safetensors file's header. Raises SourceError naming the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SourceError("truncated safetensors file (shorter than its 8-byte header length)", path)
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise SourceError(f"safetensors header length {n} runs beyond the file ({size} bytes): truncated or not safetensors", path)
            if n > MAX_HEADER:
                raise SourceError(f"safetensors header of {n} bytes is larger than the {MAX_HEADER} allowed", path)
            raw = f.read(n)
    except OSError as e:
        raise SourceError(f"cannot read: {e.strerror or e}", path) from e
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:  # bad UTF-8, bad JSON, nesting or numbers too deep / long
        raise SourceError(f"corrupt safetensors header ({_one_line(e)})", path) from e
    if not isinstance(header, dict):
        raise SourceError("corrupt safetensors header (not a JSON object)", path)
    data_start, data_len = 8 + n, size - 8 - n
    refs: dict[str, TensorRef] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        refs[name] = _tensor_ref(path, name, info, data_start, data_len)
    spans = sorted((r.start, r.end, r.name) for r in refs.values() if r.end > r.start)
    for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise SourceError(f"tensors {n0} and {n1} overlap in the data section", path)
    return refs


def _tensor_ref(path: Path, name: str, info, data_start: int, data_len: int) -> TensorRef:
    if not isinstance(info, dict):
        raise SourceError(f"tensor {name}: malformed header entry", path)
    dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise SourceError(f"tensor {name}: unknown dtype {dtype!r}", path)
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise SourceError(f"tensor {name}: malformed shape {shape!r}", path)
    if (not isinstance(offs, list) or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
        raise SourceError(f"tensor {name}: malformed data_offsets {offs!r}", path)
    begin, end = offs
    if not 0 <= begin <= end:
        raise SourceError(f"tensor {name}: data_offsets {offs} are not an increasing range", path)
    if end > data_len:
        raise SourceError(f"tensor {name}: data ends at byte {end} but the file holds {data_len} (truncated?)", path)
    nbytes = prod(shape) * DTYPES[dtype][1]
    if end - begin != nbytes:
        raise SourceError(f"tensor {name}: shape {shape} in {dtype} needs {nbytes} bytes, the header gives {end - begin}", path)
    return TensorRef(name, path, dtype, tuple(shape), data_start + begin, data_start + end)


# --------------------------------------------------------------------------- reading rows
class RowReader:
    """Reads row ranges of tensors as float32 with pread; keeps one descriptor per shard file."""

    def __init__(self):
        self._fds: dict[Path, int] = {}

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise SourceError(f"cannot open: {e.strerror}", path) from e
            self._fds[path] = fd
        return fd

    def read_raw(self, ref: TensorRef, r0: int, r1: int, buf: np.ndarray | None = None) -> np.ndarray:
        """Raw bytes of rows [r0, r1) as uint8 (into buf when given)."""
        row_bytes = ref.cols * ref.itemsize
        n = (r1 - r0) * row_bytes
        out = buf[:n] if buf is not None else np.empty(n, dtype=np.uint8)
        off = ref.start + r0 * row_bytes
        fd = self._fd(ref.file)
        got = 0
        view = memoryview(out)
        while got < n:
            k = os.preadv(fd, [view[got:]], off + got)
            if k <= 0:
                raise SourceError(f"tensor {ref.name}: unexpected end of file (truncated?)", ref.file)
            got += k
        return out

    def read_f32(self, ref: TensorRef, r0: int, r1: int, out: np.ndarray | None = None,
                 scratch: np.ndarray | None = None, widen=None) -> np.ndarray:
        """Rows [r0, r1) of `ref`, viewed as a 2-D [rows, cols] matrix, converted to float32.

        bf16 -> f32 is exact (a 16-bit shift); f16 -> f32 is exact too. `widen(dtype, raw, out)`, when
        given, does the 16-bit conversion instead of numpy (the GGUF path passes ggml's SIMD rows).
        """
        if not ref.quantizable:
            raise SourceError(f"tensor {ref.name}: dtype {ref.dtype} is not a float type qwqq can quantize", ref.file)
        nrows, cols = r1 - r0, ref.cols
        res = out[: nrows * cols].reshape(nrows, cols) if out is not None else np.empty((nrows, cols), np.float32)
        if ref.scale is not None:  # block-scaled FP8
            s = ref.scale
            return fp8.dequantize(self.read_raw(ref, r0, r1, scratch), ref, r0, r1, res,
                                  lambda a, b: self.read_f32(s, a, b))
        if ref.dtype == "F32":
            self.read_raw(ref, r0, r1, res.reshape(-1).view(np.uint8))
            return res
        raw = self.read_raw(ref, r0, r1, scratch)
        if widen is not None:
            widen(ref.dtype, raw, res.reshape(-1))
        elif ref.dtype == "BF16":
            u32 = res.view(np.uint32)
            np.copyto(u32, raw.view("<u2").reshape(nrows, cols), casting="safe")
            np.left_shift(u32, 16, out=u32)
        else:
            np.copyto(res, raw.view("<f2").reshape(nrows, cols), casting="safe")
        return res

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------- opening a checkpoint
def resolve(spec: str | Path) -> tuple[Path, str | None]:
    """A local folder as is, or a hub id downloaded (config, tokenizer and safetensors only)."""
    try:
        p = Path(spec).expanduser()
    except RuntimeError:  # ~user that does not exist
        p = Path(spec)
    if p.exists():
        if not p.is_dir():
            raise SourceError("expected a Hugging Face model folder (config.json + *.safetensors), got a file", p)
        return p, None
    s = str(spec)
    if HUB_ID.match(s) and not s.startswith((".", "/", "~")):
        return _download(s), s
    raise SourceError("no such folder (and not a hub id like Qwen/QwQ-32B)", s)


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError,
        )
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise SourceError(f"huggingface_hub is needed to download hub models ({e})", repo_id) from e
    try:
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=HUB_FILES))
    except GatedRepoError as e:
        raise SourceError("gated model: accept its license on the hub and log in (huggingface-cli login)", repo_id) from e
    except RepositoryNotFoundError as e:
        raise SourceError("no such model on the hub (or it is private)", repo_id) from e
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else \
            "cannot reach the hub and it is not in the local cache"
        raise SourceError(why, repo_id) from e
    except HfHubHTTPError as e:
        raise SourceError(f"hub download failed: {str(e).splitlines()[0]}", repo_id) from e
    except OSError as e:
        raise SourceError(f"download failed: {e.strerror or e}", repo_id) from e
    except Exception as e:  # network stacks raise many things (httpx, requests)
        raise SourceError(f"hub download failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", repo_id) from e


def _read_json(path: Path, required: bool) -> dict:
    if not path.is_file():
        if required:
            raise SourceError(f"missing {path.name}", path.parent)
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SourceError(f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}", path) from e
    except (OSError, ValueError, RecursionError) as e:  # unreadable, not UTF-8, nested or numbers too deep / long
        raise SourceError(f"cannot read: {_one_line(e)}", path) from e
    if not isinstance(data, dict):
        raise SourceError("malformed: expected a JSON object", path)
    return data


def _one_line(e: BaseException) -> str:
    text = (getattr(e, "strerror", None) or str(e) or type(e).__name__).splitlines()
    return text[0] if text else type(e).__name__


def _inside(root: Path, name: str, what: Path) -> Path:
    """A file named inside an index or config must be a plain name in the model folder."""
    if not isinstance(name, str) or not name or "\\" in name or name.startswith("/") or ".." in Path(name).parts \
            or Path(name).is_absolute():
        raise SourceError(f"refers to {name!r}, outside the model folder", what)
    return root / name


def checkpoint_of(source: "str | Path | Checkpoint") -> Checkpoint:
    """An open checkpoint as it is; a folder or hub id opened."""
    return source if isinstance(source, Checkpoint) else open_checkpoint(source)


def open_checkpoint(spec: str | Path) -> Checkpoint:
    root, hub_id = resolve(spec)
    config = _read_json(root / "config.json", required=True)
    tensors = fp8.attach_scales(_index_tensors(root), config, root)
    tok_json = root / "tokenizer.json"
    tok_cfg = _read_json(root / "tokenizer_config.json", required=False)
    template = _chat_template(root, tok_cfg)
    gen = _check_generation_config(_read_json(root / "generation_config.json", required=False),
                                   root / "generation_config.json")
    return Checkpoint(root, config, tensors, tok_json if tok_json.is_file() else None, tok_cfg, template, gen, hub_id)


def _chat_template(root: Path, tok_cfg: dict) -> str | None:
    jinja = root / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, ValueError) as e:
            raise SourceError(f"cannot read: {_one_line(e)}", jinja) from e
    cj = root / "chat_template.json"
    if cj.is_file():
        t = _read_json(cj, required=False).get("chat_template")
        if isinstance(t, str):
            return _utf8(t, "chat_template", cj)
    t = tok_cfg.get("chat_template")
    if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict) and isinstance(d.get("name"), str)}
        t = named.get("default") or next(iter(named.values()), None)
    return _utf8(t, "chat_template", root / "tokenizer_config.json") if isinstance(t, str) else None


def _utf8(text: str, what: str, where: Path) -> str:
    """A JSON string can hold a lone surrogate ("\\ud800"), which no UTF-8 file (GGUF) can."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise SourceError(f"{what} is not valid UTF-8 text (it holds a lone surrogate)", where) from None
    return text


# generation_config.json values qwqq writes as GGUF general.sampling.* (see qwqq.gguf.header.SAMPLING_KEYS):
# key -> (smallest, largest) a GGUF f32 / i32 holds.
_F32 = (-3.4e38, 3.4e38)
SAMPLING_RANGES = {"temperature": _F32, "top_p": _F32, "min_p": _F32, "repetition_penalty": _F32,
                   "top_k": (-(2**31), 2**31 - 1)}


def _check_generation_config(gen: dict, where: Path) -> dict:
    for key, (lo, hi) in SAMPLING_RANGES.items():
        v = gen.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not lo <= v <= hi:
            raise SourceError(f"{key} is {v!r}, out of range", where)
    return gen


def _index_tensors(root: Path) -> dict[str, TensorRef]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, required=True).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise SourceError("malformed index: no weight_map", index)
        for fname in weight_map.values():
            _inside(root, fname, index)
        files = {}
        for fname in sorted(set(weight_map.values())):
            path = _inside(root, fname, index)
            if not path.is_file():
                raise SourceError(f"names shard {fname}, which is missing", index)
            files[fname] = read_safetensors_header(path)
        tensors = {}
        for name, fname in weight_map.items():
            if name not in files[fname]:
                raise SourceError(f"says tensor {name} is in {fname}, but it is not there", index)
            tensors[name] = files[fname][name]
        return tensors
    shards = sorted(root.glob("*.safetensors"))
    if not shards:
        pickles = [p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise SourceError(
                f"only pickle checkpoints ({', '.join(pickles[:3])}): qwqq never loads pickles, which can run code; "
                "convert them to safetensors first", root)
        raise SourceError("no *.safetensors weights", root)
    tensors = {}
    for shard in shards:
        for name, ref in read_safetensors_header(shard).items():
            if name in tensors:
                raise SourceError(f"tensor {name} appears in two shards ({tensors[name].file.name}, {shard.name})", root)
            tensors[name] = ref
    return tensors

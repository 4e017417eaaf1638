"""The three reader fuzzers, shared by tests/test_fuzz.py (short, in CI) and bench/fuzz_readers.py (long runs).

Each target takes one input, feeds it to a qwqq reader and lets through only the error type that reader
promises; anything else escaping is a bug (a crash a user would see as a traceback):

- safetensors: bytes of a .safetensors file -> qwqq.source.read_safetensors_header -> only SourceError;
  a header it accepts must describe byte ranges inside the file that match dtype x shape.
- gguf: bytes of a .gguf file -> qwqq.gguf.reader.read_gguf (then every lazy array decoded, every tensor
  hashed) -> only GGUFError.
- config: a config.json value beside real safetensors headers -> open_checkpoint + plan_checkpoint, then the
  GGUF metadata the writer would make from it, serialized -> only QwqqError.

Seeds are valid inputs built here (a small safetensors file, a small GGUF written with gguf.GGUFWriter,
the tiny fixtures' configs over sparse copies of their weights), and the strategies mutate them.
"""

from __future__ import annotations

import io
import json
import math
import struct
import tempfile
from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np
from hypothesis import strategies as st

from qwqq.errors import QwqqError, SourceError
from qwqq.gguf.reader import GGUFError, LazyArray, read_gguf
from qwqq.source import DTYPES, read_safetensors_header

INTERESTING_INTS = [0, 1, -1, 7, 8, 255, 256, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53, 2**63 - 1, 2**63, 2**64 - 1,
                    2**64, 10**30, -(2**63)]
INTERESTING_FLOATS = [0.0, -0.0, 1e-30, 1e38, 3.5e38, 1e308, math.inf, -math.inf, math.nan, 0.5, -1.0]


def scratch_dir() -> Path:
    """Where fuzz inputs are written: memory when there is a /dev/shm."""
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix="qwqq-fuzz-", dir=shm if shm.is_dir() else None))


# ---------------------------------------------------------------- JSON values
json_scalars = (st.none() | st.booleans() | st.sampled_from(INTERESTING_INTS) | st.integers()
                | st.sampled_from(INTERESTING_FLOATS) | st.floats(allow_nan=True, allow_infinity=True)
                | st.text(max_size=12) | st.sampled_from(["F16", "BF16", "F32", "I64", "", "default", "yarn", "llama3"]))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=12,
)


# ---------------------------------------------------------------- byte mutations
@st.composite
def mutated_bytes(draw, seed: bytes, region: int) -> bytes:
    """The seed with 1-8 edits, mostly within its first `region` bytes (the header), maybe truncated."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 8))):
        if not data:
            break
        hi = max(1, min(region, len(data)))
        pos = draw(st.integers(0, hi - 1))
        kind = draw(st.sampled_from(["flip", "byte", "u32", "u64", "insert", "delete", "cut"]))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte":
            data[pos] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF, ord('"'), ord("{"), ord("["), ord("\\")]))
        elif kind in ("u32", "u64"):
            width, fmt = (4, "<I") if kind == "u32" else (8, "<Q")
            v = draw(st.sampled_from(INTERESTING_INTS) | st.integers(0, 2**64 - 1) | st.just(len(data))) % (1 << (8 * width))
            data[pos:pos + width] = struct.pack(fmt, v)
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[pos:pos + draw(st.integers(1, 16))]
        else:
            del data[draw(st.integers(0, len(data) - 1)):]
    return bytes(data)


# ---------------------------------------------------------------- safetensors
def safetensors_bytes(header: dict | list, data: bytes, length: int | None = None, pad: bool = True) -> bytes:
    raw = json.dumps(header, separators=(",", ":"), allow_nan=True).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw) if length is None else length % 2**64) + raw + data


def safetensors_seed() -> tuple[dict, bytes]:
    """A small valid safetensors file's header and data: float and int tensors, a scalar, an empty tensor."""
    specs = [("model.embed_tokens.weight", "BF16", [16, 8]), ("model.norm.weight", "F32", [8]),
             ("model.layers.0.mlp.up_proj.weight", "F16", [4, 8]), ("pos", "I64", [3]), ("scale", "F32", []),
             ("empty", "F16", [0, 8])]
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, dtype, shape in specs:
        n = prod(shape) * DTYPES[dtype][1]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + n]}
        off += n
    return header, bytes(range(256)) * (off // 256) + bytes(range(off % 256))


SAFETENSORS_FIELDS = ["dtype", "shape", "data_offsets"]


@st.composite
def mutated_safetensors_header(draw, header: dict, data: bytes) -> bytes:
    """The seed's header with tensor entries edited as JSON (fields replaced, removed, added), re-encoded
    with a right, wrong or random length."""
    h = json.loads(json.dumps(header))
    names = [k for k in h if k != "__metadata__"]
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["field", "field", "offsets", "shape", "drop-field", "entry", "new", "metadata"]))
        name = draw(st.sampled_from(names))
        entry = h.get(name)
        if kind == "field" and isinstance(entry, dict):
            entry[draw(st.sampled_from(SAFETENSORS_FIELDS))] = draw(json_values)
        elif kind == "offsets" and isinstance(entry, dict):
            entry["data_offsets"] = draw(st.lists(st.sampled_from(INTERESTING_INTS) | st.integers(-10, len(data) + 10),
                                                  min_size=0, max_size=3))
        elif kind == "shape" and isinstance(entry, dict):
            entry["shape"] = draw(st.lists(st.sampled_from(INTERESTING_INTS) | st.integers(-2, 20), max_size=5))
        elif kind == "drop-field" and isinstance(entry, dict):
            entry.pop(draw(st.sampled_from(SAFETENSORS_FIELDS)), None)
        elif kind == "entry":
            h[name] = draw(json_values)
        elif kind == "new":
            h[draw(st.text(max_size=12))] = draw(json_values)
        else:
            h["__metadata__"] = draw(json_values)
    length = draw(st.none() | st.none() | st.sampled_from(INTERESTING_INTS) | st.integers(0, 2**64 - 1))
    cut = draw(st.none() | st.none() | st.none() | st.integers(0, len(data)))
    return safetensors_bytes(h, data[:cut] if cut is not None else data, length, pad=draw(st.booleans()))


def safetensors_inputs():
    header, data = safetensors_seed()
    seed = safetensors_bytes(header, data)
    region = 8 + struct.unpack("<Q", seed[:8])[0]
    return st.one_of(
        mutated_bytes(seed, region),
        mutated_safetensors_header(header, data),
        st.binary(max_size=64),
        st.builds(lambda n, tail: struct.pack("<Q", n) + tail, st.sampled_from(INTERESTING_INTS).map(lambda v: v % 2**64),
                  st.binary(max_size=64)),
    )


def check_safetensors(data: bytes, path: Path) -> str:
    """One input through read_safetensors_header; returns "ok" or "refused"."""
    path.write_bytes(data)
    try:
        refs = read_safetensors_header(path)
    except SourceError:
        return "refused"
    size = len(data)
    for ref in refs.values():
        assert ref.dtype in DTYPES
        assert 0 <= ref.start <= ref.end <= size, ref
        assert ref.end - ref.start == prod(ref.shape) * DTYPES[ref.dtype][1], ref
    return "ok"


# ---------------------------------------------------------------- GGUF
def gguf_seed(path: Path) -> bytes:
    """A small valid GGUF: every value type, a short and a long (lazy) string array, F32/F16/Q8_0 tensors."""
    import gguf

    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("fuzz seed")
    w.add_uint32("qwen2.block_count", 2)
    w.add_int32("test.i32", -5)
    w.add_float32("qwen2.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float64("test.f64", 2.5)
    w.add_uint64("test.u64", 2**40)
    w.add_int8("test.i8", -1)
    w.add_uint16("test.u16", 7)
    w.add_bool("test.bool", True)
    w.add_uint32("general.file_type", 7)
    w.add_string("tokenizer.chat_template", "{% for m in messages %}{{ m.content }}{% endfor %}")
    w.add_token_list([f"tok{i}" for i in range(100)])  # long: stays lazy
    w.add_token_types([1] * 100)
    w.add_array("test.short", ["a", "bb", "ccc"])
    w.add_array("test.floats", [0.5] * 70)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.add_tensor("output_norm.weight", np.ones(32, np.float16))
    w.add_tensor("blk.0.attn_q.weight", np.zeros((2, 34), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def gguf_inputs(seed: bytes):
    header_end = read_gguf_bytes_data_offset(seed)
    return st.one_of(
        mutated_bytes(seed, header_end),
        mutated_bytes(seed, len(seed)),
        st.integers(0, len(seed)).map(lambda n: seed[:n]),
        st.builds(lambda v, rest: b"GGUF" + struct.pack("<I", v) + rest, st.sampled_from([1, 2, 3, 4, 2**32 - 1]),
                  st.binary(max_size=96)),
        st.binary(max_size=64),
    )


def read_gguf_bytes_data_offset(seed: bytes) -> int:
    d = scratch_dir()
    p = d / "seed.gguf"
    p.write_bytes(seed)
    try:
        return read_gguf(p).data_offset
    finally:
        p.unlink()
        d.rmdir()


def check_gguf(data: bytes, path: Path) -> str:
    path.write_bytes(data)
    try:
        g = read_gguf(path)
        for key, value in g.metadata.items():
            if isinstance(value, LazyArray):
                assert len(g.array(key)) == value.count
        for t in g.tensors:
            assert t.offset + t.nbytes <= len(data)
            g.tensor_sha256(t)
    except GGUFError:
        return "refused"
    return "ok"


# ---------------------------------------------------------------- config.json
@dataclass
class ConfigSeed:
    folder: Path  # holds a sparse copy of a tiny model's safetensors; config.json is rewritten per input
    config: dict


def config_seeds(root: Path, archs=("qwen2", "qwen3_moe", "llama")) -> list[ConfigSeed]:
    """Sparse copies (header + zero data) of the tiny fixtures' weights, with their configs."""
    from tests import fixtures

    seeds = []
    for arch in archs:
        src = fixtures.tiny_model_dir(arch)
        folder = root / arch
        folder.mkdir(parents=True)
        for shard in src.glob("*.safetensors"):
            with open(shard, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                head = f.read(n)
            with open(folder / shard.name, "wb") as g:
                g.write(struct.pack("<Q", n) + head)
                g.truncate(shard.stat().st_size)
        seeds.append(ConfigSeed(folder, json.loads((src / "config.json").read_text())))
    return seeds


CONFIG_KEYS = ["architectures", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "intermediate_size", "max_position_embeddings", "rms_norm_eps", "head_dim", "vocab_size",
               "rope_theta", "rope_scaling", "rope_parameters", "num_experts", "num_experts_per_tok",
               "moe_intermediate_size", "decoder_sparse_step", "mlp_only_layers", "tie_word_embeddings",
               "bos_token_id", "eos_token_id", "model_type", "num_local_experts", "original_max_position_embeddings"]


@st.composite
def mutated_config(draw, seeds: list[ConfigSeed]):
    i = draw(st.integers(0, len(seeds) - 1))
    c = json.loads(json.dumps(seeds[i].config))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["set", "set", "number", "drop", "rope", "arch"]))
        key = draw(st.sampled_from(CONFIG_KEYS))
        if kind == "set":
            c[key] = draw(json_values)
        elif kind == "number":
            c[key] = draw(st.sampled_from(INTERESTING_INTS + INTERESTING_FLOATS) | st.integers(-3, 600))
        elif kind == "drop":
            c.pop(key, None)
        elif kind == "rope":
            rp = c.setdefault("rope_parameters", {}) if isinstance(c.get("rope_parameters"), dict) else {}
            rp[draw(st.sampled_from(["rope_type", "type", "factor", "rope_theta", "original_max_position_embeddings",
                                     "full_attention"]))] = draw(json_values)
            c["rope_parameters"] = rp
        else:
            c["architectures"] = [draw(st.sampled_from(["Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM",
                                                        "LlamaForCausalLM"]))]
    return i, c


def config_inputs(seeds: list[ConfigSeed]):
    return st.one_of(
        mutated_config(seeds),
        st.tuples(st.integers(0, len(seeds) - 1), json_values),
        st.tuples(st.integers(0, len(seeds) - 1),
                  st.dictionaries(st.sampled_from(CONFIG_KEYS) | st.text(max_size=8), json_values, max_size=8)),
    )


def _metadata_bytes(ckpt, arch, plan) -> bytes:
    """The GGUF header the writer would make for this config (tokenizer replaced by a two-token stand-in)."""
    import gguf

    from qwqq.gguf.vocab import Vocab
    from qwqq.gguf.header import write_metadata

    vocab = Vocab(model="gpt2", pre="qwen2", tokens=["a", "b"], types=[1, 1], merges=["a b"])
    w = gguf.GGUFWriter(None, arch.name)
    write_metadata(w, ckpt, arch, plan, vocab)
    buf = io.BytesIO()
    w.fout, w.state = [buf], gguf.gguf_writer.WriterState.EMPTY
    w.write_header_to_file()
    w.write_kv_data_to_file()
    return buf.getvalue()


def check_config(item, seeds: list[ConfigSeed]) -> str:
    """One (seed index, config value) pair: the value is written as config.json beside that seed's weights."""
    i, config = item
    return check_config_bytes(json.dumps(config, allow_nan=True).encode(), i, seeds)


def check_config_bytes(raw: bytes, i: int, seeds: list[ConfigSeed]) -> str:
    """`raw` as config.json beside seed i's weights, through open_checkpoint, plan_checkpoint and the
    writer's metadata; returns "ok" or "refused"."""
    from qwqq.gguf.quantize import plan_checkpoint
    from qwqq.source import open_checkpoint

    folder = seeds[i].folder
    (folder / "config.json").write_bytes(raw)
    try:
        ckpt = open_checkpoint(folder)
        arch, tensors, plan = plan_checkpoint(ckpt, "Q4_K_M")
        _metadata_bytes(ckpt, arch, plan)
    except QwqqError:
        return "refused"
    return "ok"

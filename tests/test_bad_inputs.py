"""A corpus of broken and hostile inputs, each run through the real CLI.

The rules every case holds qwqq to (the reliability issue):

- exit status non-zero;
- stderr is exactly one non-empty line, ``error: PATH: problem``, naming the offending file
  (or tensor, or option) and the problem; never a traceback;
- nothing is left under the final output name, and no ``.qwqq-partial`` / ``.lock`` beside it.

Every damaged model is built here from the tiny qwen2 fixture: the folder is "cloned" with symlinks
(nothing is copied), and a damaged file is written in place of its link (never through it: the
cached fixture stays intact). Damaged safetensors are written sparse (a real header over a data
section of zeros), so a 150 MB model costs a few KB of disk.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from tests import fixtures
from tests.conftest import run_qwqq

ST = "model.safetensors"


# ---------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def base() -> Path:
    """The pristine tiny qwen2 model (cached fixture: never written to)."""
    return fixtures.tiny_model_dir("qwen2")


@pytest.fixture(scope="module")
def base_header(base) -> tuple[dict, int]:
    """The fixture's safetensors header and the length of its data section."""
    return read_st_header(base / ST)


def clone(src: Path, dst: Path) -> Path:
    """A model folder whose files are symlinks to `src`'s; damage files with `put`, never by writing through."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).symlink_to(f)
    return dst


def put(path: Path, data: bytes | str) -> Path:
    """Replace a file (or the link that stands for it) with new contents."""
    path.unlink(missing_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
    return path


def edit_json(path: Path, fn: Callable[[dict], object]) -> Path:
    """Rewrite a JSON file after `fn` changed its object in place."""
    data = json.loads(path.read_text(encoding="utf-8"))
    fn(data)
    return put(path, json.dumps(data))


def read_st_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return header, path.stat().st_size - 8 - n


def encode_header(header) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def write_st(path: Path, header, data_len: int, patches: dict[int, bytes] | None = None,
             raw_header: bytes | None = None, length: int | None = None) -> Path:
    """A safetensors file: 8-byte length, header, then a sparse data section of `data_len` zero bytes,
    with `patches` (data offset -> bytes) written over it."""
    raw = raw_header if raw_header is not None else encode_header(header)
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if length is None else length))
        f.write(raw)
        start = f.tell()
        f.truncate(start + data_len)
        for off, b in (patches or {}).items():
            f.seek(start + off)
            f.write(b)
    return path


def leftovers(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if ".qwqq-partial" in p.name or p.name.endswith(".lock"))


def assert_one_line_error(proc: subprocess.CompletedProcess, phrase: str, *names) -> str:
    """Non-zero exit, exactly one non-empty stderr line holding `phrase` and every one of `names`."""
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    assert proc.returncode != 0, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr}"
    line = lines[0]
    assert line.startswith("error: "), line
    assert phrase in line, f"{phrase!r} not in {line!r}"
    for name in names:
        assert str(name) in line, f"{str(name)!r} not in {line!r}"
    return line


def assert_refused(proc, out: Path, phrase: str, *names) -> str:
    line = assert_one_line_error(proc, phrase, *names)
    assert not out.exists(), f"{out} was left behind"
    assert not leftovers(out.parent), leftovers(out.parent)
    return line


# ---------------------------------------------------------------- the corpus: damaged model folders
@dataclass
class Ctx:
    tmp: Path
    base: Path
    header: dict
    data_len: int

    @property
    def src(self) -> Path:
        return self.tmp / "model"

    def model(self) -> Path:
        return clone(self.base, self.src)

    def st(self, header=None, data_len=None, **kw) -> Path:
        """Replace model.safetensors with a sparse copy (header as given, default the real one)."""
        return write_st(self.src / ST, self.header if header is None else header,
                        self.data_len if data_len is None else data_len, **kw)

    def header_with(self, name: str, **changes) -> dict:
        h = json.loads(json.dumps(self.header))
        h[name].update(changes)
        return h

    def index(self, weight_map: dict) -> Path:
        return put(self.src / "model.safetensors.index.json", json.dumps({"metadata": {}, "weight_map": weight_map}))

    def full_map(self) -> dict:
        return {k: ST for k in self.header if k != "__metadata__"}


EMB = "model.embed_tokens.weight"
NORM = "model.norm.weight"
DOWN1 = "model.layers.1.mlp.down_proj.weight"


def _config(c: Ctx, fn) -> Path:
    m = c.model()
    edit_json(m / "config.json", fn)
    return m


def case_config_missing(c):
    m = c.model()
    (m / "config.json").unlink()
    return m, "missing config.json", (m,)


def case_config_bad_json(c):
    m = c.model()
    put(m / "config.json", '{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 256,,}')
    return m, "malformed JSON at line 1", (m / "config.json",)


def case_config_array(c):
    m = c.model()
    put(m / "config.json", '[{"architectures": ["Qwen2ForCausalLM"]}]')
    return m, "expected a JSON object", (m / "config.json",)


def case_config_not_utf8(c):
    m = c.model()
    put(m / "config.json", b'{"architectures": ["\xff\xfe"]}')
    return m, "cannot read", (m / "config.json",)


def case_config_no_layers(c):
    m = _config(c, lambda d: d.pop("num_hidden_layers"))
    return m, "lacks num_hidden_layers", (m / "config.json",)


def case_config_layers_not_a_number(c):
    m = _config(c, lambda d: d.update(num_hidden_layers="two"))
    return m, "num_hidden_layers", (m / "config.json",)


def case_config_zero_heads(c):
    m = _config(c, lambda d: d.update(num_attention_heads=0))
    return m, "num_attention_heads", (m / "config.json",)


def case_config_unsupported_arch(c):
    m = _config(c, lambda d: d.update(architectures=["GPT2LMHeadModel"]))
    return m, "architecture GPT2LMHeadModel is not supported; supported: Qwen2ForCausalLM, Qwen3ForCausalLM", (
        m / "config.json", "LlamaForCausalLM")


def case_config_no_architectures(c):
    m = _config(c, lambda d: d.pop("architectures"))
    return m, "names no architecture", (m / "config.json", "Qwen2ForCausalLM")


def case_config_architectures_garbage(c):
    m = _config(c, lambda d: d.update(architectures=[{"class": "Qwen2ForCausalLM"}]))
    return m, "architecture", (m / "config.json",)


def case_config_more_layers_than_weights(c):
    m = _config(c, lambda d: d.update(num_hidden_layers=3))
    return m, "config.json: says 3 layers, the weights hold 2", (m,)


def case_config_fewer_layers_than_weights(c):
    m = _config(c, lambda d: d.update(num_hidden_layers=1))
    return m, "config.json: says 1 layers, the weights hold 2", (m,)


def case_config_hidden_size_disagrees(c):
    m = _config(c, lambda d: d.update(hidden_size=320))
    return m, f"but config.json says vocab {fixtures.TINY_VOCAB_SIZE} x hidden 320", (m, EMB)


def case_config_rope_scaling_garbage(c):
    m = _config(c, lambda d: d.update(rope_scaling=["yarn", 4.0]))
    return m, "rope_scaling", (m / "config.json",)


def case_config_value_out_of_range(c):
    m = _config(c, lambda d: d.update(max_position_embeddings=2**40))
    return m, "max_position_embeddings", (m / "config.json",)


def case_config_heads_not_a_multiple_of_kv_heads(c):
    m = _config(c, lambda d: d.update(num_key_value_heads=3))
    return m, "num_attention_heads 4 is not a multiple of num_key_value_heads 3", (m / "config.json",)


def case_config_kv_heads_disagree_with_weights(c):
    m = _config(c, lambda d: d.update(num_key_value_heads=4))
    return m, "but config.json says 4 heads x head_dim 64", (m / "config.json", "model.layers.0.self_attn.k_proj.weight")


def case_generation_config_out_of_range(c):
    m = c.model()
    put(m / "generation_config.json", json.dumps({"top_k": 10**20}))
    return m, "top_k is 100000000000000000000, out of range", (m / "generation_config.json",)


def case_chat_template_not_utf8(c):
    m = c.model()
    put(m / "chat_template.jinja", b"\xff\xfe{{ messages }}")
    return m, "cannot read", (m / "chat_template.jinja",)


def case_chat_template_lone_surrogate(c):
    m = c.model()
    edit_json(m / "tokenizer_config.json", lambda d: d.update(chat_template="{{ bos_token }}\ud800"))
    return m, "chat_template is not valid UTF-8 text", (m / "tokenizer_config.json",)


def case_tokenizer_missing(c):
    m = c.model()
    (m / "tokenizer.json").unlink()
    return m, "missing tokenizer.json", (m,)


def case_tokenizer_bad_json(c):
    m = c.model()
    put(m / "tokenizer.json", '{"model": {"type": "BPE", "vocab": {"a": 0}')
    return m, "malformed tokenizer", (m / "tokenizer.json",)


def case_tokenizer_not_object(c):
    m = c.model()
    put(m / "tokenizer.json", '["BPE"]')
    return m, "malformed tokenizer", (m / "tokenizer.json",)


def case_tokenizer_not_bpe(c):
    m = c.model()
    put(m / "tokenizer.json", json.dumps({"model": {"type": "Unigram", "vocab": [["a", 0.0]]}}))
    return m, "is not byte-level BPE", (m / "tokenizer.json",)


def case_tokenizer_vocab_garbage(c):
    m = c.model()
    put(m / "tokenizer.json", json.dumps({"model": {"type": "BPE", "vocab": {"a": "zero", "b": [1]}, "merges": []}}))
    return m, "malformed tokenizer", (m / "tokenizer.json",)


def case_index_missing_shard(c):
    m = c.model()
    wm = c.full_map()
    wm[NORM] = "model-00002-of-00002.safetensors"
    c.index(wm)
    return m, "names shard model-00002-of-00002.safetensors, which is missing", (m / "model.safetensors.index.json",)


def case_index_tensor_not_in_shard(c):
    m = c.model()
    c.index({**c.full_map(), "model.layers.9.mlp.up_proj.weight": ST})
    return m, "says tensor model.layers.9.mlp.up_proj.weight is in model.safetensors, but it is not there", (
        m / "model.safetensors.index.json",)


def case_index_parent_path(c):
    m = c.model()
    (c.tmp / "x.safetensors").symlink_to(c.base / ST)  # a real shard there: refused for where it is, not for lacking
    c.index({k: "../x.safetensors" for k in c.full_map()})
    return m, "refers to '../x.safetensors', outside the model folder", (m / "model.safetensors.index.json",)


def case_index_absolute_path(c):
    m = c.model()
    c.index({k: str(c.base / ST) for k in c.full_map()})
    return m, "outside the model folder", (m / "model.safetensors.index.json", c.base / ST)


def case_index_shard_name_not_a_string(c):
    m = c.model()
    c.index({**c.full_map(), NORM: ["model.safetensors"]})
    return m, "refers to ['model.safetensors'], outside the model folder", (m / "model.safetensors.index.json",)


def case_index_no_weight_map(c):
    m = c.model()
    put(m / "model.safetensors.index.json", json.dumps({"metadata": {}, "weight_map": ["model.safetensors"]}))
    return m, "malformed index: no weight_map", (m / "model.safetensors.index.json",)


def case_st_cut_in_length(c):
    m = c.model()
    with open(c.base / ST, "rb") as f:
        put(m / ST, f.read(5))
    return m, "shorter than its 8-byte header length", (m / ST,)


def case_st_empty(c):
    m = c.model()
    put(m / ST, b"")
    return m, "truncated safetensors file", (m / ST,)


def case_st_cut_in_header(c):
    m = c.model()
    with open(c.base / ST, "rb") as f:
        put(m / ST, f.read(1000))
    return m, "runs beyond the file (1000 bytes): truncated or not safetensors", (m / ST,)


def case_st_cut_in_data(c):
    m = c.model()
    with open(c.base / ST, "rb") as f:
        put(m / ST, f.read(200_000))
    return m, "(truncated?)", (m / ST,)


def case_st_header_length_beyond_file(c):
    m = c.model()
    c.st(length=2**62)
    return m, f"safetensors header length {2**62} runs beyond the file", (m / ST,)


def case_st_header_not_json(c):
    m = c.model()
    c.st(raw_header=b"{this is not json at all}")
    return m, "corrupt safetensors header", (m / ST,)


def case_st_header_not_utf8(c):
    m = c.model()
    c.st(raw_header=b'{"\xff\xfe\xfd": 1}    ')
    return m, "corrupt safetensors header", (m / ST,)


def case_st_header_array(c):
    m = c.model()
    c.st(header=[1, 2, 3])
    return m, "not a JSON object", (m / ST,)


def case_st_header_entry_not_object(c):
    m = c.model()
    c.st(header={**c.header, NORM: "F16"})
    return m, f"tensor {NORM}: malformed header entry", (m / ST,)


def case_st_tensor_name_with_newline(c):
    m = c.model()
    h = dict(c.header)
    h["evil\nname"] = {"dtype": "F4", "shape": [1], "data_offsets": [0, 1]}
    c.st(header=h)
    return m, "tensor evil\\nname: unknown dtype 'F4'", (m / ST,)


def case_st_dtype_not_a_string(c):
    m = c.model()
    c.st(header=c.header_with(NORM, dtype=["BF16"]))
    return m, f"tensor {NORM}: unknown dtype ['BF16']", (m / ST,)


def case_st_header_nested_too_deep(c):
    m = c.model()
    c.st(raw_header=b"[" * 100_000 + b"]" * 100_000)
    return m, "corrupt safetensors header", (m / ST,)


def case_st_unknown_dtype(c):
    m = c.model()
    c.st(header=c.header_with(NORM, dtype="F4"))
    return m, f"tensor {NORM}: unknown dtype 'F4'", (m / ST,)


def case_st_shape_disagrees_with_bytes(c):
    m = c.model()
    c.st(header=c.header_with(NORM, shape=[257]))
    return m, f"tensor {NORM}: shape [257] in BF16 needs 514 bytes, the header gives 512", (m / ST,)


def case_st_shape_garbage(c):
    m = c.model()
    c.st(header=c.header_with(NORM, shape=[-256]))
    return m, f"tensor {NORM}: malformed shape", (m / ST,)


def case_st_offsets_outside_data(c):
    m = c.model()
    end = c.data_len + 512
    c.st(header=c.header_with(NORM, data_offsets=[c.data_len, end]))
    return m, f"tensor {NORM}: data ends at byte {end} but the file holds {c.data_len}", (m / ST,)


def case_st_offsets_overlap(c):
    m = c.model()
    b, _ = c.header["model.layers.0.input_layernorm.weight"]["data_offsets"]
    c.st(header=c.header_with(NORM, data_offsets=[b + 2, b + 514]))
    return m, "overlap in the data section", (m / ST, NORM)


def case_st_offsets_negative(c):
    m = c.model()
    c.st(header=c.header_with(NORM, data_offsets=[-512, 0]))
    return m, f"tensor {NORM}: data_offsets [-512, 0] are not an increasing range", (m / ST,)


def case_st_offsets_garbage(c):
    m = c.model()
    c.st(header=c.header_with(NORM, data_offsets=["0", 1e3]))
    return m, f"tensor {NORM}: malformed data_offsets", (m / ST,)


def case_st_not_a_float_dtype(c):
    m = c.model()
    c.st(header=c.header_with(NORM, dtype="I16"))  # same byte count: only the type is wrong
    return m, f"tensor {NORM}: dtype I16 is not a float type", (m / ST,)


def case_st_is_a_folder(c):
    m = c.model()
    (m / ST).unlink()
    (m / ST).mkdir()
    return m, "cannot read", (m / ST,)


def case_st_broken_symlink(c):
    m = c.model()
    (m / ST).unlink()
    (m / ST).symlink_to(c.tmp / "gone.safetensors")
    return m, "cannot read", (m / ST,)


def case_st_tensor_in_two_shards(c):
    m = c.model()
    (m / ST).unlink()
    write_st(m / "model-00001-of-00002.safetensors", c.header, c.data_len)
    b, e = c.header[NORM]["data_offsets"]
    write_st(m / "model-00002-of-00002.safetensors", {NORM: {"dtype": "BF16", "shape": [256], "data_offsets": [0, e - b]}}, e - b)
    return m, f"tensor {NORM} appears in two shards", (m,)


def _poisoned(c: Ctx, value: bytes):
    m = c.model()
    b, _ = c.header[DOWN1]["data_offsets"]
    c.st(patches={b + 1000: value})  # one bf16 element of an otherwise all-zero model
    return m, f"tensor {DOWN1} holds NaN or Inf values", (m / ST,)


def case_weights_nan(c):
    return _poisoned(c, struct.pack("<H", 0x7FC0))


def case_weights_inf(c):
    return _poisoned(c, struct.pack("<H", 0xFF80))  # -inf


class _Boom:
    """A pickle that would create a file if it were ever loaded."""

    marker: Path

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def case_pickle_only(c):
    m = c.model()
    (m / ST).unlink()
    boom = _Boom()
    boom.marker = c.tmp / "pickle-was-loaded"
    put(m / "pytorch_model.bin", pickle.dumps(boom))
    return m, "only pickle checkpoints (pytorch_model.bin): qwqq never loads pickles", (m,)


def case_no_weights(c):
    m = c.model()
    (m / ST).unlink()
    return m, "no *.safetensors weights", (m,)


def case_source_is_a_file(c):
    return c.base / "config.json", "expected a Hugging Face model folder", (c.base / "config.json",)


def case_source_missing(c):
    p = c.tmp / "no" / "such" / "model"
    return p, "no such folder (and not a hub id", (p,)


CASES = {name[5:]: fn for name, fn in sorted(globals().items()) if name.startswith("case_")}


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_model_is_refused(case, base, base_header, tmp_path):
    c = Ctx(tmp_path, base, *base_header)
    src, phrase, names = CASES[case](c)
    out = tmp_path / "out" / "model.gguf"
    out.parent.mkdir()
    proc = run_qwqq("quantize", src, "-o", out, "--type", "Q8_0", "-j", "2", cwd=tmp_path)
    assert_refused(proc, out, phrase, *names)
    assert not (tmp_path / "pickle-was-loaded").exists()


# ---------------------------------------------------------------- options
@pytest.mark.parametrize("args, phrase", [
    (["--type", "Q9_9"], "unknown --type 'Q9_9'; choose one of F16, BF16, Q8_0"),
    (["--bits", "7"], "unknown --bits 7; choose one of 2, 3, 4, 5, 6, 8"),
    (["--bits", "4", "--type", "Q4_K_M"], "give --bits or --type, not both"),
    (["--type", "IQ2_XXS"], "needs an importance matrix"),
    (["--format", "onnx"], "unknown --format 'onnx'"),
], ids=["unknown-type", "unknown-bits", "bits-and-type", "imatrix-type", "unknown-format"])
def test_bad_options_are_refused(args, phrase, base, tmp_path):
    out = tmp_path / "model.gguf"
    proc = run_qwqq("quantize", base, "-o", out, *args, cwd=tmp_path)
    assert_refused(proc, out, phrase)


def test_output_must_be_gguf(base, tmp_path):
    out = tmp_path / "model.bin"
    proc = run_qwqq("quantize", base, "-o", out, "--type", "Q8_0", cwd=tmp_path)
    assert_refused(proc, out, "must end in .gguf", out)


# ---------------------------------------------------------------- outputs
def test_existing_output_is_left_untouched(base, tmp_path):
    out = tmp_path / "model.gguf"
    content = os.urandom(4096)
    out.write_bytes(content)
    proc = run_qwqq("quantize", base, "-o", out, "--type", "Q8_0", cwd=tmp_path)
    assert_one_line_error(proc, "already exists (use --force to overwrite)", out)
    assert out.read_bytes() == content
    assert not leftovers(tmp_path)


def test_output_under_a_regular_file(base, tmp_path):
    """As root, permissions do not stop a write: a path under a plain file does."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    out = blocker / "model.gguf"
    proc = run_qwqq("quantize", base, "-o", out, "--type", "Q8_0", cwd=tmp_path)
    assert_one_line_error(proc, "is a file, not a folder", blocker)
    assert blocker.read_text() == "x"
    assert not leftovers(tmp_path)


def _mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")


@pytest.fixture
def mount(tmp_path):
    mounted = []

    def do(name: str, options: str) -> Path:
        where = tmp_path / name
        _mount_tmpfs(where, options)
        mounted.append(where)
        return where

    yield do
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)


def test_read_only_output_folder(base, tmp_path, mount):
    """A read-only file system refuses even root (a chmod 0555 folder would not)."""
    ro = mount("ro", "ro,size=1m")
    out = ro / "model.gguf"
    proc = run_qwqq("quantize", base, "-o", out, "--type", "Q8_0", cwd=tmp_path)
    assert_refused(proc, out, "output folder is not writable", ro)


def test_disk_full_is_caught_before_writing(base, tmp_path, mount):
    small = mount("small", "size=1m")
    out = small / "model.gguf"
    proc = run_qwqq("quantize", base, "-o", out, "--type", "Q8_0", cwd=tmp_path)
    assert_refused(proc, out, "not enough disk space: needs 0.0", small)
    assert list(small.iterdir()) == []


@pytest.mark.parametrize("force", [False, True], ids=["no-force", "force"])
def test_output_is_a_folder(force, base, tmp_path):
    out = tmp_path / "model.gguf"
    out.mkdir()
    (out / "keep").write_text("x")
    proc = run_qwqq("quantize", base, "-o", out, "--type", "Q8_0", *(["--force"] if force else []), cwd=tmp_path)
    assert_one_line_error(proc, "is a folder" if force else "already exists", out)
    assert (out / "keep").read_text() == "x"
    assert not leftovers(tmp_path)


def test_output_locked_by_a_live_process(base, tmp_path):
    out = tmp_path / "model.gguf"
    lock = tmp_path / "model.gguf.lock"
    lock.write_text(str(os.getpid()))  # this test process: alive
    proc = run_qwqq("quantize", base, "-o", out, "--type", "Q8_0", cwd=tmp_path)
    assert_one_line_error(proc, f"another qwqq process (pid {os.getpid()}) is writing this output", out)
    assert not out.exists() and lock.read_text() == str(os.getpid())  # the other writer's lock is not ours to take


# ---------------------------------------------------------------- sources that are not folders
def test_hub_id_not_in_cache_offline(tmp_path):
    out = tmp_path / "model.gguf"
    proc = run_qwqq("quantize", "qwqq-tests/no-such-model", "-o", out, "--type", "Q8_0", cwd=tmp_path,
                    env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert_refused(proc, out, "HF_HUB_OFFLINE is set and it is not in the local cache", "qwqq-tests/no-such-model")


def test_source_home_of_unknown_user(tmp_path):
    out = tmp_path / "model.gguf"
    proc = run_qwqq("quantize", "~qwqq-no-such-user/model", "-o", out, "--type", "Q8_0", cwd=tmp_path)
    assert_refused(proc, out, "no such folder", "~qwqq-no-such-user/model")


def test_names_with_control_characters_stay_on_one_line(base, tmp_path):
    """A newline in a folder name is shown escaped: the error stays one line."""
    src = clone(base, tmp_path / "evil\nmodel")
    (src / "config.json").unlink()
    out = tmp_path / "model.gguf"
    proc = run_qwqq("quantize", src, "-o", out, "--type", "Q8_0", cwd=tmp_path)
    assert_refused(proc, out, "missing config.json", "evil\\nmodel")


# ---------------------------------------------------------------- GGUF files for inspect and run
@pytest.fixture(scope="module")
def hostile_gguf(base, tmp_path_factory) -> Path:
    """A valid GGUF of the tiny model whose chat template tries to reach Python's internals."""
    tmp = tmp_path_factory.mktemp("hostile")
    m = clone(base, tmp / "model")
    marker = tmp / "template-ran"
    put(m / "chat_template.jinja",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}"
        f"{{{{ cycler.__init__.__globals__.os.popen('touch {marker}').read() }}}}")
    out = tmp / "hostile.gguf"
    proc = run_qwqq("quantize", m, "-o", out, "--type", "Q8_0", "-j", "2", cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    return out


def _gguf_case(kind: str, good: Path, tmp: Path) -> tuple[Path, str]:
    bad = tmp / f"{kind}.gguf"
    if kind == "missing":
        return bad, "no such file"
    if kind == "empty":
        bad.write_bytes(b"")
    elif kind == "text":
        bad.write_text("this is a text file, not a model\n" * 10)
    elif kind == "bad-version":
        bad.write_bytes(b"GGUF" + struct.pack("<IQQ", 9, 0, 0) + bytes(64))
    elif kind == "cut-in-header":
        with open(good, "rb") as f:
            bad.write_bytes(f.read(1000))
    elif kind == "cut-in-data":  # the real header, then a sparse data section 4 KiB short
        from qwqq.gguf.reader import read_gguf

        with open(good, "rb") as f, open(bad, "wb") as g:
            g.write(f.read(read_gguf(good).data_offset))
            g.truncate(good.stat().st_size - 4096)
    elif kind == "folder":
        bad.mkdir()
    return bad, ""


GGUF_KINDS = ["missing", "empty", "text", "bad-version", "cut-in-header", "cut-in-data", "folder"]
INSPECT_PHRASES = {
    "missing": "no such file", "empty": "not a GGUF file", "text": "not a GGUF file",
    "bad-version": "unsupported GGUF version 9", "cut-in-header": "damaged GGUF file",
    "cut-in-data": "truncated GGUF file: tensor", "folder": "is a folder",
}
RUN_PHRASES = {  # qwqq's own header check, or llama.cpp's loader behind it
    "empty": ("not a GGUF file",), "text": ("not a GGUF file",),
    "cut-in-header": ("damaged GGUF file", "truncated", "llama.cpp cannot load this model"),
    "cut-in-data": ("truncated GGUF file: tensor", "data is not within the file bounds"),
}


@pytest.mark.parametrize("kind", GGUF_KINDS)
def test_inspect_refuses_damaged_gguf(kind, hostile_gguf, tmp_path):
    bad, _ = _gguf_case(kind, hostile_gguf, tmp_path)
    proc = run_qwqq("inspect", bad, cwd=tmp_path)
    assert_one_line_error(proc, INSPECT_PHRASES[kind], bad)
    assert proc.stdout == ""


@pytest.mark.parametrize("kind", ["empty", "text", "cut-in-header", "cut-in-data"])
def test_run_refuses_damaged_gguf(kind, hostile_gguf, tmp_path):
    pytest.importorskip("llama_cpp")
    bad, _ = _gguf_case(kind, hostile_gguf, tmp_path)
    proc = run_qwqq("run", bad, "-p", "hello", "-n", "4", "--ctx", "256", "-j", "2", cwd=tmp_path)
    line = assert_one_line_error(proc, "", bad)
    assert any(p in line for p in RUN_PHRASES[kind]), line
    assert proc.stdout == ""


@pytest.mark.parametrize("value", [[1, 2], float("inf")], ids=["array", "inf"])
def test_inspect_with_a_hostile_file_type(value, tmp_path):
    import gguf

    bad = tmp_path / "file-type.gguf"
    w = gguf.GGUFWriter(str(bad), "qwen2")
    if isinstance(value, list):
        w.add_array("general.file_type", value)
    else:
        w.add_float32("general.file_type", value)
    w.add_tensor("output_norm.weight", np.ones(32, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    proc = run_qwqq("inspect", bad, cwd=tmp_path)
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 0 or len([ln for ln in proc.stderr.splitlines() if ln.strip()]) == 1


def test_run_refuses_a_template_reaching_python_internals(hostile_gguf, tmp_path):
    """tests/test_run_llamacpp.py checks the sandbox on its own; this is the end-to-end path through `qwqq run`."""
    pytest.importorskip("llama_cpp")
    proc = run_qwqq("run", hostile_gguf, "-p", "hello", "-n", "4", "--ctx", "256", "-j", "2", cwd=tmp_path)
    assert_one_line_error(proc, "the model's chat template failed: access to attribute '__class__' of 'str' object is unsafe",
                          hostile_gguf)
    assert proc.stdout == "" and "subclass" not in proc.stderr
    assert not (hostile_gguf.parent / "template-ran").exists()


# ---------------------------------------------------------------- rows not divisible by 256: fallback types
def _write_wide_qwen2(folder: Path, base: Path, hidden: int = 320) -> Path:
    """A tied qwen2 with hidden 320 (5 heads of 64, 1 KV head, ffn 512): 320-wide rows cannot hold K-quant blocks."""
    from safetensors.numpy import save_file

    folder.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (folder / f).symlink_to(base / f)
    config = json.loads((base / "config.json").read_text())
    n_head, n_kv, hd, ff = 5, 1, 64, 512
    config.update(hidden_size=hidden, num_attention_heads=n_head, num_key_value_heads=n_kv, intermediate_size=ff,
                  tie_word_embeddings=True)
    put(folder / "config.json", json.dumps(config))
    rng = np.random.default_rng(0)
    w = lambda *shape: (0.05 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float16)
    tensors = {EMB: w(config["vocab_size"], hidden), NORM: np.ones(hidden, np.float16)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": np.ones(hidden, np.float16),
            p + "post_attention_layernorm.weight": np.ones(hidden, np.float16),
            p + "self_attn.q_proj.weight": w(n_head * hd, hidden), p + "self_attn.q_proj.bias": w(n_head * hd),
            p + "self_attn.k_proj.weight": w(n_kv * hd, hidden), p + "self_attn.k_proj.bias": w(n_kv * hd),
            p + "self_attn.v_proj.weight": w(n_kv * hd, hidden), p + "self_attn.v_proj.bias": w(n_kv * hd),
            p + "self_attn.o_proj.weight": w(hidden, n_head * hd),
            p + "mlp.gate_proj.weight": w(ff, hidden), p + "mlp.up_proj.weight": w(ff, hidden),
            p + "mlp.down_proj.weight": w(hidden, ff),
        })
    save_file(tensors, str(folder / ST), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def wide_model(base, tmp_path_factory) -> Path:
    return _write_wide_qwen2(tmp_path_factory.mktemp("wide") / "qwen2-320", base)


def test_rows_not_divisible_by_256_fall_back_like_llama_cpp(wide_model, tmp_path):
    """Q4_K_M on 320-wide rows succeeds: Q4_K -> Q5_0 and Q6_K -> Q8_0 (llama.cpp's tensor_type_fallback),
    and qwqq says so, as llama-quantize does."""
    from gguf import GGMLQuantizationType as T

    from qwqq.gguf.reader import read_gguf
    from qwqq.gguf.quantize import plan_checkpoint
    from qwqq.source import open_checkpoint

    out = tmp_path / "wide-Q4_K_M.gguf"
    proc = run_qwqq("quantize", wide_model, "-o", out, "--type", "Q4_K_M", "-j", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    in_file = {t.name: (t.type, t.shape) for t in read_gguf(out).tensors}
    wide = {n: ty for n, (ty, shape) in in_file.items() if len(shape) == 2 and shape[0] == 320}
    assert len(wide) > 10, in_file
    assert not any(ty in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K) for ty in wide.values()), wide
    _, _, plan = plan_checkpoint(open_checkpoint(wide_model), "Q4_K_M")
    fell = {t.name: (t.fallback_from, t.type) for t in plan.tensors if t.fallback_from is not None}
    assert set(fell.values()) == {(T.Q4_K, T.Q5_0), (T.Q6_K, T.Q8_0)}, fell
    assert all(in_file[n][0] == ty for n, (_, ty) in fell.items())
    assert in_file["blk.0.attn_q.weight"][0] == T.Q5_0
    assert in_file["blk.1.attn_v.weight"][0] == T.Q8_0  # Q6_K on the last layer's attn_v in Q4_K_M
    assert in_file["blk.0.ffn_down.weight"][0] in (T.Q4_K, T.Q6_K)  # 512-wide rows keep their K-quant
    # the user is told, on stderr, as llama-quantize warns
    assert "fell back to Q5_0" in proc.stderr and "fell back to Q8_0" in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def wide_bf16(wide_model, tmp_path_factory) -> Path:
    from qwqq.gguf.quantize import quantize_to_gguf, resolve_mixture

    out = tmp_path_factory.mktemp("wide-bf16") / "bf16.gguf"
    return quantize_to_gguf(wide_model, resolve_mixture(type_name="BF16"), out=out, progress=False, threads=2).path


@pytest.mark.parametrize("mixture", ["Q4_K_M", "Q3_K_M"])
def test_rows_not_divisible_by_256_match_llama_quantize(mixture, wide_model, wide_bf16, tmp_path):
    """Tensor for tensor, the same types as llama.cpp's own quantizer picks for the same weights."""
    pytest.importorskip("llama_cpp")
    from qwqq.gguf.quantize import quantize_to_gguf, resolve_mixture
    from tests.reference import llamacpp_quantize, tensor_table

    ours = quantize_to_gguf(wide_model, resolve_mixture(type_name=mixture), out=tmp_path / "ours.gguf",
                            progress=False, threads=2).path
    theirs = tmp_path / "llamacpp.gguf"
    llamacpp_quantize(wide_bf16, theirs, mixture)
    a, b = tensor_table(ours, with_hash=False), tensor_table(theirs, with_hash=False)
    assert set(a) == set(b)
    diff = {n: (a[n][0], b[n][0]) for n in a if a[n][0] != b[n][0]}
    assert not diff, f"qwqq vs llama.cpp types: {diff}"


@pytest.mark.parametrize("content,phrase", [(b"hello, not a model\n", "not a GGUF file"), (None, "truncated GGUF file")],
                         ids=["not-gguf", "truncated"])
def test_fit_refuses_a_bad_gguf(content, phrase, smollm2_gguf, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content if content is not None else smollm2_gguf.read_bytes()[:5_000_000])
    proc = run_qwqq("fit", bad, "--vram", "8", cwd=tmp_path)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert phrase in lines[0] and str(bad) in lines[0], lines[0]

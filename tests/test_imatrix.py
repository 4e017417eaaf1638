"""Importance matrices: llama.cpp's file format, and qwqq quantize --imatrix against llama-quantize --imatrix.

Everything is held against the real llama.cpp tools (llama-imatrix, llama-quantize, built from the
llama-cpp-python sdist by tests.fixtures.llama_cpp_tools): llama-imatrix computes an imatrix on a
BF16 GGUF of a tiny model; qwqq reads it, writes it back, and quantizes the safetensors checkpoint
with it; llama-quantize quantizes the BF16 GGUF with the same file. Every tensor must get the same
type and the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from qwqq.errors import SourceError, UnsupportedError
from qwqq.gguf.reader import read_gguf
from qwqq.outputs import journal_path, temp_path
from qwqq.gguf.imatrix_file import Imatrix, read_imatrix, write_imatrix
from qwqq.gguf.quantize import IMATRIX_GGUF_TYPES, quantize_to_gguf, resolve_mixture
from tests import fixtures
from tests.conftest import run_qwqq
from tests.reference import llama_quantize_plan, tensor_table

# (arch, mixture) pairs held byte for byte against llama-quantize. token_embd and output (151936 rows,
# quantized without importance data, as llama.cpp does) take most of the time: an IQ2_XS puts Q5_K on
# output, an IQ3_S puts IQ3_S on token_embd, some 10-20 s per tool on two cores. IQ3_S and IQ1_S on all
# three archs also match (QWQQ_IMATRIX_FULL=1 runs every pair).
ARCHS = ["qwen2", "qwen3_moe", "llama"]
CHEAP = [(a, "Q4_K_M") for a in ARCHS] + [("qwen2", "Q2_K"), ("qwen3_moe", "Q2_K"), ("qwen2", "IQ2_XS"),
                                           ("qwen3_moe", "IQ2_XS"), ("qwen3_moe", "IQ3_S")]
FULL = [(a, m) for m in ("IQ2_XS", "IQ3_S", "Q2_K", "Q4_K_M", "IQ1_S") for a in ARCHS]
PAIRS = FULL if os.environ.get("QWQQ_IMATRIX_FULL") else CHEAP
N_CTX = 128

TEXT = " ".join([
    "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm windowsill.",
    "In 1969, astronauts landed on the Moon and walked across its dusty grey surface for hours.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "Quantization trades a little accuracy for a much smaller model that runs on modest hardware.",
    "Rivers carve valleys over millions of years; mountains rise where continental plates collide.",
    "A reasoning model thinks step by step: first it restates the problem, then it checks each case.",
    "Bread, cheese, olives and a bottle of water were packed for the long walk along the coast.",
    "SELECT name, COUNT(*) FROM orders GROUP BY name HAVING COUNT(*) > 3 ORDER BY 2 DESC;",
] * 6)


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tools() -> Path:
    return fixtures.llama_cpp_tools()


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, f"{cmd[0]} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


def llama_imatrix(tools: Path, model: Path, text: Path, out: Path, fmt: str = "gguf") -> Path:
    _run([tools / "llama-imatrix", "-m", model, "-f", text, "-o", out, "--output-format", fmt, "-c", N_CTX,
          "-b", N_CTX, "--chunks", 2, "-t", 2, "--no-ppl"])
    return out


def llama_quantize(tools: Path, src: Path, dst: Path, mixture: str, imatrix: Path) -> Path:
    _run([tools / "llama-quantize", "--imatrix", imatrix, src, dst, mixture, 2])
    return dst


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("imatrix")
    (d / "calib.txt").write_text(TEXT)
    return d


@pytest.fixture(scope="module")
def bf16(work):
    """arch -> (checkpoint folder, BF16 GGUF of it): the same floats llama-quantize starts from."""
    made = {}

    def get(arch: str) -> tuple[Path, Path]:
        if arch not in made:
            src = fixtures.tiny_model_dir(arch)
            out = work / f"{arch}-bf16.gguf"
            quantize_to_gguf(src, resolve_mixture(type_name="BF16"), out=out, progress=False, threads=2)
            made[arch] = (src, out)
        return made[arch]

    return get


@pytest.fixture(scope="module")
def imatrix_of(tools, work, bf16):
    """arch -> llama-imatrix's GGUF imatrix, computed on the BF16 GGUF from calib.txt."""
    made = {}

    def get(arch: str, fmt: str = "gguf") -> Path:
        if (arch, fmt) not in made:
            made[arch, fmt] = llama_imatrix(tools, bf16(arch)[1], work / "calib.txt", work / f"{arch}-imatrix.{fmt}", fmt)
        return made[arch, fmt]

    return get


@pytest.fixture(scope="module")
def ours(bf16, imatrix_of, work):
    """(arch, mixture) -> (qwqq quantize --imatrix's GGUF, its stderr), through the real CLI."""
    made = {}

    def get(arch: str, mixture: str) -> tuple[Path, str]:
        if (arch, mixture) not in made:
            out = work / f"qwqq-{arch}-{mixture}.gguf"
            r = run_qwqq("quantize", bf16(arch)[0], "--type", mixture, "--imatrix", imatrix_of(arch), "-o", out,
                         "-j", "2", "-q")
            assert r.returncode == 0, r.stderr
            made[arch, mixture] = (out, r.stderr)
        return made[arch, mixture]

    return get


@pytest.fixture(scope="module")
def theirs(bf16, imatrix_of, tools, work):
    """(arch, mixture) -> llama-quantize --imatrix's GGUF from the BF16 GGUF."""
    made = {}

    def get(arch: str, mixture: str) -> Path:
        if (arch, mixture) not in made:
            made[arch, mixture] = llama_quantize(tools, bf16(arch)[1], work / f"llama-{arch}-{mixture}.gguf", mixture,
                                                 imatrix_of(arch))
        return made[arch, mixture]

    return get


def _same_tensors(ours: Path, theirs: Path) -> None:
    a, b = tensor_table(ours), tensor_table(theirs)
    assert set(a) == set(b)
    for name in sorted(a):
        assert a[name][:3] == b[name][:3], f"{name}: qwqq {a[name][:3]} vs llama.cpp {b[name][:3]}"
        assert a[name][3] == b[name][3], f"{name}: same type ({a[name][0]}) but different bytes"


def _imatrix_keys(path: Path) -> dict:
    return {k: v for k, v in read_gguf(path).metadata.items() if k.startswith("quantize.imatrix.")}


# ---------------------------------------------------------------- a) the file format
@pytest.mark.slow
def test_llama_imatrix_file_reads_and_round_trips(imatrix_of, bf16, tools, work, theirs):
    path = imatrix_of("qwen3_moe")
    im = read_imatrix(path)
    model = {t.name: t.shape for t in read_gguf(bf16("qwen3_moe")[1]).tensors}
    # the entries are the model's weights under their GGUF names, experts as one entry of n_expert rows
    assert im.datasets == [str(work / "calib.txt")] and im.chunk_size == N_CTX and im.chunk_count == 2
    assert set(im.entries) <= set(model) and "blk.1.ffn_down_exps.weight" in im.entries
    assert "token_embd.weight" not in im.entries and "output.weight" not in im.entries
    for name, (sums, counts) in im.entries.items():
        ne = model[name]  # GGUF order: (cols, rows[, experts])
        assert sums.dtype == np.float32 and sums.shape == ((ne[2] if len(ne) == 3 else 1), ne[0]), name
        assert counts.shape == (sums.shape[0],)
        values = im.values(name)
        assert values.dtype == np.float32 and values.shape == (sums.size,)
    sums, counts = im.entries["blk.0.ffn_gate_exps.weight"]
    assert sums.shape == (8, 256) and counts.sum() == 2 * N_CTX * 2  # every token goes to its top 2 experts
    for e in range(8):
        got = im.values("blk.0.ffn_gate_exps.weight", expert=e)
        want = sums[e] / counts[e] if counts[e] > 0 else np.ones(256, np.float32)
        assert np.array_equal(got, want)
    sums, counts = im.entries["blk.0.attn_q.weight"]
    assert counts.tolist() == [2 * N_CTX]

    # write(read(f)) holds the same entries, metadata and tensor bytes as llama-imatrix's own file
    ours = write_imatrix(im, work / "ours-imatrix.gguf")
    again = read_imatrix(ours)
    assert (again.datasets, again.chunk_count, again.chunk_size) == (im.datasets, im.chunk_count, im.chunk_size)
    assert set(again.entries) == set(im.entries)
    for name in im.entries:
        assert all(np.array_equal(x, y) for x, y in zip(im.entries[name], again.entries[name])), name
    assert read_gguf(ours).metadata == read_gguf(path).metadata
    assert tensor_table(ours) == tensor_table(path)

    # llama-quantize takes our file, and quantizes exactly as with its own
    with_ours = llama_quantize(tools, bf16("qwen3_moe")[1], work / "lq-ours.gguf", "IQ2_XS", ours)
    _same_tensors(with_ours, theirs("qwen3_moe", "IQ2_XS"))


@pytest.mark.slow
def test_legacy_dat_reads_like_gguf(imatrix_of, tools, bf16, work, tmp_path):
    """The legacy .dat holds mean squares times the call count: same per-column values, up to rounding;
    quantizing with it matches llama-quantize with it, and writing it as GGUF keeps those values."""
    g, d = read_imatrix(imatrix_of("qwen3_moe")), read_imatrix(imatrix_of("qwen3_moe", "dat"))
    assert d.legacy and set(d.entries) == set(g.entries) and d.datasets == g.datasets and d.chunk_count == 2
    for name in g.entries:
        assert np.allclose(d.values(name), g.values(name), rtol=1e-4), name
    src, bf = bf16("qwen3_moe")
    dat = imatrix_of("qwen3_moe", "dat")
    ours = tmp_path / "ours.gguf"
    r = run_qwqq("quantize", src, "--type", "Q4_K_M", "--imatrix", dat, "-o", ours, "-j", "2", "-q")
    assert r.returncode == 0, r.stderr
    _same_tensors(ours, llama_quantize(tools, bf, tmp_path / "theirs.gguf", "Q4_K_M", dat))
    assert _imatrix_keys(ours) == _imatrix_keys(tmp_path / "theirs.gguf")
    as_gguf = read_imatrix(write_imatrix(d, tmp_path / "from-dat.gguf"))
    for name in d.entries:
        assert np.array_equal(as_gguf.values(name), d.values(name)), name


# ---------------------------------------------------------------- b) qwqq quantize --imatrix == llama-quantize --imatrix
@pytest.mark.parametrize("arch, mixture", PAIRS, ids=[f"{a}-{m}" for a, m in PAIRS])
@pytest.mark.slow
def test_quantize_with_imatrix_matches_llama_quantize(arch, mixture, ours, theirs, imatrix_of):
    """Same types, same bytes, same quantize.imatrix.* keys; experts (qwen3_moe) take their own slice."""
    path, stderr = ours(arch, mixture)
    assert "the imatrix has no data for output.weight, token_embd.weight" in stderr  # as llama-quantize logs them
    _same_tensors(path, theirs(arch, mixture))
    assert _imatrix_keys(path) == _imatrix_keys(theirs(arch, mixture))
    assert _imatrix_keys(path)["quantize.imatrix.entries_count"] == len(read_imatrix(imatrix_of(arch)))


@pytest.mark.slow
def test_imatrix_changes_the_bytes(bf16, ours, tmp_path):
    """The importance data reaches the kernels: Q4_K_M with it differs from Q4_K_M without it."""
    src, _ = bf16("qwen2")
    a = quantize_to_gguf(src, resolve_mixture(type_name="Q4_K_M"), out=tmp_path / "a.gguf", progress=False, threads=2)
    ta, tb = tensor_table(a.path), tensor_table(ours("qwen2", "Q4_K_M")[0])
    assert ta["blk.0.attn_q.weight"][3] != tb["blk.0.attn_q.weight"][3]
    assert ta["token_embd.weight"] == tb["token_embd.weight"]  # no data for it: quantized without


@pytest.mark.slow
def test_api_reports_tensors_without_data(bf16, imatrix_of, tmp_path):
    src, _ = bf16("qwen3_moe")
    im = read_imatrix(imatrix_of("qwen3_moe"))
    r = quantize_to_gguf(src, resolve_mixture(type_name="Q8_0", has_imatrix=True), out=tmp_path / "q8.gguf",
                         progress=False, threads=2, imatrix=im)
    assert r.imatrix_missing == ["output.weight", "token_embd.weight"]


# ---------------------------------------------------------------- c) it runs
@pytest.mark.slow
def test_iq2_xs_loads_and_generates(ours):
    import llama_cpp

    out, _ = ours("qwen3_moe", "IQ2_XS")
    llm = llama_cpp.Llama(str(out), n_ctx=64, n_threads=2, verbose=False)
    try:
        tokens = llm.tokenize(b"The capital of France is")
        got = []
        for tok in llm.generate(tokens, temp=0.0):
            got.append(tok)
            if len(got) == 4:
                break
        assert len(got) == 4 and all(0 <= t < llm.n_vocab() for t in got)
        assert np.isfinite(np.asarray(llm.scores[: llm.n_tokens])).all()
        assert isinstance(llm.detokenize(got), bytes)
    finally:
        llm.close()


# ---------------------------------------------------------------- every imatrix mixture
ISSUE_IQ = ["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_S", "IQ3_M"]


@pytest.mark.parametrize("mixture", sorted(IMATRIX_GGUF_TYPES))
def test_every_imatrix_mixture_is_refused_without_one(mixture):
    with pytest.raises(UnsupportedError, match=f"--type {mixture} needs an importance matrix"):
        resolve_mixture(type_name=mixture)
    assert resolve_mixture(type_name=mixture, has_imatrix=True).name == mixture


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.slow
def test_every_iq_mixture_plans_as_llama_quantize(arch, bf16, imatrix_of, tools):
    """All nine IQ mixtures of the issue: qwqq's plan gives every tensor the type llama-quantize's own rules
    give it (its --dry-run, with the same imatrix). The bytes follow from the type (ggml's own kernels; held
    byte for byte above for IQ2_XS and IQ3_S)."""
    from qwqq.gguf.quantize import plan_checkpoint
    from qwqq.source import open_checkpoint

    src, gguf_bf16 = bf16(arch)
    ckpt = open_checkpoint(src)
    for mixture in ISSUE_IQ:
        ours = {t.name: t.type.name for t in plan_checkpoint(ckpt, mixture, has_imatrix=True)[2].tensors}
        theirs = llama_quantize_plan(tools, gguf_bf16, mixture, imatrix_of(arch))
        assert theirs and ours == theirs, f"{arch} {mixture}: " + ", ".join(
            f"{n} qwqq {ours.get(n)} llama.cpp {theirs.get(n)}" for n in sorted(set(ours) | set(theirs))
            if ours.get(n) != theirs.get(n))


# Every type the IQ mixtures above put on a tensor (their plans are held against llama-quantize's in
# test_every_iq_mixture_plans_as_llama_quantize), plus IQ4_NL / IQ4_XS.
IQ_TYPES = ["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS"]


@pytest.mark.slow
def test_every_iq_type_loads_and_generates(bf16, imatrix_of, tmp_path):
    """One GGUF whose block tensors take every IQ type in turn (with importance data), token_embd and output
    at Q8_0: llama.cpp loads it and generates finite scores, so each type's blocks are laid out as llama.cpp
    reads them. One file instead of one per mixture: the 151936-row embeddings are quantized once."""
    import llama_cpp
    from gguf import GGMLQuantizationType as T

    from qwqq.gguf.imatrix_file import read_imatrix
    from qwqq.gguf.quantize import plan_checkpoint
    from qwqq.source import open_checkpoint

    src, _ = bf16("qwen2")
    _, _, plan = plan_checkpoint(open_checkpoint(src), "Q8_0")
    blocks = [t.name for t in plan.tensors if t.quantized and t.name.startswith("blk.")]
    assert len(blocks) >= len(IQ_TYPES)
    overrides = {name: T[IQ_TYPES[i % len(IQ_TYPES)]] for i, name in enumerate(blocks)}
    out = tmp_path / "every-iq-type.gguf"
    quantize_to_gguf(src, resolve_mixture(type_name="Q8_0"), out=out, progress=False, threads=2,
                     imatrix=read_imatrix(imatrix_of("qwen2")), overrides=overrides)
    got_types = {t.name: t.type.name for t in read_gguf(out).tensors}
    assert {got_types[n] for n in blocks} == set(IQ_TYPES)
    assert got_types["token_embd.weight"] == got_types["output.weight"] == "Q8_0"
    llm = llama_cpp.Llama(str(out), n_ctx=64, n_threads=2, verbose=False)
    try:
        got = []
        for tok in llm.generate(llm.tokenize(b"The capital of France is"), temp=0.0):
            got.append(tok)
            if len(got) == 4:
                break
        assert len(got) == 4 and all(0 <= t < llm.n_vocab() for t in got)
        assert np.isfinite(np.asarray(llm.scores[: llm.n_tokens])).all()
    finally:
        llm.close()


@pytest.mark.slow
def test_a_qwqq_imatrix_file_drives_llama_quantize(bf16, tools, work):
    """Ours used by llama.cpp: `qwqq imatrix` writes the file, llama-quantize --imatrix takes it, and the GGUF it
    makes is the one `qwqq quantize --imatrix` makes with the same file, tensor for tensor."""
    src, gguf_bf16 = bf16("qwen3_moe")
    path = work / "qwqq-made.imatrix.gguf"
    r = run_qwqq("imatrix", src, "-o", path, "--calib-tokens", "256", "--calib-seqlen", "128", "-q")
    assert r.returncode == 0, r.stderr
    theirs = llama_quantize(tools, gguf_bf16, work / "llama-from-qwqq-imatrix.gguf", "IQ2_XS", path)
    out = work / "qwqq-from-qwqq-imatrix.gguf"
    r = run_qwqq("quantize", src, "--type", "IQ2_XS", "--imatrix", path, "-o", out, "-j", "2", "-q")
    assert r.returncode == 0, r.stderr
    _same_tensors(out, theirs)
    assert _imatrix_keys(out) == _imatrix_keys(theirs)


# ---------------------------------------------------------------- resume
@pytest.mark.slow
def test_resume_restarts_with_other_importance_data(bf16, imatrix_of, tmp_path):
    """A partial output made with one imatrix is not resumed with another (same path, other data)."""
    src, _ = bf16("qwen2")
    im_path = tmp_path / "im.gguf"
    shutil.copy(imatrix_of("qwen2"), im_path)
    out = tmp_path / "out.gguf"
    r = run_qwqq("quantize", src, "--type", "Q4_K_M", "--imatrix", im_path, "-o", out, "-j", "2", "-q")
    assert r.returncode == 0, r.stderr
    final = tmp_path / "final.gguf"
    shutil.move(out, final)
    g = read_gguf(final)
    header = final.read_bytes()[: g.data_offset]

    def fake_partial(digest: str) -> None:
        """What an interrupted run leaves: the file and a journal of all but the last tensor."""
        shutil.copy(final, temp_path(out))
        journal_path(out).write_text(json.dumps({
            "header_sha256": hashlib.sha256(header).hexdigest(), "done": len(g.tensors) - 1,
            "names": [g.tensors[-2].name], "imatrix": digest}))

    first = read_imatrix(im_path)
    fake_partial(first.digest())
    r = run_qwqq("quantize", src, "--type", "Q4_K_M", "--imatrix", im_path, "-o", out, "-j", "2", "-q", "--resume")
    assert r.returncode == 0 and f"keeping the {len(g.tensors) - 1} of {len(g.tensors)}" in r.stderr, r.stderr
    assert out.read_bytes() == final.read_bytes()

    other = Imatrix({k: (s * 3 + 1, c) for k, (s, c) in first.entries.items()}, first.datasets, first.chunk_count,
                    first.chunk_size)
    write_imatrix(other, im_path, force=True)  # same path, so the same GGUF header: only the journal tells
    out.unlink()
    fake_partial(first.digest())
    r = run_qwqq("quantize", src, "--type", "Q4_K_M", "--imatrix", im_path, "-o", out, "-j", "2", "-q", "--resume")
    assert r.returncode == 0 and "nothing to resume" in r.stderr, r.stderr
    assert read_gguf(out).data_offset == g.data_offset
    assert tensor_table(out)["blk.0.attn_q.weight"] != tensor_table(final)["blk.0.attn_q.weight"]


# ---------------------------------------------------------------- d) bad inputs
def _refused(r: subprocess.CompletedProcess, out: Path, *needles) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode != 0 and r.stdout == ""
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert str(n) in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if ".qwqq-partial" in p.name or p.name.endswith(".lock")]
    return lines[0]


def _patched(src: Path, dst: Path, tensor: str, value: float) -> Path:
    """A copy of a GGUF imatrix with the first float of `tensor` set to `value`."""
    t = next(t for t in read_gguf(src).tensors if t.name == tensor)
    data = bytearray(src.read_bytes())
    data[t.offset:t.offset + 4] = np.float32(value).tobytes()
    dst.write_bytes(bytes(data))
    return dst


def _bad_files(good: Path, model_gguf: Path, d: Path) -> dict[str, tuple[Path, str]]:
    data = good.read_bytes()
    (d / "truncated.gguf").write_bytes(data[: len(data) // 2])
    (d / "garbage.dat").write_bytes(os.urandom(64))
    (d / "empty.dat").write_bytes(b"")
    (d / "truncated.dat").write_bytes(struct_dat()[:-10])
    return {
        "truncated-gguf": (d / "truncated.gguf", "truncated"),
        "garbage": (d / "garbage.dat", "neither a GGUF nor a legacy .dat"),
        "empty": (d / "empty.dat", "neither a GGUF nor a legacy .dat"),
        "truncated-dat": (d / "truncated.dat", "truncated"),
        "a-model": (model_gguf, "is not an importance matrix (general.type is 'model')"),
        "nan": (_patched(good, d / "nan.gguf", "blk.0.attn_q.weight.in_sum2", float("nan")), "NaN"),
        "negative": (_patched(good, d / "neg.gguf", "blk.0.attn_q.weight.in_sum2", -1.0), "negative"),
        "bad-count": (_patched(good, d / "count.gguf", "blk.0.attn_q.weight.counts", -5.0), "invalid count"),
        "missing": (d / "nope.gguf", "no such imatrix file"),
    }


def struct_dat() -> bytes:
    """A small valid legacy .dat: two entries of 8 values, then chunk count and dataset name."""
    import struct

    out = struct.pack("<i", 2)
    for name in (b"blk.0.attn_q.weight", b"blk.0.attn_k.weight"):
        out += struct.pack("<i", len(name)) + name + struct.pack("<ii", 3, 8) + np.arange(8, dtype="<f4").tobytes()
    return out + struct.pack("<ii", 3, 5) + b"x.txt"


@pytest.mark.slow
def test_bad_imatrix_files_are_refused(bf16, imatrix_of, tmp_path):
    src, model_gguf = bf16("qwen2")
    good = imatrix_of("qwen2")
    cases = _bad_files(good, model_gguf, tmp_path)
    for case, (path, phrase) in cases.items():
        with pytest.raises(SourceError) as e:
            read_imatrix(path)
        assert phrase in str(e.value) and str(path) in str(e.value), (case, str(e.value))
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    for case in ("truncated-gguf", "garbage", "a-model", "nan"):
        path, phrase = cases[case]
        r = run_qwqq("quantize", src, "--type", "IQ2_XS", "--imatrix", path, "-o", out, "-j", "2")
        _refused(r, out, phrase, path)
    im = read_imatrix(struct_dat_file(tmp_path))
    assert im.legacy and im.datasets == ["x.txt"] and im.chunk_count == 3
    assert np.array_equal(im.values("blk.0.attn_k.weight"), np.arange(8, dtype=np.float32) / 3)


def struct_dat_file(d: Path) -> Path:
    p = d / "small.dat"
    p.write_bytes(struct_dat())
    return p


@pytest.mark.slow
def test_imatrix_of_another_model_is_refused(bf16, imatrix_of, tmp_path):
    out = tmp_path / "m.gguf"
    # qwen3 (head_dim 128: attn_output rows of 512) with qwen2's imatrix (rows of 256): sizes differ
    qwen3 = fixtures.tiny_model_dir("qwen3")
    r = run_qwqq("quantize", qwen3, "--type", "Q4_K_M", "--imatrix", imatrix_of("qwen2"), "-o", out, "-j", "2")
    _refused(r, out, "imatrix entry blk.0.attn_output.weight has 256 values but the model's tensor needs 512",
             "another model", imatrix_of("qwen2"))
    # qwen2 with qwen3_moe's imatrix (experts, no dense ffn): ffn_down has no data, and IQ2_XS needs it
    src, _ = bf16("qwen2")
    r = run_qwqq("quantize", src, "--type", "IQ2_XS", "--imatrix", imatrix_of("qwen3_moe"), "-o", out, "-j", "2")
    _refused(r, out, "the imatrix has no data for blk.0.ffn_down.weight", "IQ2_XS", imatrix_of("qwen3_moe"))
    # ... and for a mixture that needs none: refused still when nothing at all matches
    only = Imatrix({"blk.0.no_such.weight": (np.ones((1, 256), np.float32), np.ones(1, np.float32))}, [], 1, 128)
    r = run_qwqq("quantize", src, "--type", "Q4_K_M", "--imatrix", write_imatrix(only, tmp_path / "o.gguf"), "-o", out)
    _refused(r, out, "no data for any tensor of this model")


@pytest.mark.parametrize("args, phrase", [
    (["--type", "IQ2_XS"], "--type IQ2_XS needs an importance matrix: give --imatrix FILE"),
    (["--type", "IQ1_S"], "--type IQ1_S needs an importance matrix"),
    (["--format", "mlx", "--imatrix", "x.gguf"], "--imatrix is for GGUF outputs"),
], ids=["iq2_xs-without", "iq1_s-without", "mlx"])
def test_imatrix_options_are_refused(args, phrase, bf16, tmp_path):
    src, _ = bf16("qwen2")
    out = tmp_path / "m.gguf"
    r = run_qwqq("quantize", src, "-o", out, *args, cwd=tmp_path)
    _refused(r, out, phrase)

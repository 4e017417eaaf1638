"""`qwqq inspect` on a real GGUF (SmolLM2-135M Q4_1), and on broken files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from qwqq.errors import QwqqError
from qwqq.gguf.inspect import inspect
from tests.conftest import one_line_error

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gguf_path(smollm2_gguf) -> Path:  # SmolLM2-135M-Instruct Q4_1, from tests/conftest.py
    return Path(smollm2_gguf)


def qwqq(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    env.pop("QWQQ_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "qwqq.cli", *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def test_report_fields(gguf_path):
    report = inspect(gguf_path)
    reader = gguf.GGUFReader(gguf_path)
    assert report["file_bytes"] == os.path.getsize(gguf_path)
    assert len(report["tensors"]) == len(reader.tensors)
    assert report["architecture"] == "llama"
    assert report["file_type"] == "MOSTLY_Q4_1"
    assert report["n_params"] == sum(int(t.n_elements) for t in reader.tensors)
    assert 130e6 < report["n_params"] < 140e6
    assert 4 < report["bits_per_weight"] < 6
    assert report["tensor_bytes"] == sum(t["bytes"] for t in report["tensors"]) < report["file_bytes"]
    counts = report["type_counts"]
    assert set(counts) == {"Q4_1", "Q8_0", "F32"}
    assert sum(c["count"] for c in counts.values()) == len(reader.tensors)
    assert sum(c["bytes"] for c in counts.values()) == report["tensor_bytes"]
    embd = next(t for t in report["tensors"] if t["name"] == "token_embd.weight")
    assert embd["shape"] == [576, 49152]  # GGUF ne order: contiguous dimension first
    md = report["metadata"]
    assert md["llama.block_count"] == 30
    assert md["tokenizer.ggml.add_bos_token"] is False
    assert md["general.languages"] == ["en"]
    assert md["tokenizer.ggml.tokens"] == "[array of 49152 string]"
    assert md["tokenizer.ggml.merges"].startswith("[array of ")
    assert md["tokenizer.chat_template"].startswith("{% for message in messages %}")
    assert not any(k.startswith("GGUF.") for k in md)


def test_cli_json_and_table(gguf_path):
    r = qwqq("inspect", str(gguf_path), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["file_bytes"] == os.path.getsize(gguf_path)
    assert len(report["tensors"]) == 272
    r = qwqq("inspect", str(gguf_path))
    assert r.returncode == 0, r.stderr
    for text in ("llama", "Q4_1", "bits/weight", "blk.0.attn_q.weight", "tokenizer.ggml.tokens"):
        assert text in r.stdout


@pytest.mark.parametrize("keep", [10, 30, 4096, 1_000_000, 50_000_000, -1])
def test_truncated_copy(gguf_path, tmp_path, keep):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(gguf_path.read_bytes()[:keep])  # -1: only the last byte missing
    with pytest.raises(QwqqError, match=r"cut\.gguf: .*truncated"):
        inspect(bad)


@pytest.mark.parametrize("keep", [10, -1])
def test_truncated_copy_cli(gguf_path, tmp_path, keep):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(gguf_path.read_bytes()[:keep])
    one_line_error(qwqq("inspect", str(bad)), str(bad), "truncated")


def test_not_gguf(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("just some text, not a model\n")
    one_line_error(qwqq("inspect", str(bad)), str(bad), "not a GGUF file")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    one_line_error(qwqq("inspect", str(empty), "--json"), "not a GGUF file")


def test_missing_and_folder(tmp_path):
    one_line_error(qwqq("inspect", str(tmp_path / "nope.gguf")), "no such file")
    one_line_error(qwqq("inspect", str(tmp_path)), "folder")


def test_file_being_written(gguf_path, tmp_path):
    link = tmp_path / "model.gguf"
    link.symlink_to(gguf_path)
    (tmp_path / "model.gguf.lock").write_text("1234")
    one_line_error(qwqq("inspect", str(link)), "being written")

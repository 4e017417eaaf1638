"""A hub id resolves through huggingface_hub's cache (HF_HOME, HF_HUB_OFFLINE honoured), offline."""

from __future__ import annotations

import shutil

from qwqq.gguf.reader import read_gguf
from tests import fixtures
from tests.conftest import run_qwqq

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _populate_cache(hf_home, repo_id: str, src) -> None:
    """Lay a model into huggingface_hub's own cache layout, as a download would."""
    org, name = repo_id.split("/")
    repo = hf_home / "hub" / f"models--{org}--{name}"
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    for f in src.iterdir():
        shutil.copy(f, snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


def test_hub_id_from_the_local_cache_offline(tmp_path):
    hf_home = tmp_path / "hf"
    _populate_cache(hf_home, "Qwen/Tiny-Qwen3", fixtures.tiny_model_dir("qwen3"))
    r = run_qwqq("quantize", "Qwen/Tiny-Qwen3", "--bits", "8", "-q", cwd=tmp_path,
                 env={"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    out = tmp_path / "Tiny-Qwen3-Q8_0.gguf"  # default name: the model's name and the type, in the working directory
    g = read_gguf(out)
    assert g.architecture == "qwen3"
    assert g.get("general.name") == "Tiny-Qwen3"


def test_unknown_hub_id_offline_is_one_line(tmp_path):
    r = run_qwqq("quantize", "Qwen/No-Such-Model", cwd=tmp_path,
                 env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    assert "Qwen/No-Such-Model" in lines[0] and "HF_HUB_OFFLINE" in lines[0]
    assert not list(tmp_path.glob("*.gguf"))

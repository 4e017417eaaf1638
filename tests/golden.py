"""Byte fingerprints of everything qwqq writes for the tiny fixtures, and of `fit --json` on the catalog.

Recorded once before a refactor (`python -m tests.golden --record`), then held by tests/test_golden.py:
a move of code that changes no behaviour leaves every digest as it was. Each case runs the real CLI
in-process (typer's runner), so the cases survive any reshuffling of the modules behind it.

A case's digest is the sha256 of its output file, or for a folder the sha256 of its sorted
(relative path, sha256) list; fit's digest is of its JSON text.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from contextlib import contextmanager
import tempfile
from pathlib import Path

from tests import fixtures

GOLDEN = Path(__file__).parent / "data" / "golden-outputs.json"
ARCHS = ("qwen2", "qwen3", "qwen3_moe", "llama")
# every mixture `quantize --type` accepts without an importance matrix
GGUF_TYPES = ("F16", "BF16", "Q8_0", "Q6_K", "Q5_K_S", "Q5_K_M", "Q4_K_S", "Q4_K_M", "Q4_0", "Q3_K_S", "Q3_K_M",
              "Q3_K_L", "Q2_K", "IQ4_XS", "IQ4_NL", "F32", "Q4_1", "Q5_0", "Q5_1")
# ... and with one (qwqq's own imatrix of the fixture): the types that need it, and one it improves
IMATRIX_TYPES = ("IQ2_XXS", "IQ3_M", "Q2_K_S", "Q4_K_M")
CALIB = ("--calib-tokens", "256", "--calib-seqlen", "128")
FIT = {
    "vram24": ["--vram", "24"],
    "vram8-ram32": ["--vram", "8", "--ram", "32"],
    "unified64": ["--unified", "64"],
    "gpus2x24": ["--gpus", "2x24"],
    "qwq-vram24": ["QwQ-32B", "--vram", "24"],
    "qwen3-30b-vram8-ram32": ["Qwen3-30B-A3B", "--vram", "8", "--ram", "32", "--ctx", "32768"],
    "profiles": ["--list-profiles"],
}


def digest(path: Path) -> str:
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    rows = sorted((str(p.relative_to(path)), digest(p)) for p in path.rglob("*") if p.is_file())
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def cli(*args) -> str:
    from typer.testing import CliRunner

    from qwqq.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    if r.exit_code != 0:
        raise RuntimeError(f"qwqq {' '.join(map(str, args))} exited {r.exit_code}: {r.output}")
    return r.stdout


def cases() -> list[str]:
    out = [f"gguf/{a}/{t}" for a in ARCHS for t in GGUF_TYPES]
    out += [f"imatrix/{a}" for a in ARCHS]
    out += [f"gguf-imatrix/{a}/{t}" for a in ("qwen2", "qwen3_moe") for t in IMATRIX_TYPES]
    out += [f"mlx/{a}/{r}" for a in ARCHS for r in ("4bit", "mixed_3_6")]
    out += [f"gptq/{a}/4bit-g128" for a in ARCHS] + ["gptq/qwen2/3bit-g64-desc-act-asym"]
    out += [f"fit/{k}" for k in FIT]
    return out


def produce(case: str, work: Path) -> str:
    """Make one case's output under `work` and return its digest."""
    kind, *rest = case.split("/")
    if kind == "fit":
        return hashlib.sha256(cli("fit", *FIT[rest[0]], "--json").encode()).hexdigest()
    arch = rest[0]
    src = fixtures.tiny_model_dir(arch)
    out = work / case.replace("/", "-")
    if kind == "gguf":
        cli("quantize", src, "--type", rest[1], "-o", f"{out}.gguf", "-q", "-j", "2")
        return digest(Path(f"{out}.gguf"))
    if kind == "imatrix":
        return digest(_imatrix(arch, work))
    if kind == "gguf-imatrix":  # the imatrix by a relative name: its path is written into the file
        _imatrix(arch, work)
        with _cwd(work):
            cli("quantize", src, "--type", rest[1], "--imatrix", f"imatrix-{arch}.gguf", "-o", f"{out}.gguf", "-q", "-j", "2")
        return digest(Path(f"{out}.gguf"))
    if kind == "mlx":
        recipe = ["--bits", "4"] if rest[1] == "4bit" else ["--bits", "3", "--mixed", "3_6"]
        cli("quantize", src, "--format", "mlx", *recipe, "-o", out, "-q")
        return digest(out)
    if kind == "gptq":
        opts = ["--bits", "4"] if rest[1] == "4bit-g128" else ["--bits", "3", "--group-size", "64", "--desc-act", "--asym"]
        cli("quantize", src, "--format", "gptq", *opts, *CALIB, "--damp", "0.01", "-o", out, "-q", "-j", "2")
        return digest(out)
    raise ValueError(case)


@contextmanager
def _cwd(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def test_module(select):
    """The contents of a test module holding the cases `select` picks: a shared scratch folder (the imatrix
    files are made once in it) and one slow test per case, its output's digest against the record."""
    import pytest

    @pytest.fixture(scope="module")
    def work(tmp_path_factory):
        return tmp_path_factory.mktemp("golden")

    @pytest.mark.slow
    @pytest.mark.parametrize("case", [c for c in cases() if select(c)])
    def test_same_bytes_as_recorded(case, work):
        assert produce(case, work) == recorded()[case]

    return work, test_same_bytes_as_recorded


def recorded() -> dict[str, str]:
    return json.loads(GOLDEN.read_text())


def _imatrix(arch: str, work: Path) -> Path:
    path = work / f"imatrix-{arch}.gguf"
    if not path.exists():
        cli("imatrix", fixtures.tiny_model_dir(arch), "-o", path, *CALIB, "-q", "-j", "2")
    return path


def main(argv: list[str]) -> int:
    """--record: write the digests of every case to tests/data/golden-outputs.json; --check: compare."""
    os.environ.setdefault("QWQQ_CACHE", tempfile.mkdtemp(prefix="qwqq-golden-cache-"))
    only = [a for a in argv if not a.startswith("--")]
    todo = [c for c in cases() if not only or any(c.startswith(o) for o in only)]
    with tempfile.TemporaryDirectory(prefix="qwqq-golden-") as tmp:
        got = {}
        for c in todo:
            got[c] = produce(c, Path(tmp))
            print(c, got[c], flush=True)
            for f in Path(tmp).iterdir():  # keep the imatrix files, drop the rest as we go
                if not f.name.startswith("imatrix-"):
                    import shutil

                    shutil.rmtree(f) if f.is_dir() else f.unlink()
    if "--record" in argv:
        old = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({**old, **got}, indent=1, sort_keys=True) + "\n")
        return 0
    want = recorded()
    bad = [c for c in got if want.get(c) != got[c]]
    print("changed:", bad or "none")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

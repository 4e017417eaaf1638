"""The references qwqq is held against: llama.cpp's own quantizer and reader (via llama-cpp-python)."""

from __future__ import annotations

import ctypes
import math
import re
import subprocess
from pathlib import Path

import gguf

from qwqq.gguf.reader import LazyArray, read_gguf


def llamacpp_quantize(src: Path, dst: Path, mixture: str, threads: int = 2) -> None:
    """Run llama.cpp's llama_model_quantize (what llama-quantize does) on a GGUF."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(gguf.LlamaFileType[f"MOSTLY_{mixture}" if mixture != "F32" else "ALL_F32"])
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src}, {mixture}) returned {rc}")


def tensor_table(path: Path, with_hash: bool = True) -> dict[str, tuple[str, tuple[int, ...], int, str]]:
    """name -> (type name, shape in GGUF ne order, bytes, sha256 of the data)."""
    g = read_gguf(path)
    return {t.name: (t.type.name, t.shape, t.nbytes, g.tensor_sha256(t) if with_hash else "") for t in g.tensors}


DRY_RUN_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+-.*type =\s+(\w+),.*?(?:\((\w+)\))?\s*$")


def llama_quantize_plan(tools: Path, src: Path, mixture: str, imatrix: Path | None = None) -> dict[str, str]:
    """llama-quantize --dry-run's type for every tensor of a GGUF (its own rules, nothing written)."""
    cmd = [str(tools / "llama-quantize"), "--dry-run"] + (["--imatrix", str(imatrix)] if imatrix else [])
    r = subprocess.run(cmd + [str(src), mixture, "2"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"llama-quantize --dry-run failed:\n{r.stderr[-3000:]}"
    plan = {}
    for line in (r.stdout + r.stderr).splitlines():
        if m := DRY_RUN_LINE.match(line):
            plan[m.group(1)] = (m.group(3) or m.group(2)).upper()
    return plan


# Descriptive keys the converter derives from folder names and READMEs; not model facts.
DESCRIPTIVE = {"general.name", "general.basename", "general.size_label", "general.finetune", "general.version",
               "general.type", "general.quantized_by", "general.organization"}


def metadata_values(path: Path) -> dict:
    """A GGUF's metadata, long arrays decoded."""
    g = read_gguf(path)
    return {k: (list(g.array(k)) if isinstance(v, LazyArray) else v) for k, v in g.metadata.items()}


def keys_unlike_the_converters(ours: Path, theirs: Path) -> dict:
    """Every key the converter wrote (descriptive ones aside) that ours lacks or holds another value for."""
    va, vb = metadata_values(ours), metadata_values(theirs)
    return {k: (str(va.get(k))[:60], str(vb[k])[:60]) for k in vb if k not in DESCRIPTIVE and (
        k not in va or not (math.isclose(va[k], vb[k], rel_tol=1e-6) if isinstance(vb[k], float) else va[k] == vb[k]))}


def assert_same_tensors(ours: Path, theirs: Path) -> None:
    """The same tensor names, and each one's type, shape, byte count and bytes."""
    a, b = tensor_table(ours), tensor_table(theirs)
    assert set(a) == set(b), (sorted(set(a) - set(b)), sorted(set(b) - set(a)))
    bad = {n: (a[n][:3], b[n][:3]) for n in a if a[n] != b[n]}
    assert not bad, bad

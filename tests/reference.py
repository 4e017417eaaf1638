"""The references qwqq is held against: llama.cpp's own quantizer and reader (via llama-cpp-python)."""

from __future__ import annotations

import ctypes
import json
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


# ---------------------------------------------------------------- folders of safetensors (MLX, GPTQ)
def safetensors_data_bytes(folder: Path) -> int:
    """Bytes of tensor data in a folder's safetensors files (sizes less the 8-byte length and the header):
    what a plan's tensor_bytes counts."""
    total = 0
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
        total += f.stat().st_size - 8 - n
    return total


def mlx_arrays(folder: Path) -> dict:
    """Every array of an MLX folder, as mlx loads them."""
    import mlx.core as mx

    arrays = {}
    for f in sorted(folder.glob("*.safetensors")):
        arrays.update(mx.load(str(f)))
    return arrays


def assert_same_arrays(ours: dict, ref: dict) -> None:
    """The same array names, and each one's dtype, shape and values."""
    import mlx.core as mx

    assert sorted(ours) == sorted(ref)
    for name in ref:
        a, b = ours[name], ref[name]
        assert (a.dtype, a.shape) == (b.dtype, b.shape), name
        assert mx.array_equal(a, b).item(), f"{name} differs"


def assert_same_mlx_folder(ours: Path, ref: Path) -> None:
    """What mlx_lm.convert writes: every array, config.json and the shard index."""
    assert_same_arrays(mlx_arrays(ours), mlx_arrays(ref))
    for name in ("config.json", "model.safetensors.index.json"):
        assert json.loads((ours / name).read_text()) == json.loads((ref / name).read_text()), name


# ---------------------------------------------------------------- importance statistics of a whole model
class SquareSums:
    """Sum of x^2 per input column and the token counts, per linear, gathered by forward hooks on a whole
    transformers model: the statistic an importance matrix holds. `router_hook` gives each routed expert the
    tokens its router sends it (its down_proj: act(gate x) * up x)."""

    def __init__(self):
        self.sums, self.counts = {}, {}

    def add(self, name: str, x) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        self.sums[name] = self.sums.get(name, 0) + (x * x).sum(0).numpy()
        self.counts[name] = self.counts.get(name, 0) + x.shape[0]

    def router_hook(self, prefix: str, experts):
        """A forward hook for the router of the MoE block at `prefix` whose fused experts are `experts`."""
        import torch

        def hook(mod, args, out):
            x = args[0].reshape(-1, args[0].shape[-1])
            for e in range(experts.gate_up_proj.shape[0]):
                xe = x[(out[2] == e).any(-1)]  # out: (logits, weights, indices)
                self.add(f"{prefix}.experts.{e}.gate_proj.weight", xe)
                self.add(f"{prefix}.experts.{e}.up_proj.weight", xe)
                g, u = torch.nn.functional.linear(xe, experts.gate_up_proj[e]).chunk(2, -1)
                self.add(f"{prefix}.experts.{e}.down_proj.weight", experts.act_fn(g) * u)
        return hook


def assert_same_imatrix_entries(ours: dict, theirs) -> None:
    """qwqq's GGUF-named importance entries against a llama-imatrix file's (both on the same windows): the same
    entries (llama.cpp also lists the routers ffn_gate_inp, which it never quantizes; qwqq also the output
    matrix), each one's shape, the same counts (each routed expert's too) and sums within float noise (1e-3 of
    the entry's largest)."""
    import numpy as np

    assert set(ours) - {"output.weight"} == {n for n in theirs.entries if not n.endswith("ffn_gate_inp.weight")}
    for name, (sums, counts) in ours.items():
        if name not in theirs.entries:
            continue
        their_sums, their_counts = theirs.entries[name]
        assert sums.shape == their_sums.shape, name
        np.testing.assert_array_equal(counts, their_counts, err_msg=name)
        err = np.abs(sums - their_sums).max() / their_sums.max()
        assert err < 1e-3, (name, err)

"""fit's memory model against what real llama.cpp (CPU) reports for the same file, context and KV type.

llama.cpp prints "model buffer size", "llama_kv_cache: size" and "compute buffer size" while it
creates a context; one child process loads each file at several contexts and KV types and hands
those lines back (a child, so that its log callback never meets the one qwqq's backend installs).
Every predicted buffer must be within 5% of the report and never below it (the log rounds to
0.01 MiB, which is allowed for).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qwqq.fit.constants import backend_constants
from qwqq.fit.memory import MiB, compute_bytes, cpu_repack_bytes, kv_bytes, recurrent_bytes
from qwqq.fit.subject import resolve
from tests.test_fit import quantized

pytest.importorskip("llama_cpp", reason='needs llama-cpp-python: pip install "qwqq[llama]"')

ROUNDING = 0.006  # MiB: llama.cpp logs sizes with two decimals
TOLERANCE = 0.05

# (context, KV type, flash attention, n_ubatch)
FULL = [(512, "f16", False, 512), (1000, "f16", True, 512), (1000, "q8_0", True, 512), (8192, "f16", False, 512),
        (8192, "q4_0", True, 512), (32768, "f16", False, 512), (32768, "f16", True, 512), (32768, "q8_0", True, 512),
        (32768, "f16", False, 256), (4096, "f16", False, 1024)]
SHORT = [(1000, "f16", False, 512), (4096, "f16", True, 512), (32768, "f16", False, 512), (32768, "q8_0", True, 512)]

MEASURE = r"""
import ctypes, json, re, sys
import llama_cpp
log = []
@llama_cpp.llama_log_callback
def cb(level, text, user):
    log.append(text.decode("utf-8", "replace"))
llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))
KV = {"f16": 1, "q8_0": 8, "q4_0": 2}
for path, ctx, kv, fa, ub in json.loads(sys.argv[1]):
    log.clear()
    llm = llama_cpp.Llama(model_path=path, n_ctx=ctx, n_batch=max(512, ub), n_ubatch=ub, n_threads=1,
                          type_k=KV[kv], type_v=KV[kv], flash_attn=fa, verbose=True)
    text = "".join(log)
    llm.close()
    kv_size = re.search(r"llama_kv_cache: size =\s+([\d.]+) MiB", text)
    rs_size = re.search(r"llama_memory_recurrent: .*size =\s+([\d.]+) MiB", text)
    print(json.dumps({
        "path": path, "ctx": ctx, "kv": kv, "fa": fa, "ub": ub,
        "model": sum(float(m) for m in re.findall(r"model buffer size =\s+([\d.]+) MiB", text)),
        "kv_size": float(kv_size.group(1)) if kv_size else None,
        "rs_size": float(rs_size.group(1)) if rs_size else 0.0,
        "compute": sum(float(m) for m in re.findall(r"compute buffer size =\s+([\d.]+) MiB", text)),
    }), flush=True)
"""

pytestmark = pytest.mark.slow  # llama.cpp loads SmolLM2 at several contexts


@pytest.fixture(scope="module")
def reports(smollm2_gguf) -> list[dict]:
    # The tiny models with the real Qwen vocabulary: fit models buffers as real models hold them (the output's
    # logits fill the compute buffer; tensors llama.cpp repacks sit between mapped ones), which the tests'
    # 4096-token vocabulary would turn into end effects.
    q = lambda arch, mixture: str(quantized(arch, mixture, vocab="qwen"))  # noqa: E731
    files = [(str(smollm2_gguf), FULL), (q("qwen3", "Q4_K_M"), SHORT), (q("qwen3_moe", "Q4_K_M"), SHORT),
             (q("qwen2", "Q8_0"), SHORT[:2]), (q("qwen3_5", "Q4_K_M"), SHORT), (q("qwen3_5_moe", "Q4_K_M"), SHORT[1:3]),
             (q("qwen3_next", "Q4_K_M"), SHORT[2:])]  # hybrids: KV on 1 of 4 layers, recurrent state
    jobs = [[path, ctx, kv, fa, ub] for path, grid in files for ctx, kv, fa, ub in grid]
    r = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(jobs)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(out) == len(jobs), r.stdout[-2000:]
    return out


def _predict(rep: dict) -> dict:
    m, consts = resolve(rep["path"]), backend_constants()
    b = m.gguf_build
    loaded = b.tensor_bytes - b.split(m.dims.n_layer).unloaded  # an MTP block stays on disk
    return {
        "model": (loaded + cpu_repack_bytes(b.tensors, consts.repack_types)) / MiB,
        "kv_size": kv_bytes(m.dims, rep["ctx"], rep["kv"]) / MiB,
        "rs_size": recurrent_bytes(m.dims) / MiB,
        "compute": compute_bytes(m.dims, rep["ctx"], rep["fa"], n_ubatch=rep["ub"], fragmentation=consts.fragmentation) / MiB,
    }


@pytest.mark.parametrize("what", ["model", "kv_size", "rs_size", "compute"])
def test_prediction_within_5_percent_and_never_below(reports, what):
    bad = []
    for rep in reports:
        got, want = _predict(rep)[what], rep[what]
        if not (want - ROUNDING <= got <= want * (1 + TOLERANCE) + ROUNDING):
            bad.append(f"{Path(rep['path']).name} ctx {rep['ctx']} {rep['kv']} fa={rep['fa']} ub={rep['ub']}: "
                       f"predicted {got:.2f} MiB, llama.cpp {want:.2f} MiB")
    assert not bad, "\n".join(bad)


def test_the_grid_covers_what_it_claims(reports):
    """Several contexts, every KV type, with and without flash attention, repacked and MoE files."""
    assert {r["kv"] for r in reports} == {"f16", "q8_0", "q4_0"}
    assert {r["fa"] for r in reports} == {True, False}
    assert len({r["ctx"] for r in reports}) >= 4
    assert any("qwen3_moe" in r["path"] for r in reports) and any("Q4_K_M" in r["path"] for r in reports)
    assert {r["path"].rsplit("/", 1)[-1].split("-")[0] for r in reports if r["rs_size"]} == {"qwen3_5", "qwen3_5_moe", "qwen3_next"}


def test_quantized_kv_is_exactly_a_fraction_of_f16(reports):
    by = {(r["path"], r["ctx"], r["kv"]): r["kv_size"] for r in reports}
    for (path, ctx, kv), size in by.items():
        if kv != "f16" and (path, ctx, "f16") in by:
            frac = {"q8_0": 34 / 64, "q4_0": 18 / 64}[kv]
            assert size == pytest.approx(by[(path, ctx, "f16")] * frac, abs=ROUNDING)

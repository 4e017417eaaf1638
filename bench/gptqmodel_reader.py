"""GPTQModel as a third-party reader of qwqq's GPTQ checkpoints, on CPU.

For each case, a tiny model (tests/fixtures.py) is written as a GPTQ checkpoint by
qwqq.gptq.checkpoint (round-to-nearest standing in for the solver); then GPTQModel, in its own
virtual environment (it pins versions of torch and numpy that qwqq's does not), loads it on the CPU,
dequantizes every quantized module with its own code (`dequantize_weight`) and runs a forward pass.
Printed, per case: whether every weight GPTQModel decodes equals qwqq's `dequantize` bit for bit,
and how far GPTQModel's logits are from a plain transformers forward pass whose weights are qwqq's
dequantized ones (both float32).

The venv (docs/gptq.md; torch first, and gptqmodel without its torch>=2.14.1 pin, so that pip does
not bring the CUDA build of torch 2.15):

    python3 -m venv ~/.cache/qwqq/gptqmodel-venv
    V=~/.cache/qwqq/gptqmodel-venv/bin
    $V/pip install torch==2.13.0
    $V/pip download --no-deps gptqmodel==7.7.0 -d /tmp/gq && tar xzf /tmp/gq/gptqmodel-7.7.0.tar.gz -C /tmp/gq
    grep -v '^torch>=' /tmp/gq/gptqmodel-7.7.0/requirements.txt > /tmp/gq/req-notorch.txt
    $V/pip install -r /tmp/gq/req-notorch.txt
    $V/pip install --no-deps gptqmodel==7.7.0
    $V/pip install optimum==2.3.0          # for --loader transformers only

Run from the repository root::

    .venv/bin/python -m bench.gptqmodel_reader [--venv DIR] [--cases NAME,...] [--loader gptqmodel|transformers]
        [--backend gptq_torch] [--dtype float16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import GPTQMODEL_VENV, prog

TOKENS = [151644, 872, 198, 9707, 11, 1879, 0, 3555, 374, 220, 17, 10, 17, 30, 151645, 198]

CASES = {  # name: arch, bits, group size, sym, act-order, checkpoint_format
    "qwen2-4bit-g128-sym": ("qwen2", 4, 128, True, False, "gptq"),
    "qwen2-3bit-g32-sym-actorder": ("qwen2", 3, 32, True, True, "gptq"),
    "qwen2-3bit-g32-asym-actorder-v2": ("qwen2", 3, 32, False, True, "gptq_v2"),
    "qwen3-8bit-g64-asym-v2": ("qwen3", 8, 64, False, False, "gptq_v2"),
    "qwen3-8bit-g64-asym-v1": ("qwen3", 8, 64, False, False, "gptq"),  # GPTQModel refuses: see docs/gptq.md
    "qwen3-2bit-channel-sym-actorder": ("qwen3", 2, -1, True, True, "gptq"),
    "qwen3_moe-4bit-g64-sym": ("qwen3_moe", 4, 64, True, False, "gptq"),
}

# GPTQModel.load refuses sym=False in format v1 unless meta.quantizer names gptqmodel >= 0.9.0
# (transformers' from_pretrained has no such guard): see docs/gptq.md.
REFUSED_BY_GPTQMODEL_LOAD = {"qwen3-8bit-g64-asym-v1"}

# Runs inside GPTQModel's venv: load, decode every quantized module, forward.
CHILD = r"""
import json, sys, time, numpy as np, torch
ckpt, out, backend, tokens, dtype, loader = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5], sys.argv[6]
t0 = time.perf_counter()
from gptqmodel import GPTQModel
from gptqmodel.nn_modules.qlinear import BaseQuantLinear
t1 = time.perf_counter()
if loader == "transformers":  # transformers' GPTQ quantizer (optimum + gptqmodel), its own kernel choice
    from transformers import AutoModelForCausalLM
    class _M: pass
    m = _M()
    m.model = AutoModelForCausalLM.from_pretrained(ckpt, device_map="cpu", dtype=getattr(torch, dtype))
else:
    m = GPTQModel.load(ckpt, device="cpu", backend=backend, dtype=getattr(torch, dtype))
t2 = time.perf_counter()
weights, kernels = {}, set()
for name, mod in m.model.named_modules():
    if isinstance(mod, BaseQuantLinear):
        kernels.add(type(mod).__name__)
        w = None
        if hasattr(mod, "dequantize_weight"):
            scales = mod.scales
            try:  # GPTQModel's own decoding of its loaded buffers, with the multiply done in float32
                mod.scales = scales.float()
                w = mod.dequantize_weight()
            except Exception as e:  # kernels that repacked their buffers
                print("no dequantize_weight for", name, type(e).__name__, e, file=sys.stderr)
            finally:
                mod.scales = scales
        if w is not None:
            weights[name] = w.detach().float().T.contiguous().numpy()
with torch.no_grad():
    logits = m.model(torch.tensor([tokens])).logits[0].float().numpy()
t3 = time.perf_counter()
np.savez(out, logits=logits, **{"w:" + k: v for k, v in weights.items()})
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "forward_s": t3 - t2, "kernels": sorted(kernels),
                  "n_quant_modules": len(weights), "dtype": str(next(m.model.parameters()).dtype)}))
"""


def build(case: str, out: Path) -> Path:
    from qwqq.gptq import checkpoint as gf
    from qwqq.gptq import packing
    from tests import fixtures
    from tests.test_gptq_format import RNG, act_order_g_idx, rtn

    arch, bits, gs, sym, act, fmt = CASES[case]

    def quantize(lin, w):
        g_idx = act_order_g_idx(lin.in_features, gs, RNG.permutation(lin.in_features)) if act else None
        return packing.pack(*rtn(w, bits, gs, sym, g_idx), bits, checkpoint_format=fmt)

    return gf.write_gptq(fixtures.tiny_model_dir(arch), out, quantize, bits=bits, group_size=gs, sym=sym,
                         desc_act=act, checkpoint_format=fmt).path


def ours(case: str, ckpt: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """qwqq's dequantized weights, and the logits of transformers' model holding them (float32)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from qwqq.gptq import packing
    from tests import fixtures

    arch, bits, *_, fmt = CASES[case]
    stored: dict[str, np.ndarray] = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), "np") as st:
            stored.update({k: st.get_tensor(k) for k in st.keys()})
    weights = {k.removesuffix(".qweight"): packing.dequantize({s: stored[k.removesuffix(".qweight") + "." + s]
                                                           for s in packing.PACKED}, bits, fmt)
               for k in stored if k.endswith(".qweight")}
    state = {k + ".weight": v for k, v in weights.items()}
    state.update({k: v.astype(np.float32) for k, v in stored.items() if not k.endswith(packing.PACKED)})
    model = AutoModelForCausalLM.from_pretrained(str(fixtures.tiny_model_dir(arch)), dtype=torch.float32,
                                                 attn_implementation="eager")
    sd = model.state_dict()  # transformers 5 fuses Qwen3-MoE experts in memory: gate_up_proj, down_proj
    if any(".mlp.experts.gate_up_proj" in k for k in sd):
        n_exp = model.config.num_experts
        for k in [k for k in sd if k.endswith("mlp.experts.gate_up_proj")]:
            base = k.removesuffix(".gate_up_proj")
            gate = np.stack([state.pop(f"{base}.{e}.gate_proj.weight") for e in range(n_exp)])
            up = np.stack([state.pop(f"{base}.{e}.up_proj.weight") for e in range(n_exp)])
            state[k] = np.concatenate([gate, up], axis=1)
            state[f"{base}.down_proj"] = np.stack([state.pop(f"{base}.{e}.down_proj.weight") for e in range(n_exp)])
    missing = set(sd) - set(state) - {"lm_head.weight"} if model.config.tie_word_embeddings else set(sd) - set(state)
    if missing:
        raise RuntimeError(f"no dequantized value for {sorted(missing)[:5]}")
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)).reshape(sd[k].shape)
                           for k, v in state.items() if k in sd}, strict=False)
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([TOKENS])).logits[0].numpy()
    return weights, logits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog(__spec__), description=__doc__.splitlines()[0])
    ap.add_argument("--venv", type=Path, default=GPTQMODEL_VENV)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--backend", default="gptq_torch", help="GPTQModel backend (auto, gptq_torch, ...)")
    ap.add_argument("--loader", choices=["gptqmodel", "transformers"], default="gptqmodel",
                    help="GPTQModel.load, or transformers' from_pretrained (needs optimum in the venv)")
    ap.add_argument("--dtype", default="float16", help="GPTQModel's compute dtype (its torch kernel takes float16 or bfloat16)")
    args = ap.parse_args(argv)
    py = args.venv / "bin" / "python"
    if not py.exists():
        print(f"no GPTQModel venv at {args.venv}: see the docstring / docs/gptq.md", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="gptqmodel-reader-") as tmp:
        for case in args.cases.split(","):
            ckpt = build(case, Path(tmp) / case)
            want_w, want_logits = ours(case, ckpt)
            npz = Path(tmp) / f"{case}.npz"
            env = {**os.environ, "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", "2"),
                   "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
            t = time.perf_counter()
            r = subprocess.run([str(py), "-c", CHILD, str(ckpt), str(npz), args.backend, json.dumps(TOKENS), args.dtype,
                                args.loader],
                               capture_output=True, text=True, env=env, cwd=tmp)
            wall = time.perf_counter() - t
            if r.returncode != 0:
                last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
                expected = args.loader == "gptqmodel" and case in REFUSED_BY_GPTQMODEL_LOAD and "sym=False" in last
                print(f"{case}: GPTQModel failed (exit {r.returncode}): {last}", file=sys.stderr)
                rows.append((case, "REFUSED (expected)" if expected else "FAILED", last[:80], "", f"{wall:.1f}s"))
                continue
            info = json.loads(r.stdout.strip().splitlines()[-1])
            got = np.load(npz)
            got_w = {k[2:]: got[k] for k in got.files if k.startswith("w:")}
            exact = sum(np.array_equal(got_w[k], want_w[k]) for k in got_w if k in want_w)
            worst = max((float(np.abs(got_w[k] - want_w[k]).max()) for k in got_w if k in want_w), default=float("nan"))
            d = np.abs(got["logits"] - want_logits)
            agree = float((got["logits"].argmax(-1) == want_logits.argmax(-1)).mean())
            rows.append((case, f"{exact}/{len(want_w)} exact (max |dw| {worst:.2g})",
                         f"{d.max():.3g} (rel {d.max() / np.abs(want_logits).max():.2g})", f"{agree:.3f}",
                         f"{wall:.1f}s (load {info['load_s']:.1f}s, fwd {info['forward_s']:.2f}s) "
                         f"{','.join(info['kernels'])} {info['dtype']}"))
    how = f"GPTQModel.load, backend {args.backend}" if args.loader == "gptqmodel" else "transformers from_pretrained"
    print(f"\nGPTQModel ({py}) reading qwqq GPTQ checkpoints via {how}, {args.dtype}, {len(TOKENS)} tokens;"
          " reference: transformers float32 with qwqq's dequantized weights")
    print(f"{'case':34} {'weights (GPTQModel dequantize_weight == qwqq)':48} {'max |dlogit|':22} {'argmax':7} run")
    for row in rows:
        if row[1] in ("FAILED", "REFUSED (expected)"):
            print(f"{row[0]:34} {row[1]}: {row[2]}")
        else:
            print(f"{row[0]:34} {row[1]:48} {row[2]:22} {row[3]:7} {row[4]}")
    ok = lambda r: r[1] == "REFUSED (expected)" or (r[1] != "FAILED" and r[1].split("/")[0] == r[1].split("/")[1].split()[0])
    return 0 if all(ok(r) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Disk traffic of DeepSeek-R1 from its FP8 release to a GGUF with an importance matrix: qwqq's one pass
(`qwqq quantize --imatrix auto`: the FP8 release read once to calibrate and once to quantize, the GGUF written)
against the anchor pipeline (DeepSeek's fp8_cast_bf16.py, llama.cpp's convert_hf_to_gguf.py to a BF16 GGUF,
llama-imatrix, llama-quantize). Computed from R1's shapes, then confirmed on a tiny DeepSeek FP8 release by
counting each process's bytes (/proc/<pid>/io read_bytes + write_bytes, the step's input files evicted from
the page cache first, so every read reaches the disk, mmap included). Writes the section "Disk traffic" of
docs/bench-gguf.md and bench/results/deepseek_disk.json.

    .venv/bin/python -m bench.deepseek_disk [--type IQ2_XXS] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from bench.common import BENCH_CACHE, DOCS, RESULTS_DIR, Launcher, machine, prog, qwqq_command, qwqq_git, \
    replace_section

OUT = BENCH_CACHE / "deepseek_disk"
HEADING = "## Disk traffic (DeepSeek-R1 from FP8, with an importance matrix)"
BLOCK = 128  # FP8 scale blocks

# DeepSeek's inference/fp8_cast_bf16.py, its I/O as it is: each shard read whole, each FP8 weight times its
# block scales cast to bfloat16, the shard written; the index rewritten without the scales.
CAST = """
import json, shutil, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
from tests.fixtures_deepseek import dequantize_fp8_blockwise
import torch
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True, exist_ok=True)
index = json.loads((src / "model.safetensors.index.json").read_text())
for shard in sorted(set(index["weight_map"].values())):
    t = load_file(str(src / shard))
    out = {k: (dequantize_fp8_blockwise(v, t[k + "_scale_inv"]).to(torch.bfloat16) if k + "_scale_inv" in t else v)
           for k, v in t.items() if not k.endswith("_scale_inv")}
    save_file(out, str(dst / shard), metadata={"format": "pt"})
index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.endswith("_scale_inv")}
(dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
for f in src.iterdir():
    if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
        shutil.copy(f, dst / f.name)
cfg = json.loads((src / "config.json").read_text()); cfg.pop("quantization_config", None)
(dst / "config.json").write_text(json.dumps(cfg, indent=2))
"""


# --------------------------------------------------------------------------- from the shapes
def release_bytes(config: dict) -> dict:
    """Bytes of the FP8 release and of its bfloat16 cast, with and without the MTP layer, from GGUF shapes
    (fit's tensor_shapes: what qwqq writes) plus the MTP layer (one MoE block, eh_proj, three norms, and its
    copies of the embeddings and the head, as R1's index lists them)."""
    from qwqq.fit.subject import tensor_shapes

    hidden, vocab = int(config["hidden_size"]), int(config["vocab_size"])
    h, nope, v, kv_lora = (int(config[k]) for k in ("num_attention_heads", "qk_nope_head_dim", "v_head_dim", "kv_lora_rank"))
    fp8 = bf16 = 0  # the layers' linears: FP8 bytes (with scales), and the same as bfloat16
    rest = 0  # embeddings, head, norms, router: stored alike in both
    last = int(config["num_hidden_layers"]) - 1
    mtp_fp8 = mtp_bf16 = mtp_rest = 0
    scales = lambda r, c: 4 * math.ceil(r / BLOCK) * math.ceil(c / BLOCK)
    for name, shape in tensor_shapes(config):
        kind = name.split(".")[-2] if name.startswith("blk.") else name
        if len(shape) == 1 or kind == "ffn_gate_inp" or not name.startswith("blk."):
            b = (4 if kind == "exp_probs_b" else 2) * math.prod(shape)
            rest += b
            mtp_rest += b if name.startswith(f"blk.{last}.") else 0
            continue
        n = math.prod(shape)
        if kind == "attn_k_b":  # kv_b_proj [h x (nope + v), kv_lora]: its scales once
            s = scales(h * (nope + v), kv_lora)
        elif kind == "attn_v_b":
            s = 0
        else:
            s = (shape[0] if len(shape) == 3 else 1) * scales(*shape[-2:])
        fp8 += n + s
        bf16 += 2 * n
        if name.startswith(f"blk.{last}."):  # the last (MoE) block: what the MTP layer's block costs
            mtp_fp8, mtp_bf16 = mtp_fp8 + n + s, mtp_bf16 + 2 * n
    mtp_fp8 += 2 * hidden * hidden + scales(hidden, 2 * hidden)  # eh_proj
    mtp_bf16 += 4 * hidden * hidden
    mtp_rest += 3 * 2 * hidden + 2 * 2 * vocab * hidden  # enorm, hnorm, shared_head.norm; embed_tokens, head
    return {"fp8": fp8 + rest + mtp_fp8 + mtp_rest, "fp8_no_mtp": fp8 + rest,
            "fp8_block_weights": fp8,  # what calibration reads (each block's weights; a few embedding rows)
            "bf16": bf16 + rest + mtp_bf16 + mtp_rest, "bf16_no_mtp": bf16 + rest}


def imatrix_bytes(config: dict) -> int:
    """llama-imatrix's file: per multiplied weight, sums over its input columns (per expert, per head) + counts."""
    from qwqq.fit.subject import tensor_shapes

    total = 0
    for name, shape in tensor_shapes(config, True):
        if len(shape) >= 2 and name != "token_embd.weight":
            n_mat = shape[0] if len(shape) == 3 else 1
            total += 4 * n_mat * (shape[-1] + 1)
    return total


def traffic(config: dict, mixture: str, imatrix_reads: int = 1) -> dict:
    """(read, written) bytes of each step, qwqq's and the anchor's, from the config."""
    from qwqq.fit.subject import from_config

    r = release_bytes(config)
    model = from_config(config, "model", "config", "model")
    gguf_bf16, out = model.build("BF16").file_bytes, model.build(mixture).file_bytes
    im = imatrix_bytes(config)
    return {
        "qwqq": {"quantize --imatrix auto": (r["fp8_block_weights"] + r["fp8_no_mtp"], out)},
        "anchor": {"fp8_cast_bf16.py": (r["fp8"], r["bf16"]),
                   "convert_hf_to_gguf.py --outtype bf16": (r["bf16_no_mtp"], gguf_bf16),
                   "llama-imatrix": (imatrix_reads * gguf_bf16, im),
                   f"llama-quantize {mixture}": (gguf_bf16 + im, out)},
        "sizes": {**r, "gguf_bf16": gguf_bf16, "imatrix": im, "output": out},
    }


def totals(t: dict) -> tuple[int, int]:
    q = sum(a + b for a, b in t["qwqq"].values())
    a = sum(a + b for a, b in t["anchor"].values())
    return q, a


# --------------------------------------------------------------------------- counted on a tiny model
def _evict(paths) -> None:
    """Drop the files' pages from the page cache (written ones synced first), so the next step reads the disk."""
    for p in paths:
        for f in ([p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def measure_tiny(mixture: str, repeat: int) -> tuple[dict, dict]:
    from tests import fixtures
    from tests.fixtures_deepseek import tiny_deepseek_dir
    from tests.test_imatrix import N_CTX, TEXT

    src = tiny_deepseek_dir("fp8", mtp=True, vocab="qwen")  # the real vocabulary: reads of embedding rows count
    tools, tree = fixtures.llama_cpp_tools(), fixtures.llama_cpp_tree()
    OUT.mkdir(parents=True, exist_ok=True)
    text = OUT / "calib.txt"
    text.write_text(TEXT)
    cast, gguf, im, theirs, ours = (OUT / n for n in ("bf16-cast", "bf16.gguf", "imatrix.gguf", "theirs.gguf",
                                                       "ours.gguf"))
    # the converter through tests/convert_launcher.py: the tiny model's cut tokenizer registered as qwen2
    conv_env = {**os.environ, "PYTHONPATH": str(tree / "gguf-py"), "HF_HUB_OFFLINE": "1",
                "QWQQ_TINY_TOKENIZER": str(fixtures.tiny_tokenizer_dir())}  # (unused with the real tokenizer)
    launcher = Path(fixtures.__file__).with_name("convert_launcher.py")
    calib = ["--calib-tokens", str(2 * N_CTX), "--calib-seqlen", str(N_CTX)]
    steps = [  # (side, name, inputs, command, env)
        ("qwqq", "quantize --imatrix auto", [src], [*qwqq_command(), "quantize", str(src), "--type", mixture,
                                                    "--imatrix", "auto", *calib, "-o", str(ours), "--force", "-j", "2", "-q"], None),
        ("anchor", "fp8_cast_bf16.py", [src], [sys.executable, "-c", CAST, str(src), str(cast)], None),
        ("anchor", "convert_hf_to_gguf.py --outtype bf16", [cast],
         [sys.executable, str(launcher), str(tree), "--outtype", "bf16", "--outfile", str(gguf), str(cast)],
         conv_env),
        ("anchor", "llama-imatrix", [gguf, text], [str(tools / "llama-imatrix"), "-m", str(gguf), "-f", str(text), "-o",
                                                   str(im), "-c", str(N_CTX), "-b", str(N_CTX), "--chunks", "2", "-t", "2",
                                                   "--no-ppl"], None),
        ("anchor", f"llama-quantize {mixture}", [gguf, im], [str(tools / "llama-quantize"), "--imatrix", str(im), str(gguf),
                                                             str(theirs), mixture, "2"], None),
    ]
    launch = Launcher()
    try:
        for k in range(repeat):  # the last run counts (the first warms the tools' own files)
            got = {"qwqq": {}, "anchor": {}}
            for side, name, inputs, cmd, env in steps:
                _evict(inputs)
                m = launch.measure(cmd, OUT / f"{side}-{name.split()[0]}.log", env=env)
                io = m["io"]
                got[side][name] = (io["read_bytes"], io["write_bytes"] - io["cancelled_write_bytes"])
            print(f"run {k + 1}: " + "; ".join(f"{n} r {r / 1e6:.0f} MB w {w / 1e6:.0f} MB"
                                                for s in got.values() for n, (r, w) in s.items()), flush=True)
    finally:
        launch.close()
    return got, json.loads((src / "config.json").read_text())


# --------------------------------------------------------------------------- the doc
def write_doc(res: dict) -> None:
    m = res["machine"]
    r1, tiny = res["r1"], res["tiny"]
    L = [HEADING, "",
         f"Made by `.venv/bin/python -m bench.deepseek_disk` on {res['date']} ({m['cpu']}, {m['nproc']} cores; qwqq "
         f"{res['qwqq']}). Bytes read from and written to disk to go from DeepSeek's FP8 release to a "
         f"GGUF of type {res['mixture']} with an importance matrix. **qwqq**: `qwqq quantize --type {res['mixture']} "
         "--imatrix auto` reads the release's block weights once to calibrate (one block at a time) and every "
         "tensor once to quantize, and writes the GGUF. **Anchor**: DeepSeek's `fp8_cast_bf16.py` (the release "
         "as bfloat16, MTP layer included), llama.cpp's `convert_hf_to_gguf.py --outtype bf16`, `llama-imatrix`, "
         f"`llama-quantize --imatrix ... {res['mixture']}`.", "",
         "### DeepSeek-R1, from its shapes", "",
         "Sizes from the config (fit's tensor shapes; FP8 with 128 x 128 float32 block scales; the MTP layer; "
         "GGUF sizes from the plan quantize executes). llama-imatrix counted as reading the BF16 GGUF once, "
         "which needs the 1.34 TB file in the page cache; with less memory mmap reads it again for each chunk.", "",
         "| step | read GB | written GB |", "|---|---:|---:|"]
    for side in ("qwqq", "anchor"):
        for name, (rd, wr) in r1[side].items():
            L.append(f"| {side}: {name} | {rd / 1e9:,.1f} | {wr / 1e9:,.1f} |")
    q, a = res["r1_totals"]
    s = r1["sizes"]
    L += ["", f"Total: qwqq **{q / 1e12:.2f} TB**, the anchor **{a / 1e12:.2f} TB**: qwqq moves **{q / a:.3f} x** "
          f"the anchor's bytes ({a / q:.1f} x less). Sizes: FP8 release {s['fp8'] / 1e9:,.1f} GB (the published one is "
          f"about 690 GB), its bf16 cast {s['bf16'] / 1e9:,.1f} GB, BF16 GGUF {s['gguf_bf16'] / 1e9:,.1f} GB, imatrix "
          f"{s['imatrix'] / 1e9:.2f} GB, {res['mixture']} {s['output'] / 1e9:,.1f} GB. The anchor also needs "
          f"{(s['bf16'] + s['gguf_bf16']) / 1e12:.2f} TB of scratch space for its two intermediate copies; qwqq none.",
          "", "### Counted on a tiny DeepSeek FP8 release", "",
          "tests/fixtures_deepseek.py, vocab='qwen': hidden 256, 4 layers, 8 experts, MTP layer, vocab 151936 with the real tokenizer, each step a child "
          "process; its /proc/<pid>/io at exit, read_bytes and write_bytes less cancelled_write_bytes, after its "
          "input files were evicted from the page cache (fsync + POSIX_FADV_DONTNEED), so reads through mmap count. "
          "Predicted: the same formulas on the tiny config.", "",
          "| step | read MB (counted) | read MB (predicted) | written MB (counted) | written MB (predicted) |",
          "|---|---:|---:|---:|---:|"]
    for side in ("qwqq", "anchor"):
        for name, (rd, wr) in res["counted"][side].items():
            prd, pwr = tiny[side][name]
            L.append(f"| {side}: {name} | {rd / 1e6:,.1f} | {prd / 1e6:,.1f} | {wr / 1e6:,.1f} | {pwr / 1e6:,.1f} |")
    cq, ca = totals(res["counted"])
    pq, pa = res["tiny_totals"]
    L += ["", f"Counted: qwqq {cq / 1e6:,.0f} MB, the anchor {ca / 1e6:,.0f} MB, ratio **{cq / ca:.3f}** (predicted "
          f"{pq / pa:.3f}). Written bytes match the prediction; the reads beyond it are files the formulas leave "
          "out (the tokenizer, some 11 MB here, read by qwqq, the cast and the converter, and copied by the cast) and, for qwqq, the "
          "readahead around the embedding rows the sample uses (at most 128 KB per distinct token: about 1 GB for R1's "
          "8192 calibration tokens, against its 1.34 TB read). The tiny model's ratio is not R1's: its embeddings (151936 x 256) are half "
          "of it."]
    replace_section(DOCS / "bench-gguf.md", HEADING, "\n".join(L) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=prog(__spec__), description=__doc__.split("\n\n")[0])
    ap.add_argument("--type", default="IQ2_XXS")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args(argv)
    from qwqq.fit.subject import find_catalog

    r1 = traffic(find_catalog("DeepSeek-R1").config, args.type)
    counted, tiny_config = measure_tiny(args.type, args.repeat)
    tiny = traffic(tiny_config, args.type)
    res = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "qwqq": qwqq_git(), "mixture": args.type,
           "r1": r1, "r1_totals": totals(r1), "tiny": tiny, "tiny_totals": totals(tiny), "counted": counted}
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "deepseek_disk.json").write_text(json.dumps(res, indent=2) + "\n")
    if not args.no_doc:
        write_doc(res)
    q, a = res["r1_totals"]
    print(f"R1: qwqq {q / 1e12:.2f} TB, anchor {a / 1e12:.2f} TB, ratio {q / a:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What `qwqq fit` answers for the hybrid Qwen models of the catalog on common machines, as one markdown
table in docs/fit.md (section "Sizing the hybrid Qwen models"): for each model and machine, the best build
that fits (type, file size, context and KV type, where it runs, decode speed), or that nothing does.

No measurement: fit's own model (docs/fit.md), from the catalog's shapes. Run from the repository root::

    .venv/bin/python -m bench.fit_table
"""

from __future__ import annotations

import argparse

from bench.common import DOCS, prog, replace_section
from qwqq.fit import candidate as C
from qwqq.fit import search as F

MODELS = ["Qwen3.5-0.8B", "Qwen3.5-2B", "Qwen3.5-4B", "Qwen3.5-9B", "Qwen3.5-27B", "Qwen3.6-27B", "Qwen3.8-27B",
          "Qwen3.5-35B-A3B", "Qwen3.6-35B-A3B", "Qwen3.5-122B-A10B", "Qwen3.5-397B-A17B", "Qwen3-Next-80B-A3B"]
MACHINES = {  # column title -> fit's hardware flags
    "24 GB GPU": dict(vram=24, ram=32),
    "8 GB GPU + 32 GB RAM": dict(vram=8, ram=32),
    "Mac 16 GB": dict(unified=16),
    "Mac 32 GB": dict(unified=32),
    "Mac 64 GB": dict(unified=64),
    "Mac 128 GB": dict(unified=128),
}
HEADING = "## Sizing the hybrid Qwen models"
COMMAND = ".venv/bin/python -m bench.fit_table"


def cell(name: str, flags: dict) -> str:
    report = F.run_fit(name, F.machine(**flags), C.Request())
    best = next((c for c in report.candidates if c.fits), None)
    if best is None:
        return "does not fit"
    where = {"gpu": "GPU", "cpu": "CPU"}.get(best.mode, f"{best.gpu_layers}/{best.n_layers} layers on GPU"
                                              + (f", experts of {best.cpu_moe_layers} in RAM" if best.cpu_moe_layers else ""))
    tps = f", ~{best.tokens_per_s:.0f} tok/s" if best.tokens_per_s else ""
    return f"{best.build.type_name} {best.build.file_bytes / 1e9:.1f} GB, {best.ctx // 1024}k {best.kv} ({where}{tps})"


def table() -> str:
    lines = [HEADING, "", f"`{COMMAND}` (fit's model, from the catalog's shapes; no download). Each cell: the best "
             "build that fits (GGUF type or MLX folder, file size, context and KV cache type, where it runs, decode "
             "speed). The KV cache is on the full-attention "
             "layers only (one in four); the recurrent state (e.g. 149.6 MiB per sequence for the 27B) and the "
             "MTP block (in the file, not loaded) are counted as llama.cpp counts them.", "",
             "| model | " + " | ".join(MACHINES) + " |", "|---|" + "---|" * len(MACHINES)]
    for name in MODELS:
        lines.append(f"| {name} | " + " | ".join(cell(name, flags) for flags in MACHINES.values()) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    argparse.ArgumentParser(prog=prog(__spec__), description=__doc__.splitlines()[0]).parse_args()
    text = table()
    replace_section(DOCS / "fit.md", HEADING, text)
    print(text)


if __name__ == "__main__":
    main()

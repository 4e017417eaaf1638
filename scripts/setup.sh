#!/usr/bin/env bash
# Install qwqq and everything its tests need into ./.venv, from this repository's files only.
#   - torch 2.13.0 (a CPU build; a plain "torch" would pull gigabytes of CUDA)
#   - llama-cpp-python, compiled once (about 4 minutes on 2 cores) into a wheel cache and reused
#   - qwqq itself, editable, with the llama and test extras
# Idempotent: a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
LLAMA_CPP_VERSION=${LLAMA_CPP_VERSION:-0.3.36}
WHEELS=${QWQQ_WHEEL_CACHE:-$HOME/.cache/qwqq/wheels}
# llama.cpp is built for this CPU (-march=native) but without AMX: some hypervisors report AMX in cpuid and
# then trap its instructions (SIGILL in ggml's AMX matmul on Q4_K and friends). Explicit -mno-* flags win
# over -march=native in gcc and clang whatever their order. tests/fixtures.py builds llama.cpp's tools alike.
if [ "$(uname -m)" = x86_64 ]; then
  export CFLAGS="${CFLAGS:-} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  export CXXFLAGS="${CXXFLAGS:-} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  WHEELS="$WHEELS/no-amx"
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip >/dev/null

.venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" install torch==2.13.0

mkdir -p "$WHEELS"
wheel=$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
  echo "building llama-cpp-python $LLAMA_CPP_VERSION (once; about 4 minutes on 2 cores)..." >&2
  # --no-cache-dir: pip caches wheels built from an sdist by the sdist alone, not by the flags above
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "${PIP[@]}" wheel --no-cache-dir --no-deps -w "$WHEELS" "llama-cpp-python==$LLAMA_CPP_VERSION"
  wheel=$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl | head -1)
  "${PIP[@]}" install --no-deps --force-reinstall "$wheel"  # a venv may hold an earlier build of the same version
fi
"${PIP[@]}" install "$wheel"
if ! "${PIP[@]}" install -e ".[llama,test]" > .venv/install.log 2>&1; then
  cat .venv/install.log >&2
  exit 1
fi
echo "qwqq installed in .venv ($(.venv/bin/qwqq --version 2>/dev/null || echo ok))" >&2

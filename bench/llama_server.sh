#!/usr/bin/env bash
# Build llama.cpp's `llama-server` from the llama.cpp sources vendored in the llama-cpp-python sdist, for
# bench/engine's llama.cpp column and memory rows (`python -m bench.engine --llama-server PATH`).
#
#   bench/llama_server.sh [SDIST] [WORKDIR]
#
# SDIST: llama_cpp_python-0.3.36.tar.gz (default: WORKDIR's copy, else `pip download` fetches it from PyPI).
# WORKDIR: where it is unpacked and built (default: $LLAMA_DIR, else ~/.cache/switchboard/llama); the
# binary ends up at WORKDIR/llama-server, whose path is printed last. JOBS (default 2) sets the parallel
# compile jobs; run it under `nice` on a shared machine. About 10-30 min on 2 cores. Flags: the machine's
# own ISA (-DGGML_NATIVE=ON, as issue 18 measured it) except AMX, Release, and nothing that needs the
# network (no prebuilt web UI download, no HTTPS client). AMX stays off unless LLAMA_AMX=on: on a Sapphire
# Rapids VM (2026-12-05) the vendored ggml's AMX path died at its first `tilezero` (SIGILL) before loading
# the model, so a native build could not serve at all. LLAMA_ISA=avx2 builds for AVX2+FMA only (no AVX-512,
# whatever this CPU has), for the AVX2-forced run of bench/engine on an AVX-512 machine (docs/BENCHMARKS.md).
set -euo pipefail

VERSION=0.3.36
WORKDIR=${2:-${LLAMA_DIR:-$HOME/.cache/switchboard/llama}}
SDIST=${1:-$WORKDIR/llama_cpp_python-$VERSION.tar.gz}
JOBS=${JOBS:-2}
NO_AMX=()
if [ "${LLAMA_AMX:-off}" != on ]; then
  NO_AMX=("-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
          "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
          -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
fi

mkdir -p "$WORKDIR"
if [ ! -f "$SDIST" ]; then
  python -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORKDIR"
  SDIST=$WORKDIR/llama_cpp_python-$VERSION.tar.gz
fi
SRC=$WORKDIR/llama_cpp_python-$VERSION/vendor/llama.cpp
if [ ! -f "$SRC/CMakeLists.txt" ]; then
  tar xzf "$SDIST" -C "$WORKDIR"
fi

ISA=(-DGGML_NATIVE=ON)
if [ "${LLAMA_ISA:-native}" = avx2 ]; then
  ISA=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
       -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF)
fi

GENERATOR=()
if command -v ninja >/dev/null; then GENERATOR=(-G Ninja); fi
cmake -S "$SRC" -B "$WORKDIR/build" "${GENERATOR[@]}" \
  -DCMAKE_BUILD_TYPE=Release \
  "${ISA[@]}" \
  -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_TOOLS=ON \
  -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_BUILD_UI=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF \
  -DLLAMA_OPENSSL=OFF \
  "${NO_AMX[@]}"
cmake --build "$WORKDIR/build" --target llama-server -j "$JOBS"
cp "$WORKDIR/build/bin/llama-server" "$WORKDIR/llama-server"
"$WORKDIR/llama-server" --version 2>&1 | head -n 2 >&2 || true
echo "$WORKDIR/llama-server"

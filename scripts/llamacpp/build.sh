#!/usr/bin/env bash
# Fetch llama.cpp (vendored in the llama-cpp-python sdist on PyPI) and build the
# few tools the llama.cpp fixtures need. Never run by CI: the fixtures are committed.
#
#   bash scripts/llamacpp/build.sh            # -> .llamacpp/{sdist,src,build}
#   LLAMACPP_DIR=/elsewhere bash scripts/llamacpp/build.sh
#
# Layout under $LLAMACPP_DIR:
#   src/    pristine llama.cpp source (make_fixtures.py applies and reverts the fault patches)
#   build/  cmake build; build/bin/llama-eval-callback is the binary the fixtures use
# The converter runs with PYTHONPATH=src/gguf-py (the sdist's own gguf package), never installed.
# A full build takes ~17 min on 2 cores; a rebuild after a one-file patch takes seconds.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
LLAMACPP_DIR=${LLAMACPP_DIR:-$REPO/.llamacpp}
JOBS=${JOBS:-2}
TARGETS=${TARGETS:-llama-eval-callback}
mkdir -p "$LLAMACPP_DIR"
cd "$LLAMACPP_DIR"

if [ ! -f src/CMakeLists.txt ]; then
  sdist=llama_cpp_python-${LLAMA_CPP_PYTHON_VERSION}.tar.gz
  [ -f "sdist/$sdist" ] || python3 -m pip download --no-deps --no-binary :all: \
    "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}" -d sdist
  rm -rf unpack && mkdir unpack
  tar -xzf "sdist/$sdist" -C unpack
  mv "unpack/llama_cpp_python-${LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp" src
  rm -rf unpack src/.git  # src/.git is a dangling submodule pointer in the sdist
  # A git repo of the pristine tree, so fault patches apply and revert cleanly.
  (cd src && git init -q && git add -A && git -c user.name=build -c user.email=build@localhost \
    commit -qm "llama.cpp from llama-cpp-python ${LLAMA_CPP_PYTHON_VERSION}")
fi

if [ ! -f build/CMakeCache.txt ]; then
  cmake -S src -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=ON
fi
# shellcheck disable=SC2086
cmake --build build -j "$JOBS" --target $TARGETS

echo "llama.cpp built: $LLAMACPP_DIR/build/bin/llama-eval-callback"

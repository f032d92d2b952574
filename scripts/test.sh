#!/usr/bin/env bash
# The whole test set-up in one command, on a fresh Linux machine or a Mac:
#   bash scripts/test.sh [pytest args...]
# It makes (or reuses) a virtual environment, installs the CPU build of torch on Linux (never
# the CUDA build unless TORCH_CUDA=1), installs the dev dependencies at the versions the suite
# was last proven with (constraints.txt), preloads OpenBLAS when present, and runs pytest.
#
# Environment:
#   VENV=DIR         the virtual environment (default: .venv in the repository)
#   LATEST=1         ignore constraints.txt: the newest releases of everything but torch (the
#                    suite must pass there too; the pins are for reproducibility, not a crutch)
#   TORCH_SPEC=...   another torch, e.g. TORCH_SPEC=torch==2.14.1
#   TORCH_CUDA=1     let pip choose torch's default (CUDA) build on Linux
#   TORCH_INDEX_URL  where the CPU build of torch comes from when no local wheel has it
#                    (default: PyTorch's CPU index)
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1

VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
py="$VENV/bin/python"
pip=("$py" -m pip install -q)

constraints=()
if [ "${LATEST:-0}" != 1 ]; then
    constraints=(-c constraints.txt)
fi
# torch's version is chosen apart from the rest: its CPU build is what decides it (TORCH_SPEC overrides).
torch_spec=${TORCH_SPEC:-$(grep -E '^torch==' constraints.txt | head -1)}

# torch first: on Linux an unpinned `pip install torch` pulls a multi-GB CUDA build.
if ! "$py" -c 'import torch' 2>/dev/null; then
    if [ "$(uname -s)" = Linux ] && [ "${TORCH_CUDA:-0}" != 1 ]; then
        # A local CPU wheel (pip's find-links) first, then PyTorch's CPU index.
        if ! "${pip[@]}" --only-binary :all: "${torch_spec}+cpu" 2>/dev/null \
            && ! "${pip[@]}" --only-binary :all: "$torch_spec" \
                --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"; then
            echo "error: could not install the CPU build of torch ($torch_spec); set TORCH_INDEX_URL" >&2
            exit 2
        fi
    else
        "${pip[@]}" "$torch_spec"
    fi
fi
"${pip[@]}" "${constraints[@]}" -e '.[dev]'

# MLX's CPU wheel on Linux links a reference BLAS; OpenBLAS makes fp32 matmul ~30x faster.
for lib in /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 /usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3; do
    if [ "$(uname -s)" = Linux ] && [ -e "$lib" ] && [ -z "${LD_PRELOAD:-}" ]; then
        export LD_PRELOAD=$lib
    fi
done

"$py" -m pytest "$@"

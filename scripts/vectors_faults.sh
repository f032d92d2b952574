#!/usr/bin/env bash
# What `vectors check` reports for the project's MLX ops, the clean NumPy engine of the tests
# and each injected kernel fault (docs/vectors.md quotes its output).
#
#   bash scripts/vectors_faults.sh OUTDIR [MODEL] [DTYPE]     # default: synthetic (TinyLlama shape), float16
#
# Writes --quick vectors into OUTDIR/vectors, one results file per engine, and prints each
# check's last line (per failing op: first failing shape and pattern) and its exit code.
set -uo pipefail
out=${1:?usage: vectors_faults.sh OUTDIR [MODEL] [DTYPE]}
model=${2:-synthetic}
dtype=${3:-float16}
cd "$(dirname "$0")/.."
trace() { python -m mlx_tinyllama.trace vectors "$@"; }
mkdir -p "$out"
trace write "$out/vectors" --model "$model" --dtype "$dtype" --quick || exit 2
for engine in mlx_tinyllama.vectors.engine:fused mlx_tinyllama.vectors.engine:explicit \
              mlx_tinyllama.vectors.engine:fp16_pure \
              tests/numpy_kernels.py:clean tests/numpy_kernels.py:drop_partial_tile \
              tests/numpy_kernels.py:zero_rows_from_32 tests/numpy_kernels.py:fp16_accumulation \
              tests/numpy_kernels.py:softmax_no_max tests/numpy_kernels.py:rope_offset_by_one \
              tests/numpy_kernels.py:decode_mask_at_zero tests/numpy_kernels.py:no_mask \
              tests/numpy_kernels.py:rope_sin_sign tests/numpy_kernels.py:rope_pairs_interleaved \
              tests/numpy_kernels.py:softmax_stale_tile tests/numpy_kernels.py:sdpa_kv_head_modulo \
              tests/numpy_kernels.py:rms_norm_tail_columns tests/numpy_kernels.py:scores_scale_by_d; do
  name=${engine##*:}
  ops=()
  # NumPy's fp16 loop is slow: one row per projection (K = hidden and intermediate) is enough
  [ "$name" = fp16_accumulation ] && ops=(--ops matmul --cases 'matmul.*.M1')
  trace run "$out/vectors" --engine "$engine" --out "$out/$name.safetensors" "${ops[@]}" >/dev/null || exit 2
  COLUMNS=400 trace check "$out/vectors" --results "$out/$name.safetensors" "${ops[@]}" --json "$out/$name.json" \
    > "$out/$name.txt"
  rc=$?
  echo "$name (exit $rc): $(tail -n 1 "$out/$name.txt")"
done

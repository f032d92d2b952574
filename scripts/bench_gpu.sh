#!/usr/bin/env bash
# The bench on an NVIDIA GPU through MLX's CUDA backend: synthetic TinyLlama-1.1B
# in fp16, ours vs mlx-lm vs transformers fp16 on torch CUDA. Three steps:
#
#   bash scripts/bench_gpu.sh prepare   # here, with network: wheels into .whl/gpu1, .whl/gpu2
#   bash scripts/bench_gpu.sh stash     # device call 1 (carry .whl/gpu1): part one -> /root/stash
#   bash scripts/bench_gpu.sh run       # device call 2 (carry .whl/gpu2), at once: install, bench -> $OUT
#   bash scripts/bench_gpu.sh tests     # (same call or the next) the differential tests on the GPU
#
# The family at the real shapes (issue 25): the weights are drawn in the stash call, benched in the next:
#   bash scripts/bench_gpu.sh stash && bash scripts/bench_gpu.sh generate   # device call 1 (carry .whl/gpu1)
#   bash scripts/bench_gpu.sh family                                        # device call 2 (carry .whl/gpu2)
#
# Why two calls: the mlx-cuda-13 wheel (86 MiB) is over the 64 MiB a device call
# may carry, so it travels split in two, and the machine stays warm only ~30 s
# between calls. The device image already has Python 3.12, torch, transformers,
# numpy, safetensors, sentencepiece, rich, jinja2 and the nvidia-* CUDA 13
# libraries that mlx-cuda-13 needs (nvidia-cublas, -cudnn-cu13, -nccl-cu13,
# -cufft, -cusolver, -cuda-nvrtc, -cuda-runtime), so only mlx, mlx-cuda-13 and
# mlx-lm (pure Python; its other needs are on the image) are carried.
set -euo pipefail

MLX_VERSION=0.32.4
MLX_LM_VERSION=0.32.2
CUDA_WHEEL=mlx_cuda_13-${MLX_VERSION}-py3-none-manylinux_2_35_x86_64.whl
STASH=${STASH:-/root/stash}
SITE=${SITE:-/tmp/site}

prepare() {
  mkdir -p .whl/gpu1 .whl/gpu2
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_35_x86_64 -d .whl "mlx==${MLX_VERSION}" "mlx-cuda-13==${MLX_VERSION}"
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform any -d .whl "mlx-lm==${MLX_LM_VERSION}"
  rm -f .whl/gpu1/* .whl/gpu2/*
  split -b 44000000 ".whl/${CUDA_WHEEL}" ".whl/gpu2/${CUDA_WHEEL}.part-"
  mv ".whl/gpu2/${CUDA_WHEEL}.part-aa" .whl/gpu1/
  cp .whl/mlx-${MLX_VERSION}-cp312-cp312-manylinux_2_35_x86_64.whl .whl/mlx_lm-${MLX_LM_VERSION}-py3-none-any.whl .whl/gpu2/
  (cd .whl && sha256sum "${CUDA_WHEEL}") > .whl/gpu2/SHA256SUMS
  du -sh .whl/gpu1 .whl/gpu2
}

stash() {
  mkdir -p "$STASH"
  cp .whl/gpu1/* "$STASH/"
  ls -l "$STASH"
}

install() {
  cat "$STASH/${CUDA_WHEEL}.part-aa" .whl/gpu2/"${CUDA_WHEEL}".part-a[b-z] > "/tmp/${CUDA_WHEEL}"
  (cd /tmp && sha256sum -c "$OLDPWD/.whl/gpu2/SHA256SUMS")
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "/tmp/${CUDA_WHEEL}" .whl/gpu2/mlx-*.whl .whl/gpu2/mlx_lm-*.whl
  # libmlx.so looks for the CUDA libraries at $ORIGIN/../../nvidia/*: point that at the image's copies.
  local nv
  nv=$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')
  ln -sfn "$nv" "$SITE/nvidia"
  LD_LIBRARY_PATH=$(find "$nv" -maxdepth 3 -type d -name lib | paste -sd:)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  export LD_LIBRARY_PATH
}

run() {
  : "${OUT:?run on the device machine, where \$OUT is set}"
  install
  export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MLX_TINYLLAMA_CACHE=/tmp/mlx_tinyllama_cache
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv \
    | tee "$OUT/nvidia-smi.csv"
  python3 -c 'import mlx.core as mx, torch, transformers; print("mlx", mx.__version__, mx.default_device(),
mx.device_info(), "| torch", torch.__version__, "| transformers", transformers.__version__)' | tee "$OUT/versions.txt"
  # mlx-lm imports transformers at package level: if the image's copy is too old for it, bench without it.
  local side_by_side=""
  if ! python3 -c 'import mlx_lm; print("mlx_lm", mlx_lm.__version__)' 2>"$OUT/mlx_lm_import.err"; then
    side_by_side=--no-mlx-lm
    echo "mlx-lm does not import here (see mlx_lm_import.err): running without it" >&2
  fi
  # The device's copy bandwidth, a measured ceiling for decode (bytes read + written).
  python3 - <<'EOF' | tee "$OUT/copy_bandwidth.txt"
import torch
x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
s.record(); n = 20
for _ in range(n): y.copy_(x)
e.record(); torch.cuda.synchronize()
print(f"device-to-device copy: {2 * n * x.numel() / (s.elapsed_time(e) / 1e3) / 1e9:.0f} GB/s (read + write)")
EOF
  python3 -c 'from mlx_tinyllama.synthetic import materialize; print(materialize("tinyllama", 0))'
  set -o pipefail
  timeout 480 python3 -m mlx_tinyllama.trace bench --model synthetic:tinyllama --dtype float16 \
    --prompt-lengths 38,128,512,2048 --decode-tokens 128 --repeats 5 --warmup 2 --with-transformers $side_by_side \
    --json "$OUT/bench_h200_fp16.json" 2>&1 | tee "$OUT/bench_h200_fp16.log"
}

# The differential tests on MLX's CUDA backend (the reference, transformers, runs on torch's CPU).
gpu_tests() {
  : "${OUT:?run on the device machine, where \$OUT is set}"
  install
  export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
  python3 -c 'import mlx.core as mx; print("default device:", mx.default_device())' | tee "$OUT/gpu_tests.log"
  set -o pipefail
  timeout 420 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/test_model.py tests/test_paths.py \
    tests/test_compare.py tests/test_stability.py tests/test_generate.py tests/test_cuda_stats.py tests/test_cuda_attention.py 2>&1 | tee -a "$OUT/gpu_tests.log"
  # The one-kernel masked decode attention (cuda_attention.py) against MLX's SDPA, and decode speed.
  timeout 200 python3 scripts/gpu_decode_attention.py 2>&1 | tee -a "$OUT/gpu_tests.log"
  # The one-kernel tap statistics (cuda_stats.py) against the float64 host computation, and their cost.
  timeout 200 python3 scripts/gpu_stats.py check time 2>&1 | tee -a "$OUT/gpu_tests.log"
  # The observed attention internals in one kernel against the op sequence they replace.
  timeout 120 python3 scripts/gpu_internals.py 2>&1 | tee -a "$OUT/gpu_tests.log"
}

# The presets at their published shapes (synthetic.py), TinyLlama first as the baseline row.
FAMILY=${FAMILY:-tinyllama smollm2-135m qwen2.5-0.5b llama3.2-1b mistral-7b}
export MLX_TINYLLAMA_CACHE=${MLX_TINYLLAMA_CACHE:-/root/mlx_tinyllama_cache}

# Weights drawn on the device's CPUs (numpy only: MLX is not needed yet), kept on its disk for `family`.
generate() {
  PYTHONPATH="$PWD" python3 -c '
import sys, time
from mlx_tinyllama.synthetic import materialize
for preset in sys.argv[1:]:
    t = time.perf_counter()
    print(preset, materialize(preset, 0), f"{time.perf_counter() - t:.1f} s", flush=True)
' $FAMILY
  du -sh "$MLX_TINYLLAMA_CACHE"/synthetic-*
}

# Every family preset in float16 (the bench's default dtype), one bench process each, ours vs mlx-lm:
# prefill at 38..2048 tokens, decode (eager and compiled) of 128 tokens, the per-stage cost.
family() {
  : "${OUT:?run on the device machine, where \$OUT is set}"
  install
  export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
  set -o pipefail
  { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv
    python3 -c 'import mlx.core as mx, mlx_lm; print("mlx", mx.__version__, mx.default_device(), mx.device_info(), "| mlx_lm", mlx_lm.__version__)'
  } 2>&1 | tee "$OUT/family.log"
  local p
  for p in $FAMILY; do
    echo "=== $p $(date -u +%T)" | tee -a "$OUT/family.log"
    timeout "${FAMILY_TIMEOUT:-150}" python3 -m mlx_tinyllama.trace bench --model "synthetic:$p" --dtype float16 \
      --prompt-lengths 38,128,512,2048 --decode-tokens 128 --repeats 10 --warmup 2 --no-tap-overhead \
      --json "$OUT/family-$p.json" 2>&1 | tee -a "$OUT/family.log" || echo "=== $p failed: $?" | tee -a "$OUT/family.log"
  done
}

# Any command with the CUDA build of MLX installed, e.g. `exec python3 -m mlx_tinyllama.trace ...`.
gpu_exec() {
  install
  export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
  "$@"
}

case "${1:-}" in
  prepare) prepare ;;
  stash) stash ;;
  run) run ;;
  tests) gpu_tests ;;
  generate) generate ;;
  family) family ;;
  exec) shift; gpu_exec "$@" ;;
  *) echo "usage: $0 prepare|stash|run|tests|generate|family|exec CMD..." >&2; exit 2 ;;
esac

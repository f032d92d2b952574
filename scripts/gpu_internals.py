"""On MLX's CUDA backend: the observed attention internals in one kernel
(cuda_attention.attention_internals) against the op sequence they replace (Ops.qk, scale,
add_mask, softmax), on the same GPU and the same inputs.

    bash scripts/bench_gpu.sh exec python3 scripts/gpu_internals.py

For fp16, bf16 and fp32, T query rows over S keys (prefill and cached steps), 32 heads over 4 KV
heads, head_dim 64: the share of values that are bit-identical, and the largest difference in
units of the dtype's epsilon times the row's largest magnitude. Only the order of float32 sums
(and, for probs, how exp is evaluated) differs, so PASS needs >= 99 % identical values for the
half types, where a float32 difference rarely crosses a rounding boundary, and every difference
within 4 such units; float32 probs within 16 (the first GPU run measured 8.6 on a 39-key row:
about 1e-6 of the row's largest probability, a float32 softmax's own rounding). Exits 1 on a miss.
"""
import sys

import mlx.core as mx
import numpy as np

from mlx_tinyllama import cuda_attention
from mlx_tinyllama.ops import Ops, mask_value

NAMES = ("scores", "scores_scaled", "scores_masked", "probs")


def reference(q, k, scale):
    ops = Ops()
    s = ops.qk(q, k)
    s1 = ops.scale(s, scale)
    s2 = ops.add_mask(s1, q.shape[2], k.shape[2])
    return s, s1, s2, ops.softmax(s2, q.dtype)


def main() -> int:
    assert cuda_attention.available(), "needs MLX's CUDA backend"
    rng = np.random.default_rng(0)
    ok = True
    for dt in (mx.float16, mx.bfloat16, mx.float32):
        eps = float(mx.finfo(dt).eps)
        for T, S in ((38, 38), (1, 39), (7, 45), (128, 128)):
            q = mx.array(rng.standard_normal((1, 32, T, 64)).astype(np.float32) * 2).astype(dt)
            k = mx.array(rng.standard_normal((1, 4, S, 64)).astype(np.float32) * 2).astype(dt)
            ours = cuda_attention.attention_internals(q, k, 0.125, mask_value(dt))
            want = reference(q, k, 0.125)
            for name, a, b in zip(NAMES, ours, want):
                a32, b32 = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
                both_inf = np.isinf(a32) & np.isinf(b32)
                a32, b32 = np.where(both_inf, 0, a32), np.where(both_inf, 0, b32)  # -inf on both sides: equal
                same = np.mean((a32 == b32) | (np.isinf(a32) & np.isinf(b32) & (np.sign(a32) == np.sign(b32))))
                finite = np.isfinite(b32)
                scale_ = np.max(np.abs(np.where(finite, b32, 0)), axis=-1, keepdims=True) + 1e-30
                diff = np.where(finite, np.abs(a32 - b32) / scale_ / eps, 0.0).max()
                if name == "scores_masked":  # a masked value is the dtype's minimum either way
                    diff = np.where(finite & (b32 > -1e4), np.abs(a32 - b32) / scale_ / eps, 0.0).max()
                bound = 16 if (dt == mx.float32 and name == "probs") else 4
                good = diff <= bound and (dt == mx.float32 or same >= 0.99) and np.array_equal(np.isfinite(a32), finite)
                ok &= bool(good)
                print(f"{str(dt):20s} T={T:4d} S={S:4d} {name:14s} identical {same:7.2%}  max diff {diff:5.2f} eps·rowmax"
                      f"  {'ok' if good else 'MISS'}", flush=True)
    print("attention internals kernel:", "PASS" if ok else "FAIL", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""On MLX's CUDA backend: the one-kernel masked decode attention (cuda_attention.py) against
MLX's own SDPA with the same boolean mask, then greedy decode speed, eager vs compiled.

    bash scripts/bench_gpu.sh exec python3 scripts/gpu_decode_attention.py

Exit 1 when the kernel and the library differ by more than the roundings of two float32
reductions in different orders and of the output type. Greedy tokens of the two decode loops
may part at a near-tie in fp16 (other reduction orders); the script says whether they did.
"""

from __future__ import annotations

import sys
import time

import mlx.core as mx

from mlx_tinyllama import cuda_attention, sources
from mlx_tinyllama.decode import CompiledDecoder
from mlx_tinyllama.fast import greedy_decode, next_token, prefill

assert cuda_attention.available(), "needs MLX's CUDA backend"
ok = True
for dtype, u in ((mx.float16, 2**-11), (mx.bfloat16, 2**-8), (mx.float32, 2**-24)):
    for S, written in ((1, 1), (38, 38), (166, 39), (2048, 2048), (2048, 100)):
        q = mx.random.normal((1, 32, 1, 64)).astype(dtype)
        k = mx.random.normal((1, 4, S, 64)).astype(dtype)
        v = mx.random.normal((1, 4, S, 64)).astype(dtype)
        vis = (mx.arange(S) < written).reshape(1, 1, 1, S)
        ours = cuda_attention.masked_decode_attention(q, k, v, 0.125, vis).astype(mx.float32)
        ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=vis).astype(mx.float32)
        err = mx.abs(ours - ref).max().item() / max(mx.abs(ref).max().item(), 1e-30)
        # both compute in float32 (reductions over `written` terms in other orders), then round to dtype
        bound = 4 * u + 4 * 2**-24 * written ** 0.5
        good = err <= bound
        ok &= good
        print(f"{str(dtype):14} S={S:5} written={written:5}: max|kernel - sdpa| / max|sdpa| = {err:.2e} "
              f"({'ok' if good else 'FAIL'}, bound {bound:.1e})")

lm = sources.load("synthetic:tinyllama", "float16")
model, prompt, n = lm.model, mx.array([[1 + (i * 7919) % 31990 for i in range(38)]]), 128


def timed(step, make_cache):
    best, tokens = float("inf"), None
    for _ in range(4):
        cache = make_cache()
        first = next_token(prefill(step, prompt, cache))
        mx.eval(first)
        t0 = time.perf_counter()
        tokens = greedy_decode(step, cache, first, n)
        best = min(best, time.perf_counter() - t0)
    return n / best, tokens


eager, eager_tokens = timed(lambda ids, c: model(ids, cache=c), model.make_cache)
dec = CompiledDecoder(model)
compiled, compiled_tokens = timed(dec, lambda: dec.make_cache(38 + n + 1))
print(f"decode fp16, {n} tokens after 38 (best of 4): eager {eager:.0f} tok/s, compiled {compiled:.0f} tok/s "
      f"({compiled / eager:.2f}x); same tokens: {eager_tokens == compiled_tokens}")
sys.exit(0 if ok else 1)

"""What a half linear layer on MLX's CPU backend pays to upcast its weight per call instead of
reading a kept fp32 copy (ops.Fp32GemmLinear), for TinyLlama's weight shapes and a range of
rows (tokens): the ratio behind ops.UPCAST_PER_CALL_ROWS. Samples of the two ways alternate.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python scripts/cpu_upcast_cost.py [ROWS ...]
    ... python scripts/cpu_upcast_cost.py --prefill 512   # a whole fp16 prefill of synthetic TinyLlama, both ways
"""
import sys
import time

import mlx.core as mx

from mlx_tinyllama import sources
from mlx_tinyllama.ops import UPCAST_PER_CALL_ROWS, Fp32GemmLinear, fp32_weight_copies

mx.set_default_device(mx.cpu)
SHAPES = {"q_proj / o_proj": (2048, 2048), "gate_proj / up_proj": (5632, 2048), "down_proj": (2048, 5632)}
REPEATS = 7


def timed(f) -> float:
    t = time.perf_counter()
    mx.eval(f())
    return time.perf_counter() - t


def prefill(tokens: int) -> None:
    """The same prefill on two loads of the model: without copies (per-call upcasts) and with them."""
    ids = mx.array([3 + (i * 7919) % 31990 for i in range(tokens)])
    per_call, kept = sources.load("synthetic", "float16"), sources.load("synthetic", "float16")
    mx.eval(kept.model(ids[:1]))  # one row: every copy made
    print(f"synthetic TinyLlama fp16, prefill of {tokens} tokens; fp32 copies held: "
          f"{fp32_weight_copies(per_call.model) / 1e9:.1f} GB and {fp32_weight_copies(kept.model) / 1e9:.1f} GB")
    a, b = [], []
    for _ in range(3):
        b.append(timed(lambda: per_call.model(ids)))
        a.append(timed(lambda: kept.model(ids)))
    print(f"kept copies {sorted(a)[1]:.2f} s, per-call upcast {sorted(b)[1]:.2f} s (median of 3): "
          f"ratio {sorted(b)[1] / sorted(a)[1]:.2f}")


if sys.argv[1:2] == ["--prefill"]:
    prefill(int(sys.argv[2]))
    sys.exit(0)
ROWS = [int(r) for r in sys.argv[1:]] or [1, 38, 128, 256, 512, 1024, 2048]
print(f"UPCAST_PER_CALL_ROWS = {UPCAST_PER_CALL_ROWS}; median of {REPEATS} alternating samples")
print(f"{'weight':22} {'rows':>5} {'kept copy':>10} {'per call':>10} {'ratio':>6}")
for label, shape in SHAPES.items():
    w = (mx.random.normal(shape, key=mx.random.key(0)) * 0.02).astype(mx.float16)
    kept = Fp32GemmLinear(w)
    mx.eval(kept(mx.zeros((1, 1, shape[1]), mx.float16)))  # one row: the copy is made and kept
    for rows in ROWS:
        x = mx.random.normal((1, rows, shape[1]), key=mx.random.key(1)).astype(mx.float16)
        mx.eval(x)
        per_call = lambda: (x.astype(mx.float32) @ w.astype(mx.float32).T).astype(mx.float16)  # noqa: E731
        a, b = [], []
        for _ in range(REPEATS + 1):
            a.append(timed(lambda: kept(x)))
            b.append(timed(per_call))
        ka, kb = sorted(a[1:])[REPEATS // 2], sorted(b[1:])[REPEATS // 2]
        print(f"{label:22} {rows:5d} {ka * 1e3:8.1f} ms {kb * 1e3:8.1f} ms {kb / ka:6.2f}")

"""On MLX's CUDA backend: the one-kernel tap statistics (cuda_stats.py) against the float64 host
computation, then what stats taps cost.

    bash scripts/bench_gpu.sh exec python3 scripts/gpu_stats.py [check] [time]

check: constructed tensors (fp16/bf16/fp32; 1-D, token-major, head-major, transposed views; sizes
       below, at and above a block; NaN, Inf, all-NaN, masked scores; more than one launch) and
       every stats tap of a synthetic:small forward, each against `taps.batch_stats` on the CPU on
       the same values. min, max, counts and rows must be equal; sum and mean within 1e-12 of
       n·absmax, std within 1e-9 relative (+1e-12·absmax). Exits 1 on any miss.
time:  synthetic:tinyllama fp16, a 38-token prefill and 16 eager decode steps: taps off, stats on every
       stage through the kernel, and through the grouped MLX-op path it replaces.
"""
import sys
import time

import mlx.core as mx
import numpy as np

from mlx_tinyllama import cuda_stats, fast, sources, taps
from mlx_tinyllama.taps import Taps, stage_of, tap_names

def host_stats(xs, axis):
    """taps.batch_stats on the CPU device: the numpy float64 path."""
    mx.set_default_device(mx.cpu)
    try:
        return taps.batch_stats([mx.array(np.array(x.astype(mx.float32))).astype(x.dtype) for x in xs], axis)
    finally:
        mx.set_default_device(mx.gpu)


def agree(got, want, label):
    bad = cuda_stats.mismatches(got, want)
    if bad:
        print(f"MISMATCH {label}: " + "; ".join(bad))
    return not bad


def check():
    assert cuda_stats.available(), "needs MLX's CUDA backend"
    rng = np.random.default_rng(0)
    cases = []
    for dt in (mx.float16, mx.bfloat16, mx.float32):
        for shape, axis in (((7,), 0), ((38, 2048), 0), ((32, 38, 38), 1), ((4, 38, 64), 1), ((1, 32000), 0),
                            ((5, 4097), 0), ((4096,), 0), ((3, 2), 1)):
            x = rng.standard_normal(shape).astype(np.float32) * 3 + 0.5
            cases.append((mx.array(x).astype(dt), axis, f"{dt} {shape}"))
    masked = rng.standard_normal((32, 38, 38)).astype(np.float32)
    masked[:, np.triu_indices(38, 1)[0], np.triu_indices(38, 1)[1]] = np.finfo(np.float16).min
    cases.append((mx.array(masked).astype(mx.float16), 1, "masked scores fp16"))
    masked32 = masked.copy()
    masked32[masked32 < -1e4] = np.finfo(np.float32).min
    cases.append((mx.array(masked32), 1, "masked scores fp32 (float32 minimum)"))
    odd = rng.standard_normal((38, 100)).astype(np.float32)
    odd[0, 1], odd[5, 5], odd[7, 0] = np.nan, np.inf, -np.inf
    cases.append((mx.array(odd).astype(mx.float16), 0, "NaN and Inf"))
    cases.append((mx.array(np.full((3, 5), np.nan, np.float32)), 0, "all NaN"))
    cases.append((mx.array(np.full((9000,), 2.5, np.float32)), 0, "constant over 3 blocks"))
    t = mx.array(rng.standard_normal((38, 4, 64)).astype(np.float32)).astype(mx.float16).transpose(1, 0, 2)
    cases.append((t, 1, "transposed view (heads of q)"))
    ok = True
    got = cuda_stats.batch_stats([c[0] for c in cases], [c[1] for c in cases])  # 30+ tensors: two launches
    for (x, axis, label), g in zip(cases, got):
        g = dict(taps._head(x), **g)
        ok &= agree(g, host_stats([x], axis)[0], label)
    print(f"constructed tensors: {len(cases)} in {-(-len(cases) // cuda_stats.MAX_INPUTS)} launches", flush=True)

    lm = sources.load("synthetic:small", "float16")
    names = tap_names(lm.config.num_hidden_layers)
    ids = mx.array(list(range(100, 138)))
    full, stats = Taps(names, "full"), Taps(names, "stats")
    mx.eval(lm.model(ids, tap=full), full.tensors)
    lm.model(ids, tap=stats)
    for n, s in stats.stats().items():
        ok &= agree(s, host_stats([full.tensors[n]], stage_of(n).token_axis)[0], n)
    print(f"synthetic:small stats taps: {len(names)} checked", flush=True)
    print("cuda_stats check:", "PASS" if ok else "FAIL", flush=True)
    return ok


def median_ms(f, n=9):
    for _ in range(2):
        f()
    ts = []
    for _ in range(n):
        mx.synchronize()
        t0 = time.perf_counter()
        f()
        mx.synchronize()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)) * 1e3


def timing():
    lm = sources.load("synthetic:tinyllama", "float16")
    names = tap_names(lm.config.num_hidden_layers)
    ids = mx.array(list(range(100, 138)))
    real = cuda_stats.available

    def prefill(mode):
        def f():
            if mode == "off":
                mx.eval(lm.model(ids))
                return
            tp = Taps(names, "stats")
            mx.eval(lm.model(ids, tap=tp))
            tp.stats()
        return f

    def decode(mode, n=16):
        def f():
            cache = lm.model.make_cache()
            tok = fast.next_token(lm.model(ids[None], cache=cache))
            mx.eval(tok)
            for _ in range(n):
                tp = Taps(names, "stats") if mode != "off" else taps.NO_TAPS
                logits = lm.model(tok, cache=cache, tap=tp)
                tok = fast.next_token(logits)
                mx.eval(tok)
                if mode != "off":
                    tp.stats()
        return f

    base = 0.0
    for label, make in (("prefill 38", prefill), ("decode 16 steps", decode)):
        off = median_ms(make("off"))
        fused = median_ms(make("stats"))
        cuda_stats.available = lambda: False  # the grouped MLX-op path
        try:
            grouped = median_ms(make("stats"))
        finally:
            cuda_stats.available = real
        off, fused, grouped = off - base, fused - base, grouped - base  # decode: its untapped prefill taken out
        print(f"{label}: off {off:.2f} ms, stats (one kernel) {fused:.2f} ms = x{fused / off:.2f}, "
              f"stats (grouped ops) {grouped:.2f} ms = x{grouped / off:.2f}", flush=True)
        base = off


if __name__ == "__main__":
    what = sys.argv[1:] or ["check", "time"]
    ok = True
    if "check" in what:
        ok = check()
    if "time" in what:
        timing()
    sys.exit(0 if ok else 1)

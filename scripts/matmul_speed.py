"""fp32 matmul throughput of MLX on this machine: run it with and without the OpenBLAS preload
(LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3) to see what the preload buys."""
import mlx.core as mx, time
a = mx.random.normal((2048, 2048)); mx.eval(a); mx.eval(a @ a)
t = time.perf_counter(); [mx.eval(a @ a) for _ in range(3)]; dt = (time.perf_counter() - t) / 3
print(f"fp32 2048x2048 matmul: {dt * 1e3:.0f} ms, {2 * 2048**3 / dt / 1e9:.1f} GFLOP/s")

"""Where the memory of a streamed full dump (dump.py, `run --taps '*' --dump`) goes: for each
shard, the bytes pending, MLX's active and peak memory while its layer is evaluated and after it
is written, MLX's buffer cache, the process's RSS and its high-water mark, and the fp32 weight
copies held (ops.Fp32GemmLinear). Synthetic TinyLlama in fp16, the first LAYERS layers only
(a layer's peak does not depend on how many follow).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
      python scripts/profile_dump.py TOKENS [LAYERS (22)] [SHARD_MB (512)] [OUT_DIR (/tmp/profile_dump)]
"""
import os
import shutil
import sys
import time

import mlx.core as mx

from mlx_tinyllama import dump, sources
from mlx_tinyllama.ops import fp32_weight_copies
from mlx_tinyllama.taps import select

tokens = int(sys.argv[1])
layers = int(sys.argv[2]) if len(sys.argv) > 2 else 22
shard_mb = float(sys.argv[3]) if len(sys.argv) > 3 else 512
out = sys.argv[4] if len(sys.argv) > 4 else "/tmp/profile_dump"
G = 1e9


def rss() -> str:
    with open("/proc/self/status") as f:  # Linux: VmRSS and VmHWM (kB)
        d = dict(line.split(":", 1) for line in f)
    return f"rss {int(d['VmRSS'].split()[0]) / 1e6:.2f} hwm {int(d['VmHWM'].split()[0]) / 1e6:.2f} GB"


def mlx() -> str:
    return (f"active {mx.get_active_memory() / G:.2f} peak {mx.get_peak_memory() / G:.2f} "
            f"cache {mx.get_cache_memory() / G:.2f} GB")


lm = sources.load("synthetic", "float16")
lm.model.model.layers = lm.model.model.layers[:layers]
mx.eval(lm.model.parameters())
print(f"loaded, {layers} layers: {mlx()}; {rss()}", flush=True)
os.makedirs(out, exist_ok=True)
rec = dump.StreamingDump(select(["*"], layers), os.path.join(out, "taps.safetensors"), {"format": "profile"},
                         int(shard_mb * (1 << 20)))
write, t0 = dump.StreamingDump._write, time.perf_counter()


def profiled_write(self):
    pending = sum(v.nbytes for v in self.tensors.values())
    mx.eval(list(self.tensors.values()))
    evaluated = mlx()
    write(self)
    print(f"{time.perf_counter() - t0:7.1f} s shard {len(self.shards)}, {pending / G:.2f} GB: evaluated {evaluated}; "
          f"written {mlx()}; {rss()}; copies {fp32_weight_copies(lm.model) / G:.2f} GB", flush=True)
    mx.reset_peak_memory()


dump.StreamingDump._write = profiled_write
mx.reset_peak_memory()
try:
    mx.eval(lm.model(mx.array([3 + (i * 7919) % 31990 for i in range(tokens)]), tap=rec))
    print(f"logits evaluated: {mlx()}; {rss()}", flush=True)
    rec.finish()
    print(f"done in {time.perf_counter() - t0:.1f} s; {rss()}")
finally:
    shutil.rmtree(out, ignore_errors=True)

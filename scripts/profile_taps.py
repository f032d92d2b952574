"""Where the time of tapped forward passes goes: taps off, holding references to every
tap, full tensors, stats, and the stats path's parts (stacking, device reductions).

    python scripts/profile_taps.py synthetic:tinyllama float16   # on a GPU (scripts/bench_gpu.sh exec ...)
    python scripts/profile_taps.py synthetic:medium float32      # on a CPU
"""
import time, sys, mlx.core as mx
from mlx_tinyllama import sources, taps as T
from mlx_tinyllama.taps import Taps, tap_names, ATTENTION_INTERNALS
spec = sys.argv[1]; dtype = sys.argv[2]
lm = sources.load(spec, dtype)
L = lm.config.num_hidden_layers
ids = mx.array(list(range(100, 138)))
names = tap_names(L)
no_int = [n for n in names if not any(n.endswith(s) for s in ATTENTION_INTERNALS) and not n.endswith("mlp.act")]
def t(f, n=7):
    for _ in range(2): f()
    ts=[]
    for _ in range(n):
        mx.synchronize(); a=time.perf_counter(); f(); mx.synchronize(); ts.append(time.perf_counter()-a)
    return sorted(ts)[n//2]*1e3
def off(): mx.eval(lm.model(ids))
def hold(sel):
    def f():
        tp=Taps(sel,"full"); lg=lm.model(ids,tap=tp); mx.eval(lg)
    return f
def full(sel):
    def f():
        tp=Taps(sel,"full"); lg=lm.model(ids,tap=tp); mx.eval(lg, tp.tensors)
    return f
def stats(sel):
    def f():
        tp=Taps(sel,"stats"); lg=lm.model(ids,tap=tp); mx.eval(lg); tp.stats()
    return f
# decomposition of the stats path
tp=Taps(names,"stats"); lg=lm.model(ids,tap=tp); mx.eval(lg, [v for _,v in tp._pending])
groups={}
for n,v in tp._pending: groups.setdefault((tuple(v.shape), v.dtype, T.stage_of(n).token_axis), []).append(v)
def stack_only(): mx.eval([mx.stack(g) for g in groups.values()])
def device_stats(): [T._device_batch_stats(g, k[2]) for k,g in groups.items()]
print("groups", {k[0]: len(g) for k,g in groups.items()})
for label, f in [("off", off), ("hold refs all", hold(names)), ("full all", full(names)), ("stats no internals", stats(no_int)),
                 ("stats all", stats(names)), ("stack only", stack_only), ("device stats only", device_stats)]:
    print(f"{label:22s} {t(f):8.2f} ms", flush=True)

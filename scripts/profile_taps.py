"""Where the time of tapped forward passes goes: taps off, holding references to every
tap, full tensors, stats, and the stats path's parts (stacking, device reductions).

    python scripts/profile_taps.py synthetic:tinyllama float16   # on a GPU (scripts/bench_gpu.sh exec ...)
    python scripts/profile_taps.py synthetic:medium float32      # on a CPU
"""
import time, sys, mlx.core as mx
from mlx_tinyllama import cuda_stats, sources, taps as T
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
pending = list(tp._pending)
groups={}
for n,v in pending: groups.setdefault((tuple(v.shape), v.dtype, T.stage_of(n).token_axis), []).append(v)
def stack_only(): mx.eval([mx.stack(g) for g in groups.values()])
def device_stats(): [T._device_batch_stats(g, k[2]) for k,g in groups.items()]
def kernel_stats(): cuda_stats.batch_stats([v for _, v in pending], [T.stage_of(n).token_axis for n, _ in pending])
def forward_taps_only():  # the tapped forward, its pending taps evaluated, no statistics
    tp=Taps(names,"stats"); lg=lm.model(ids,tap=tp); mx.eval(lg, [v for _,v in tp._pending])
def build_only():  # Python: the tapped graph built, nothing evaluated
    tp=Taps(names,"stats"); lm.model(ids,tap=tp)
def build_off(): lm.model(ids)
steps = [("off", off), ("build graph, taps off", build_off), ("build graph, stats taps", build_only),
         ("hold refs all", hold(names)), ("full all", full(names)), ("stats taps evaluated, no stats", forward_taps_only),
         ("stats no internals", stats(no_int)), ("stats all", stats(names)), ("stack only", stack_only)]
if cuda_stats.available():
    steps.append(("cuda_stats kernel + merge only", kernel_stats))
else:
    steps.append(("device stats only", device_stats))
for label, f in steps:
    print(f"{label:32s} {t(f):8.2f} ms", flush=True)
if "--cprofile" in sys.argv:
    import cProfile, pstats
    cProfile.run("for _ in range(5): stats(names)()", "/tmp/taps.prof")
    pstats.Stats("/tmp/taps.prof").sort_stats("tottime").print_stats(18)

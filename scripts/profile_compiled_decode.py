"""Why the compiled decode step can be slower than the eager one on a large model (a profiling
script, not a test; mistral-7b on an H100: 0.82x mlx-lm compiled, 1.00x eager, docs/family.md).

    bash scripts/bench_gpu.sh exec python3 scripts/profile_compiled_decode.py [SPEC] [DTYPE]

1. decode tok/s, engines alternating sample by sample: ours eager, the compiled step on the model's
   own separate weights (`compiled_separate`), the compiled step on concatenated q/k/v and gate/up
   weights (`compiled_concat`, what `generate` and the bench's ours_compiled run on a GPU), mlx-lm;
2. the matmuls alone, one token: every layer's q/k/v and gate/up products as separate weights and as
   the concatenated ones, eager and compiled, all layers in one evaluated graph (median of repeats).
Prints JSON on stdout (the figures) and progress on stderr.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import mlx.core as mx

from mlx_tinyllama import sources
from mlx_tinyllama.bench import MLXEngine, alternate, mlx_lm_engine, ours_engine, summarize, synthetic_ids
from mlx_tinyllama.decode import CompiledDecoder

SPEC = sys.argv[1] if len(sys.argv) > 1 else "synthetic:mistral-7b"
DTYPE = sys.argv[2] if len(sys.argv) > 2 else "float16"
CONTEXT, TOKENS, REPEATS, WARMUP = 38, int(__import__("os").environ.get("PROFILE_TOKENS", 128)), 8, 2


def compiled_engine(name: str, lm, concatenate: bool) -> MLXEngine:
    decoder = CompiledDecoder(lm.model, concatenate=concatenate)
    engine = MLXEngine(name, lm.model, lambda: decoder.make_cache(CONTEXT + TOKENS))
    engine.step = decoder
    return engine, decoder


def timed_graph(fn, repeats=20, warmup=3) -> float:
    for _ in range(warmup):
        mx.eval(fn())
    times = []
    for _ in range(repeats):
        mx.synchronize()
        t0 = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmuls(lm) -> dict:
    """One token through every layer's input projections, separate vs concatenated weights."""
    cfg, layers = lm.config, lm.model.layers
    x = mx.random.normal((1, 1, cfg.hidden_size)).astype(lm.model.layers[0].self_attn.q_proj.weight.dtype)
    sep = [(L.self_attn.q_proj.weight, L.self_attn.k_proj.weight, L.self_attn.v_proj.weight,
            L.mlp.gate_proj.weight, L.mlp.up_proj.weight) for L in layers]
    joined = [(mx.concatenate(w[:3], 0), mx.concatenate(w[3:], 0)) for w in sep]
    mx.eval(joined)

    def separate():
        return [x @ w.T for ws in sep for w in ws]

    def concat():
        return [x @ w.T for ws in joined for w in ws]

    out = {}
    for name, fn in (("separate", separate), ("concatenated", concat)):
        out[f"{name}_eager_ms"] = 1e3 * timed_graph(fn)
        out[f"{name}_compiled_ms"] = 1e3 * timed_graph(mx.compile(fn))
        print(f"matmuls {name}: eager {out[f'{name}_eager_ms']:.2f} ms, compiled {out[f'{name}_compiled_ms']:.2f} ms "
              f"({len(layers)} layers, q/k/v + gate/up, one token)", file=sys.stderr, flush=True)
    nbytes = sum(w.nbytes for ws in sep for w in ws)
    out["weight_bytes"] = nbytes
    for k in [k for k in out if k.endswith("_ms")]:
        out[k.replace("_ms", "_gbs")] = nbytes / (out[k] / 1e3) / 1e9
    del joined
    return out


def main() -> int:
    lm = sources.load(SPEC, DTYPE)
    result = {"spec": SPEC, "dtype": DTYPE, "device": str(mx.default_device()),
              "device_name": str(mx.device_info().get("device_name", "")),
              "context": CONTEXT, "tokens": TOKENS, "repeats": REPEATS, "warmup": WARMUP}
    result["matmuls"] = matmuls(lm)
    engines = {"ours": ours_engine(lm), "mlx_lm": mlx_lm_engine(lm)}
    # the separate-weight step is traced (its weights captured) before concatenation makes them views
    engines["compiled_separate"], _ = compiled_engine("compiled_separate", lm, False)
    context = synthetic_ids(CONTEXT, lm.config.vocab_size, 0)
    engines["compiled_separate"].decode(context, 2)
    engines["compiled_concat"], dec = compiled_engine("compiled_concat", lm, True)
    result["concatenated"] = dec.concatenated
    times = alternate({n: (lambda e=e: e.decode(context, TOKENS)) for n, e in engines.items()}, REPEATS, WARMUP)
    result["decode"] = {n: summarize(t, TOKENS) for n, t in times.items()}
    result["paired_ratio_over_mlx_lm"] = {
        n: statistics.median(b / a for a, b in zip(t, times["mlx_lm"])) for n, t in times.items() if n != "mlx_lm"}
    for n, s in result["decode"].items():
        print(f"decode {n}: {s['tokens_per_s']:.1f} tok/s ({s['ms_per_token']:.2f} ms/token, spread "
              f"{100 * s['spread']:.0f}%)", file=sys.stderr, flush=True)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

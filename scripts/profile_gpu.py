"""Where decode and prefill time goes on a GPU (MLX's CUDA backend): a profiling script, not a test.

    bash scripts/bench_gpu.sh exec python3 scripts/profile_gpu.py [decode|prefill|graph|sweep] ...

decode:  greedy decode tok/s, engines alternating sample by sample: ours_compiled (decode.py),
         mlx-lm, and `fused_qkv` (a prototype step with the q/k/v and gate/up weights concatenated,
         the KV-visibility mask built once per step, RoPE applied to q and k in one call).
prefill: ours vs mlx-lm prefill at 38..2048 tokens, 15 alternating samples each.
graph:   primitives in one prefill and one decode graph, ours vs mlx-lm (mx.export_to_dot).
sweep:   decode and prefill in subprocesses under MLX_MAX_OPS_PER_BUFFER = 20 (default), 50, 100, two rounds
         (MLX's CUDA backend commits a CUDA graph every that many primitives).
"""
import io
import os
import re
import subprocess
import sys
import time
from collections import Counter

import mlx.core as mx
import numpy as np

from mlx_tinyllama import cuda_attention, fast, sources
from mlx_tinyllama.bench.engines import mlx_lm_engine, mlx_lm_model, ours_compiled_engine, ours_engine
from mlx_tinyllama.ops import _swiglu

SPEC = os.environ.get("PROFILE_SPEC", "synthetic:tinyllama")
DTYPE = os.environ.get("PROFILE_DTYPE", "float16")


def fused_qkv_step(lm, capacity):
    """A prototype decode step on concatenated weights (same math as the model's fused path)."""
    cfg, m = lm.config, lm.model
    H, KV, D, I = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size
    eps, scale, freqs = cfg.rms_norm_eps, cfg.attn_scale, m._rope.freqs
    layers = []
    for L in m.layers:
        a, p = L.self_attn, L.mlp
        wqkv = mx.concatenate([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], 0)
        wgu = mx.concatenate([p.gate_proj.weight, p.up_proj.weight], 0)
        layers.append((L.input_layernorm.weight, wqkv, a.o_proj.weight, L.post_attention_layernorm.weight, wgu,
                       p.down_proj.weight))
    mx.eval(layers)
    head = m.model.embed_tokens.as_linear if cfg.tie_word_embeddings else m.lm_head

    def step(token, position, keys, values):
        x = m.model.embed_tokens(token)
        visible = (mx.arange(capacity) <= position).reshape(1, 1, 1, capacity)
        nk, nv = [], []
        for (n1, wqkv, wo, n2, wgu, wd), K, V in zip(layers, keys, values):
            h = mx.fast.rms_norm(x, n1, eps)
            qkv = (h @ wqkv.T).reshape(1, 1, H + 2 * KV, D).transpose(0, 2, 1, 3)
            qk = mx.fast.rope(qkv[:, :H + KV], D, traditional=False, base=None, scale=1.0, offset=position,
                              freqs=freqs)
            K = mx.slice_update(K, qk[:, H:], position.reshape(1), axes=(2,))
            V = mx.slice_update(V, qkv[:, H + KV:], position.reshape(1), axes=(2,))
            if cuda_attention.available():
                ctx = cuda_attention.masked_decode_attention(qk[:, :H], K, V, scale, visible)
            else:
                ctx = mx.fast.scaled_dot_product_attention(qk[:, :H], K, V, scale=scale, mask=visible)
            x = x + ctx.transpose(0, 2, 1, 3).reshape(1, 1, -1) @ wo.T
            gu = mx.fast.rms_norm(x, n2, eps) @ wgu.T
            x = x + _swiglu(gu[..., :I], gu[..., I:]) @ wd.T
            nk.append(K)
            nv.append(V)
        return head(mx.fast.rms_norm(x, m.model.norm.weight, eps)), nk, nv

    compiled = mx.compile(step)

    class Cache:
        def __init__(self):
            shape = (1, KV, capacity, D)
            dt = m.model.norm.weight.dtype
            self.k = [mx.zeros(shape, dt) for _ in layers]
            self.v = [mx.zeros(shape, dt) for _ in layers]
            self.pos = 0

    def run(ids, cache):
        if ids.shape[1] > 1:  # prefill eagerly token by token is slow; one step per token is fine for 38
            for t in range(ids.shape[1]):
                logits = run(ids[:, t:t + 1], cache)
            return logits
        logits, cache.k, cache.v = compiled(ids, mx.array(cache.pos, mx.int32), cache.k, cache.v)
        cache.pos += 1
        return logits

    return run, Cache


def decode(lm, n=128, repeats=5, context=38):
    ctx = mx.array([[3 + (i * 7919) % 31990 for i in range(context)]])
    engines = [ours_compiled_engine(lm, context + n + 1), mlx_lm_engine(lm), ours_engine(lm)]
    run, Cache = fused_qkv_step(lm, context + n + 1)
    times = {e.name: [] for e in engines}
    times["fused_qkv"] = []
    toks = {}
    for r in range(repeats + 1):
        for e in engines:
            t = e.decode(ctx, n)
            if r:
                times[e.name].append(t)
            toks[e.name] = e.tokens
        c = Cache()
        first = fast.next_token(run(ctx, c))
        mx.eval(first)
        mx.synchronize()
        t0 = time.perf_counter()
        out = fast.greedy_decode(run, c, first, n)
        t = time.perf_counter() - t0
        if r:
            times["fused_qkv"].append(t)
        toks["fused_qkv"] = out
    for name, ts in times.items():
        med = float(np.median(ts))
        agree = np.mean(np.array(toks[name]) == np.array(toks["ours_compiled"]))
        print(f"decode {name:14s} {n / med:8.1f} tok/s  (min {n / max(ts):.1f} max {n / min(ts):.1f})"
              f"  tokens agree with ours_compiled: {agree:.2f}", flush=True)


def prefill(lm, lengths=(38, 128, 512, 2048), repeats=15):
    engines = [ours_engine(lm), mlx_lm_engine(lm)]
    for T in lengths:
        ids = mx.array([[3 + (i * 7919) % 31990 for i in range(T)]])
        ts = {e.name: [] for e in engines}
        for r in range(repeats + 2):
            for e in (engines if r % 2 else engines[::-1]):  # alternate who goes first
                t = e.prefill(ids)
                if r >= 2:
                    ts[e.name].append(t)
        o, m = np.median(ts["ours"]), np.median(ts["mlx_lm"])
        print(f"prefill T={T:5d} ours {T / o:9.0f} tok/s  mlx-lm {T / m:9.0f} tok/s  ratio {m / o:.3f}"
              f"  (min-time ratio {min(ts['mlx_lm']) / min(ts['ours']):.3f})", flush=True)


def count(*outs):
    f = io.StringIO()
    mx.export_to_dot(f, *outs)
    return Counter(p.split()[0] for p in re.findall(r'label ="([^"]+)"', f.getvalue()))


def graph(lm):
    other = mlx_lm_model(lm)
    ids = mx.array([list(range(100, 228))])
    for name, model in (("ours", lm.model), ("mlx-lm", other)):
        c = count(model(ids, cache=lm.model.make_cache()))
        print(f"graph prefill {name}: {sum(c.values())} nodes {dict(c.most_common())}", flush=True)


def sweep():
    for round_ in range(2):  # two rounds, alternating: the machine's speed drifts between subprocesses
        for n in (20, 50, 100):
            env = dict(os.environ, MLX_MAX_OPS_PER_BUFFER=str(n))
            print(f"--- round {round_ + 1}, MLX_MAX_OPS_PER_BUFFER={n}", flush=True)
            subprocess.run([sys.executable, __file__, "decode-short", "prefill-short"], env=env, timeout=150)


if __name__ == "__main__":
    what = sys.argv[1:] or ["graph", "decode", "prefill"]
    print("device", mx.default_device(), "MLX_MAX_OPS_PER_BUFFER", os.environ.get("MLX_MAX_OPS_PER_BUFFER"))
    lm = sources.load(SPEC, DTYPE)
    for w in what:
        t0 = time.perf_counter()
        if w == "decode":
            decode(lm)
        elif w == "decode-short":
            decode(lm, n=64, repeats=3)
        elif w == "prefill":
            prefill(lm)
        elif w == "prefill-short":
            prefill(lm, lengths=(38, 512), repeats=7)
        elif w == "graph":
            graph(lm)
        elif w == "sweep":
            sweep()
        print(f"[{w}: {time.perf_counter() - t0:.0f} s]", flush=True)

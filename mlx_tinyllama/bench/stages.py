"""Per-stage cost: each stage kind timed in isolation (the model's own sub-modules on
random inputs of the right shape), against the whole forward pass."""

from __future__ import annotations

import statistics
import time

import mlx.core as mx

from ..taps import NO_TAPS
from .timing import Settings, progress, synthetic_ids


STAGE_KINDS = ("embed", "norm", "attention", "mlp", "residual", "lm_head")


# --- per-stage cost ----------------------------------------------------------------------

STAGE_METHOD = (
    "Each stage kind is timed in isolation: for every layer, the model's own sub-module "
    "(attention with its KV cache, MLP) or op (RMSNorm, residual add) runs on a random input "
    "of the right shape and dtype, all layers in one evaluated graph, median of the repeats; "
    "decode attention reads a KV cache holding `context` positions. The sum of the parts is "
    "compared with the whole forward pass timed the same way (coverage = sum / whole); the "
    "difference is what fusion across stages and scheduling gain or lose."
)


def _random(shape, dtype, seed) -> mx.array:
    return mx.random.normal(shape, key=mx.random.key(seed)).astype(dtype)


def _filled_caches(lm, context: int, dtype) -> list:
    cfg = lm.config
    caches = lm.model.make_cache()
    for i, c in enumerate(caches):
        shape = (1, cfg.num_key_value_heads, context, cfg.head_dim)
        c.update_and_fetch(_random(shape, dtype, 2 * i), _random(shape, dtype, 2 * i + 1))
    mx.eval([c.state for c in caches])
    return caches


def stage_graphs(lm, T: int, context: int) -> tuple[dict, list | None]:
    """({stage kind -> a function building the outputs of that kind for every layer}, the
    KV caches filled with `context` positions or None): T query tokens after `context`."""
    model, cfg = lm.model, lm.config
    ops, dt = model.ops, lm.model.model.norm.weight.dtype
    x = _random((1, T, cfg.hidden_size), dt, 7)
    ids = synthetic_ids(T, cfg.vocab_size, 0)
    layers = model.model.layers
    caches = _filled_caches(lm, context, dt) if context else None

    def attention():
        outs = []
        for i, layer in enumerate(layers):
            cache = caches[i] if caches else model.make_cache()[0]
            outs.append(layer.self_attn(x, ops, model._rope, cache, NO_TAPS, layer.prefix))
            if caches:
                cache.offset = context  # the next sample writes the same slot again
        return outs

    head = model.model.embed_tokens.as_linear if cfg.tie_word_embeddings else model.lm_head
    return {
        "embed": lambda: [model.model.embed_tokens(ids)],
        "norm": lambda: [ops.rms_norm(x, w, cfg.rms_norm_eps) for layer in layers
                         for w in (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)]
        + [ops.rms_norm(x, model.model.norm.weight, cfg.rms_norm_eps)],
        "attention": attention,
        "mlp": lambda: [layer.mlp(x, ops, NO_TAPS, layer.prefix) for layer in layers],
        "residual": lambda: [x + x * (k + 1) for k in range(2 * len(layers))],
        "lm_head": lambda: [head(x)],
    }, caches


def time_graph(build, repeats: int, warmup: int) -> list[float]:
    times = []
    for k in range(warmup + repeats):
        mx.synchronize()
        t0 = time.perf_counter()
        mx.eval(build())
        if k >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def whole_forward(lm, T: int, context: int):
    """One forward pass of T tokens after `context` cached positions, taps off."""
    cfg = lm.config
    ids = synthetic_ids(T, cfg.vocab_size, 1)
    caches = _filled_caches(lm, context, lm.model.model.norm.weight.dtype) if context else None

    def build():
        cache = caches if caches else lm.model.make_cache()
        out = lm.model(ids, cache=cache)
        if caches:
            for c in caches:
                c.offset = context
        return out

    return build


def stages_section(lm, s: Settings) -> dict:
    T = s.tap_prompt_length or s.prompt_lengths[0]
    out = {"method": STAGE_METHOD}
    for phase, tokens, context in (("prefill", T, 0), ("decode", 1, s.decode_context)):
        graphs, _ = stage_graphs(lm, tokens, context)
        kinds = {k: statistics.median(time_graph(graphs[k], s.repeats, s.warmup)) for k in STAGE_KINDS}
        whole = statistics.median(time_graph(whole_forward(lm, tokens, context), s.repeats, s.warmup))
        parts = sum(kinds.values())
        out[phase] = {
            "tokens": tokens, "context": context,
            "kinds": {k: {"seconds": v, "share_of_parts": v / parts} for k, v in kinds.items()},
            "sum_of_parts_s": parts, "whole_forward_s": whole, "coverage": parts / whole,
        }
        top = max(kinds, key=kinds.get)
        progress(f"stages ({phase}): {top} {100 * kinds[top] / parts:.0f}% of the parts, coverage {parts / whole:.2f}")
    return out

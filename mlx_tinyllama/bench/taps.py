"""What recording taps costs: prefill and decode with taps off, stats of every stage,
and full tensors of one layer."""

from __future__ import annotations

import time

import mlx.core as mx

from .. import fast
from ..taps import NO_TAPS, LAYER_STAGES, Taps, select, tap_names
from .timing import Settings, alternate, progress, summarize, synthetic_ids
from .engines import MLXEngine


# --- tap overhead ------------------------------------------------------------------------

TAP_MODES = ("off", "stats_all", "full_layer")


def tap_recorder(mode: str, n_layers: int, layer: int):
    if mode == "off":
        return None
    if mode == "stats_all":
        return Taps(tap_names(n_layers), "stats")
    return Taps(select([f"layers.{layer}.*"], n_layers), "full")


def collect(taps) -> None:
    """What a user of the taps waits for: stats on the host, or the full tensors evaluated."""
    if taps is None:
        return
    if taps.mode == "stats":
        taps.stats()
    else:
        mx.eval(list(taps.tensors.values()))


def tapped_prefill(model, ids: mx.array, mode: str, layer: int) -> float:
    taps = tap_recorder(mode, model.config.num_hidden_layers, layer)
    cache = model.make_cache()
    mx.synchronize()
    t0 = time.perf_counter()
    logits = model(ids, cache=cache, tap=taps or NO_TAPS)
    mx.eval(logits)
    collect(taps)
    return time.perf_counter() - t0


def tapped_decode(model, context: mx.array, n: int, mode: str, layer: int) -> float:
    """N greedy steps, each recorded with fresh taps; pipelined like the taps-off
    loop: step k's taps are read back after step k+1 is queued."""
    if mode == "off":
        engine = MLXEngine("ours", model, model.make_cache)
        return engine.decode(context, n)
    cache = model.make_cache()
    token = fast.next_token(fast.prefill(fast.model_step(model), context, cache))
    mx.eval(token)
    n_layers = model.config.num_hidden_layers
    mx.synchronize()
    t0 = time.perf_counter()
    previous = None
    for _ in range(n):
        taps = tap_recorder(mode, n_layers, layer)
        token = fast.next_token(model(token, cache=cache, tap=taps))
        mx.async_eval(token)
        collect(previous)
        previous = taps
    collect(previous)
    token.item()
    return time.perf_counter() - t0


def tap_overhead_section(lm, s: Settings) -> dict:
    cfg, model = lm.config, lm.model
    T = s.tap_prompt_length or s.prompt_lengths[0]
    ids = synthetic_ids(T, cfg.vocab_size, s.seed)
    context = synthetic_ids(s.decode_context, cfg.vocab_size, s.seed)
    n = s.tap_decode_tokens
    out = {"prefill_tokens": T, "decode_context": s.decode_context, "decode_tokens": n,
           "full_layer": s.tap_layer, "stats_taps": len(tap_names(cfg.num_hidden_layers)),
           "full_taps": len(LAYER_STAGES)}
    for phase, run, work in (("prefill", lambda m: tapped_prefill(model, ids, m, s.tap_layer), T),
                             ("decode", lambda m: tapped_decode(model, context, n, m, s.tap_layer), n)):
        times = alternate({m: (lambda m=m: run(m)) for m in TAP_MODES}, s.repeats, s.warmup)
        modes = {m: summarize(times[m], work) for m in TAP_MODES}
        off = modes["off"]["median_s"]
        out[phase] = {"modes": modes, "ratios": {m: modes[m]["median_s"] / off for m in TAP_MODES if m != "off"}}
        progress(f"tap overhead ({phase}): " + ", ".join(f"{m} x{r:.2f}" for m, r in out[phase]["ratios"].items()))
    return out

"""How a measurement is taken: the settings, samples timed with a host clock, and their summary.

Method (docs/benchmarks.md says more):
- Every measurement is one *sample* timed with a host clock around work that
  ends in `mx.eval` / `.item()` (MLX is lazy: nothing runs before that), after
  `warmup` untimed samples. Engines alternate sample by sample (ours, mlx-lm,
  ours, ...) so a machine that slows down mid-run hurts both alike. We report
  the median, min, max and the relative spread (max - min) / median.
- Prefill: a fresh KV cache, one forward pass over T synthetic token ids, the
  whole logits array evaluated. tokens/s = T / median time.
- Decode: prefill `decode_context` tokens (untimed), then N greedy steps
  through the KV cache, pipelined with async_eval (fast.greedy_decode, the loop
  mlx-lm's generate uses). tokens/s = N / median time. Decode reads every
  weight once per token (the embedding only one row), so
  achieved weight bandwidth = weight bytes per token x tokens/s.
- mlx-lm's `llama.Model` is built from the same config and loaded with the very
  same weight arrays (no copy), in the same process.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from ..errors import UserError


@dataclass
class Settings:
    prompt_lengths: list[int] = field(default_factory=lambda: [38, 128, 512, 2048])
    decode_tokens: int = 64
    decode_context: int = 38
    repeats: int = 5
    warmup: int = 1
    seed: int = 0
    tap_layer: int = 0
    tap_prompt_length: int | None = None  # default: the first prompt length
    tap_decode_tokens: int = 16  # stats on every stage cost a host read per tap per step
    with_mlx_lm: bool = True
    with_transformers: bool = False
    tap_overhead: bool = True
    stages: bool = True
    peak_bandwidth_gbs: float | None = None


def parse_lengths(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--prompt-lengths takes comma-separated integers, e.g. 38,128,512; got {text!r}") from None
    if not values:
        raise UserError("--prompt-lengths is empty")
    return values


def validate(s: Settings, cfg=None) -> None:
    """Bad numbers -> UserError (exit 2) before any time is spent. Without `cfg`
    only the checks that need no model run."""
    for name in ("decode_tokens", "repeats", "decode_context", "tap_decode_tokens"):
        if getattr(s, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(s, name)})")
    if s.warmup < 0:
        raise UserError(f"--warmup must be 0 or more (got {s.warmup})")
    lengths = s.prompt_lengths + ([s.tap_prompt_length] if s.tap_prompt_length is not None else [])
    for t in lengths:
        if t < 1:
            raise UserError(f"prompt length {t} must be at least 1")
    if s.peak_bandwidth_gbs is not None and not s.peak_bandwidth_gbs > 0:
        raise UserError("--peak-bandwidth must be a positive number of GB/s")
    if cfg is None:
        return
    limit = cfg.max_position_embeddings
    for t in lengths:
        if t > limit:
            raise UserError(f"prompt length {t} is beyond the model's context (max_position_embeddings={limit})")
    if s.decode_context + max(s.decode_tokens, s.tap_decode_tokens) > limit:
        raise UserError(
            f"--decode-context {s.decode_context} + --decode-tokens {s.decode_tokens} (or --tap-decode-tokens "
            f"{s.tap_decode_tokens}) is beyond the model's "
            f"context (max_position_embeddings={limit})"
        )
    if not 0 <= s.tap_layer < cfg.num_hidden_layers:
        raise UserError(f"--tap-layer {s.tap_layer} is not a layer (0..{cfg.num_hidden_layers - 1})")


# --- samples and their summary ------------------------------------------------


def summarize(times: list[float], work: int) -> dict:
    """Times of one measurement -> median, spread and work/second (work = tokens)."""
    med = statistics.median(times)
    return {
        "samples_s": times,
        "median_s": med,
        "min_s": min(times),
        "max_s": max(times),
        "spread": (max(times) - min(times)) / med,
        "tokens_per_s": work / med,
        "ms_per_token": 1e3 * med / work,
    }


def alternate(runners: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Call each runner (name -> () -> seconds) `warmup` times, then `repeats`
    times in turn (a, b, a, b, ...). Returns name -> timed samples."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            times[name].append(run())
    return times


def synthetic_ids(n: int, vocab: int, seed: int) -> mx.array:
    """[1, n] token ids drawn uniformly (ids 0..2 are special tokens: skipped)."""
    rng = np.random.default_rng(seed + n)
    return mx.array(rng.integers(3, vocab, size=(1, n)).astype(np.int32))


# --- the sections ---------------------------------------------------------------------


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)

"""One extra forward pass for the report: every stage's statistics and the attention
probabilities of the chosen layers and heads."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from ..taps import Taps, split_name, tap_names


DEFAULT_ATTENTION_HEADS = (0, 1)


def parse_int_list(text: str | None, option: str) -> list[int] | None:
    if text is None:
        return None
    items = [t for t in re.split(r"[,\s]+", text.strip()) if t]
    try:
        values = [int(t) for t in items]
    except ValueError:
        raise UserError(f"{option}: expected comma-separated integers like 0,1, got {text!r}") from None
    if not values:
        raise UserError(f"{option}: no values given")
    return values


# ---------------------------------------------------------------------------
# Observation: one extra forward pass for magnitudes and attention maps


class _BothTaps:
    """Feeds one forward pass to two recorders: stats of every stage, full tensors of a few."""

    enabled = True

    def __init__(self, stats: Taps, full: Taps):
        self.stats, self.full = stats, full

    def wants(self, name: str) -> bool:
        return self.stats.wants(name) or self.full.wants(name)

    def __call__(self, name, x):
        self.full(name, x)
        return self.stats(name, x)


@dataclass
class Observation:
    stats: dict[str, dict]
    probs: dict[int, np.ndarray]  # layer -> [H, T, S] float32
    last_logits: object  # mx.array [V]


def observe(lm, ids: list[int], attention_layers: list[int]) -> Observation:
    """Every stage's stats and the attention probabilities of `attention_layers`, in one prefill."""
    import mlx.core as mx

    lm.config.check_ids(ids)
    n = lm.config.num_hidden_layers
    stats = Taps(tap_names(n), "stats")
    full = Taps([f"layers.{i}.attn.probs" for i in attention_layers], "full")
    logits = lm.model(mx.array(ids), tap=_BothTaps(stats, full))
    mx.eval(logits)
    probs = {}
    for name, t in full.tensors.items():
        probs[split_name(name)[0]] = np.array(t.astype(mx.float32))
    return Observation(stats.stats(), probs, logits[0, -1])


def choose(values: list[int] | None, default: list[int], limit: int, what: str) -> list[int]:
    chosen = list(dict.fromkeys(values if values is not None else default))
    bad = [v for v in chosen if not 0 <= v < limit]
    if bad:
        raise UserError(f"{what} {bad[0]} does not exist: the model has {limit} (0..{limit - 1})")
    return chosen

"""Loop-level speed for the taps-off path: what a decode loop does around the
model call, independent of the bench and generate commands.

The model's numbers are not touched here: every helper calls the same
`model(ids, cache)` with taps off. What changes is how the host drives it:
- `greedy_decode` pipelines the steps with `mx.async_eval`: step k+1's graph is
  built (Python, ~1 ms for 22 layers) while step k runs on the device, so the
  device never waits for Python. Only the token ids are synchronised, one step
  behind, exactly as mlx-lm's `generate_step` does.
- `prefill` evaluates the whole logits array once, with no per-layer sync.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx


# A forward call with the KV cache: ids [1, T] -> logits [1, T, vocab].
Step = Callable[[mx.array, list | None], mx.array]


def prefill(step: Step, ids: mx.array, cache: list | None) -> mx.array:
    """One forward pass over `ids` [1, T]; returns the evaluated logits [1, T, V]."""
    logits = step(ids, cache)
    mx.eval(logits)
    return logits


def next_token(logits: mx.array) -> mx.array:
    """Greedy choice at the last position, shaped [1, 1] to feed the next step."""
    return mx.argmax(logits[:, -1, :], axis=-1).reshape(1, 1)


def greedy_decode(step: Step, cache: list, first: mx.array, n: int) -> list[int]:
    """`n` greedy steps through `cache`, starting from token `first` [1, 1].

    Pipelined: the graph of step k+1 is submitted (async_eval) before step k's
    token is read back. Returns the n generated ids (the last one included).
    """
    if n < 1:
        raise ValueError("n must be at least 1")
    out: list[int] = []
    token = next_token(step(first, cache))
    mx.async_eval(token)
    for _ in range(n - 1):
        following = next_token(step(token, cache))
        mx.async_eval(following)
        out.append(token.item())  # waits for step k only; step k+1 is already queued
        token = following
    out.append(token.item())
    return out


def synced_decode(step: Step, cache: list, first: mx.array, n: int) -> list[int]:
    """The naive loop (eval and read back each token before building the next
    step): kept to measure what pipelining buys."""
    out: list[int] = []
    token = first
    for _ in range(n):
        token = next_token(step(token, cache))
        mx.eval(token)
        out.append(token.item())
    return out


def model_step(model) -> Step:
    """Adapt an MLX LM (ours or mlx-lm's) to `Step`: both take (ids [1, T], cache)."""

    def step(ids: mx.array, cache: list | None) -> mx.array:
        return model(ids, cache=cache)

    return step

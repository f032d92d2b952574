"""Loop-level speed for the taps-off path: what a decode loop does around the
model call, independent of the bench and generate commands.

The model's numbers are not touched here: every helper calls the same
`model(ids, cache)` with taps off. What changes is how the host drives it:
- `greedy_decode` pipelines the steps with `mx.async_eval`: step k+1's graph is
  built (Python, ~1 ms for 22 layers) while step k runs on the device, so the
  device never waits for Python. Only the token ids are synchronised, one step
  behind, exactly as mlx-lm's `generate_step` does.
- `prefill` evaluates the whole logits array once, with no per-layer sync.

`FastOps` is a proposal for ops.py, measured by `bench --fast-ops`: the same
arithmetic in fewer kernel launches (a compiled SiLU, RoPE frequencies divided
once instead of twice per layer and step). Its logits are bit-identical to
`Ops`' (tests/test_bench.py checks fp32 and fp16). Launches matter on a GPU,
where a TinyLlama decode step is ~300 small kernels.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import mlx.core as mx

from .ops import Ops

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


@partial(mx.compile, shapeless=True)
def _compiled_silu(x: mx.array) -> mx.array:
    return x * mx.sigmoid(x)  # Ops.silu's expression, fused into one kernel


class FastOps(Ops):
    """`Ops` (fused kernels, "hf" policy) with fewer launches per step."""

    def silu(self, x: mx.array) -> mx.array:
        return _compiled_silu(x)

    def rope(self, x: mx.array, offset: int, inv_freq: mx.array, position_scale: float) -> mx.array:
        return mx.fast.rope(x, x.shape[-1], traditional=False, base=None, scale=position_scale,
                            offset=offset, freqs=_frequencies(inv_freq))


_FREQUENCIES: dict[int, tuple[mx.array, mx.array]] = {}


def _frequencies(inv_freq: mx.array) -> mx.array:
    """1 / inv_freq, computed once per model (Ops.rope divides on every call)."""
    hit = _FREQUENCIES.get(id(inv_freq))
    if hit is None or hit[0] is not inv_freq:
        hit = _FREQUENCIES[id(inv_freq)] = (inv_freq, 1.0 / inv_freq)
        mx.eval(hit[1])
    return hit[1]


def accelerate(model) -> None:
    """Swap in FastOps where the model runs fused "hf" kernels (the only fast path)."""
    if model.ops.fused and type(model.ops) is Ops:
        model.ops = FastOps(model.ops.policy, model.ops.kernels)

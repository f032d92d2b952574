"""Compiled decode: one `mx.compile`d function per decode step over a fixed-capacity KV cache.

The eager decode step rebuilds a graph of ~400 ops per token in Python and
grows the cache by concatenation, so every step has new shapes. Here every
layer's keys and values live in a buffer preallocated at [1, n_kv, capacity,
head_dim]; a step writes its row with a slice update at `position`, which is an
*input array* of the compiled function, and attends over the whole capacity
with a mask that hides the slots not yet written (> position). Shapes never
change from step to step, so the function is traced and compiled once and each
step only launches the compiled graph.

The prefill (T > 1 tokens) runs eagerly through the same buffers (offset is a
plain int there, attention sees exactly the positions written so far): it is
the same code path as the uncompiled model. Taps need the eager path (a tap is a
Python call per stage); `generate` uses this module only when no tap is
selected. On a GPU the step also runs q/k/v and gate/up as one matmul each, on
concatenated weights (`concatenate_projections`): the step is bound by kernel
launches there, and this removes three of a layer's seven matmuls. The numbers
are the model's own (`TinyLlama.__call__` with its Ops): only the key/value storage and the masking of unwritten slots differ, which can
change the last bits of the attention's reductions, not which keys it reads.
"""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn

from .model import joined_weight
from .taps import NO_TAPS, Taps


class FixedKVCache:
    """A layer's keys and values in buffers of fixed capacity (a drop-in for mlx-lm's
    KVCache in the model: `offset`, `update_and_fetch`, and `mask`).

    Eager use (offset an int): a step of T tokens writes rows offset..offset+T-1 and
    gets back the rows 0..offset+T-1, like KVCache. Inside the compiled step (offset
    a scalar array) it gets back the whole buffer, with `mask` [1, 1, 1, capacity] (True:
    a written position) for the attention."""

    def __init__(self, keys: mx.array, values: mx.array, offset=0, mask: mx.array | None = None, window: int = 0):
        self.keys, self.values, self.offset = keys, values, offset
        self.mask = mask  # the compiled step builds it once for all layers
        self.window = window  # the model's sliding window (0: none), for a mask built here

    @classmethod
    def empty(cls, n_kv: int, capacity: int, head_dim: int, dtype: mx.Dtype, window: int = 0) -> "FixedKVCache":
        shape = (1, n_kv, capacity, head_dim)
        return cls(mx.zeros(shape, dtype), mx.zeros(shape, dtype), window=window)

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @property
    def state(self):
        return self.keys, self.values

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        if isinstance(self.offset, mx.array):  # compiled step: position is data, shapes are fixed
            start = self.offset.reshape(1)
            self.keys = mx.slice_update(self.keys, keys.astype(self.keys.dtype), start, axes=(2,))
            self.values = mx.slice_update(self.values, values.astype(self.values.dtype), start, axes=(2,))
            if self.mask is None:
                self.mask = visible_slots(self.capacity, self.offset + keys.shape[2] - 1, self.window)
            return self.keys, self.values
        end = self.offset + keys.shape[2]
        if end > self.capacity:
            raise ValueError(f"fixed KV cache holds {self.capacity} positions, a step needs {end}")
        self.keys[:, :, self.offset:end] = keys
        self.values[:, :, self.offset:end] = values
        self.offset = end
        return self.keys[:, :, :end], self.values[:, :, :end]


def visible_slots(capacity: int, last: mx.array, window: int = 0) -> mx.array:
    """[1, 1, 1, capacity] booleans, True for the slots 0..last (and, with a sliding window, only
    the last `window` of them): broadcasts against the scores [B, H, T, S] in every SDPA kernel."""
    slots = mx.arange(capacity)
    seen = slots <= last
    if window:
        seen = seen & (slots > last - window)
    return seen.reshape(1, 1, 1, -1)


def make_cache(model, capacity: int) -> list[FixedKVCache]:
    """One empty FixedKVCache per layer, in the model's parameter dtype."""
    cfg = model.config
    dtype = model.model.norm.weight.dtype
    return [FixedKVCache.empty(cfg.num_key_value_heads, capacity, cfg.head_dim, dtype, cfg.window)
            for _ in model.layers]


def concatenate_projections(model) -> bool:
    """Give every layer its [Wq; Wk; Wv] and [Wg; Wu] as one weight each, for `Ops(projections=
    "concatenated")`: a GPU decode step is bound by kernel launches, and this is two matmuls
    per layer instead of five. The separate weights become row views of the concatenated ones
    (no copy: memory stays as it was, and every other path reads the very same values).
    Returns False, changing nothing, when the linear layers are not plain bias-free nn.Linear
    (the CPU's fp32-GEMM copies of half weights, ops.Fp32GemmLinear, where launches cost nothing)."""
    linears = [m for layer in model.layers for m in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                      layer.self_attn.v_proj, layer.mlp.gate_proj, layer.mlp.up_proj)]
    if any(type(m) is not nn.Linear or "bias" in m for m in linears):
        return False
    for layer in model.layers:
        a, mlp = layer.self_attn, layer.mlp
        for owner, attr, group in ((a, "_qkv", (a.q_proj, a.k_proj, a.v_proj)),
                                   (mlp, "_gate_up", (mlp.gate_proj, mlp.up_proj))):
            if joined_weight(getattr(owner, attr), group) is not None:
                continue  # joined already, and its views are still the weights
            joined = mx.concatenate([m.weight for m in group], axis=0)
            mx.eval(joined)  # one layer at a time: no model-sized lazy graph
            start = 0
            for m in group:
                rows = m.weight.shape[0]
                m.weight = joined[start:start + rows]
                start += rows
            mx.eval([m.weight for m in group])  # row slices of the joined buffer: views, the old arrays freed
            setattr(owner, attr, (joined, tuple(m.weight for m in group)))
    return True


class CompiledDecoder:
    """`decoder(ids [1, T], cache) -> logits [1, T, V]` over FixedKVCaches: eager for the
    prefill (T > 1), one compiled function for each single-token step. The compiled
    function closes over the model's weights (constants of the graph) and over its Ops
    as they are when first called; build a new decoder after changing either.

    `tap_names` (for the paths check, not for speed): the compiled function also
    returns the full tensors of those taps, as outputs of the same graph; after each
    single-token step they are in `last_taps` (batch dimension dropped)."""

    def __init__(self, model, tap_names=(), concatenate: bool | None = None):
        self.model = model
        self.tap_names = list(tap_names)
        if concatenate is None:  # where launches bound a step; on the CPU a step is matmul-bound
            concatenate = mx.default_device().type == mx.gpu
        self.concatenated = concatenate and concatenate_projections(model)
        self._compiled = mx.compile(self._step)
        self.steps = 0  # single-token steps run compiled
        self.last_taps: dict[str, mx.array] = {}

    def _step(self, token: mx.array, position: mx.array, keys: list, values: list):
        # one per step, not one per layer: fewer kernels
        mask = visible_slots(keys[0].shape[2], position, self.model.config.window)
        caches = [FixedKVCache(k, v, position, mask) for k, v in zip(keys, values)]
        taps = Taps(self.tap_names, "full") if self.tap_names else NO_TAPS
        ops = replace(self.model.ops, projections="concatenated") if self.concatenated else self.model.ops
        logits = self.model(token, cache=caches, tap=taps, ops=ops)
        tensors = dict(taps.tensors) if self.tap_names else {}
        return logits, [c.keys for c in caches], [c.values for c in caches], tensors

    def make_cache(self, capacity: int) -> list[FixedKVCache]:
        return make_cache(self.model, capacity)

    def __call__(self, ids: mx.array, cache: list[FixedKVCache]) -> mx.array:
        if ids.ndim == 1:
            ids = ids[None]
        if ids.shape[1] != 1:
            return self.model(ids, cache=cache)
        position = cache[0].offset
        if position >= cache[0].capacity:
            raise ValueError(f"fixed KV cache holds {cache[0].capacity} positions, the step is at {position}")
        logits, keys, values, self.last_taps = self._compiled(ids, mx.array(position, mx.int32),
                                                              [c.keys for c in cache], [c.values for c in cache])
        for c, k, v in zip(cache, keys, values):
            c.keys, c.values, c.offset = k, v, position + 1
        self.steps += 1
        return logits

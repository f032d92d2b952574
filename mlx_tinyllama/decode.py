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
selected. The numbers are the model's own (`TinyLlama.__call__` with its Ops):
only the key/value storage and the masking of unwritten slots differ, which can
change the last bits of the attention's reductions, not which keys it reads.
"""

from __future__ import annotations

import mlx.core as mx

from .taps import NO_TAPS, Taps


class FixedKVCache:
    """A layer's keys and values in buffers of fixed capacity (a drop-in for mlx-lm's
    KVCache in the model: `offset`, `update_and_fetch`, and `mask`).

    Eager use (offset an int): a step of T tokens writes rows offset..offset+T-1 and
    gets back the rows 0..offset+T-1, like KVCache. Inside the compiled step (offset
    a scalar array) it gets back the whole buffer, with `mask` [1, 1, 1, capacity] (True:
    a written position) for the attention."""

    def __init__(self, keys: mx.array, values: mx.array, offset=0):
        self.keys, self.values, self.offset = keys, values, offset
        self.mask = None

    @classmethod
    def empty(cls, n_kv: int, capacity: int, head_dim: int, dtype: mx.Dtype) -> "FixedKVCache":
        shape = (1, n_kv, capacity, head_dim)
        return cls(mx.zeros(shape, dtype), mx.zeros(shape, dtype))

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
            # [1, 1, 1, capacity]: broadcasts against the scores [B, H, T, S] in every SDPA kernel
            self.mask = (mx.arange(self.capacity) <= self.offset + keys.shape[2] - 1).reshape(1, 1, 1, -1)
            return self.keys, self.values
        end = self.offset + keys.shape[2]
        if end > self.capacity:
            raise ValueError(f"fixed KV cache holds {self.capacity} positions, a step needs {end}")
        self.keys[:, :, self.offset:end] = keys
        self.values[:, :, self.offset:end] = values
        self.offset = end
        return self.keys[:, :, :end], self.values[:, :, :end]


def make_cache(model, capacity: int) -> list[FixedKVCache]:
    """One empty FixedKVCache per layer, in the model's parameter dtype."""
    cfg = model.config
    dtype = model.model.norm.weight.dtype
    return [FixedKVCache.empty(cfg.num_key_value_heads, capacity, cfg.head_dim, dtype) for _ in model.layers]


class CompiledDecoder:
    """`decoder(ids [1, T], cache) -> logits [1, T, V]` over FixedKVCaches: eager for the
    prefill (T > 1), one compiled function for each single-token step. The compiled
    function closes over the model's weights (constants of the graph) and over its Ops
    as they are when first called; build a new decoder after changing either.

    `tap_names` (for the paths check, not for speed): the compiled function also
    returns the full tensors of those taps, as outputs of the same graph; after each
    single-token step they are in `last_taps` (batch dimension dropped)."""

    def __init__(self, model, tap_names=()):
        self.model = model
        self.tap_names = list(tap_names)
        self._compiled = mx.compile(self._step)
        self.steps = 0  # single-token steps run compiled
        self.last_taps: dict[str, mx.array] = {}

    def _step(self, token: mx.array, position: mx.array, keys: list, values: list):
        caches = [FixedKVCache(k, v, position) for k, v in zip(keys, values)]
        taps = Taps(self.tap_names, "full") if self.tap_names else NO_TAPS
        logits = self.model(token, cache=caches, tap=taps)
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

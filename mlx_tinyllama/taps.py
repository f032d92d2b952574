"""The recorder that the forward pass calls at each stage. The stage table is stages.py and
the statistics are tap_stats.py (their public names are importable from here too).

A tap is an identity on the data path: `x = tap("layers.0.attn.q", x)`. With no
tap selected the recorder is `NO_TAPS`, whose call returns its argument and does
nothing else, so instrumentation costs nothing when it is off.
"""

from __future__ import annotations

from typing import Iterable

import mlx.core as mx
import numpy as np

from . import cuda_stats
from .tap_stats import (_device_group, _device_rows, _head, _stats_on_device, batch_stats,  # noqa: F401
                        tensor_stats, to_numpy)
from .stages import (ATTENTION_INTERNALS, GLOBAL_HEAD, GLOBAL_TAIL, LAYER_STAGES, Stage,  # noqa: F401
                     select, split_name, stage_of, tap_names)


# ---------------------------------------------------------------------------
# Recording


class NoTaps:
    """Taps off: an identity that the forward pass calls at every stage."""

    enabled = False

    def __call__(self, name: str, x: mx.array) -> mx.array:
        return x

    def wants(self, name: str) -> bool:
        return False


NO_TAPS = NoTaps()


class Taps:
    """Records the selected stages of one forward call.

    mode="stats": per tap a small dict of statistics; mode="full": the whole
    tensor (batch dimension dropped). `names` are canonical names (use `select`
    to expand globs).

    Where the statistics are computed (all in float64 but the Metal path):
    - CPU: on the host with numpy, reading the buffers in place; one read of each
      tensor in cache-sized float64 blocks (`_moments`) beats ~20 small kernels per
      tap (MLX's CPU reductions are single-threaded);
    - MLX's CUDA backend: one kernel launch per 32 taps, float64 partials merged on
      the host (cuda_stats.py): launches, not reductions, are a GPU's cost;
    - other GPUs (Metal): same-shape taps grouped, a handful of MLX kernels per group
      in float32 (`_device_group`).
    Pending tensors are flushed once they hold `flush_bytes`, which bounds the memory
    they keep alive (the attention scores of long prompts are large).
    """

    enabled = True

    def __init__(self, names: Iterable[str], mode: str = "stats", flush_bytes: int = 1 << 28):
        if mode not in ("stats", "full"):
            raise ValueError(mode)
        self.names = set(names)
        self.mode = mode
        self.flush_bytes = flush_bytes
        self.tensors: dict[str, mx.array] = {}
        self.order: list[str] = []
        self._pending: list[tuple[str, mx.array]] = []
        self._pending_bytes = 0
        self._stats: dict[str, dict] = {}

    def wants(self, name: str) -> bool:
        return name in self.names

    def __call__(self, name: str, x: mx.array) -> mx.array:
        if name in self.names:
            self.order.append(name)
            if self.mode == "full":
                self.tensors[name] = x[0]  # drop the batch dimension
            else:  # kept whole until the flush: a slice per tap is graph-building time on a GPU
                self._pending.append((name, x))
                self._pending_bytes += x.nbytes
                if self._pending_bytes >= self.flush_bytes:
                    self._flush()
        return x

    def _flush(self) -> None:
        if cuda_stats.available():  # every pending tap in one kernel per 32 tensors, one read back
            live = [(n, x) for n, x in self._pending if x.size]
            rows = cuda_stats.batch_stats([x for _, x in live], [stage_of(n).token_axis for n, _ in live],
                                          batched=True)
            self._stats.update((n, dict(_head(x, batched=True), **r)) for (n, x), r in zip(live, rows))
            self._stats.update((n, tensor_stats(x[0], stage_of(n).token_axis)) for n, x in self._pending if not x.size)
            self._pending, self._pending_bytes = [], 0
            return
        self._pending = [(n, x[0]) for n, x in self._pending]  # drop the batch dimension
        mx.eval([v for _, v in self._pending])
        groups: dict[tuple, list[tuple[str, mx.array]]] = {}
        for name, value in self._pending:  # same shape: one vectorised computation for the group
            groups.setdefault((tuple(value.shape), value.dtype, stage_of(name).token_axis), []).append((name, value))
        if _stats_on_device():  # all groups' kernels, then one host read per group
            lazy = {key: _device_group([v for _, v in items], key[2]) for key, items in groups.items()}
            mx.eval(list(lazy.values()))
            for key, items in groups.items():
                floats, counts = lazy[key]
                rows = _device_rows(items[0][1], np.array(floats), np.array(counts))
                self._stats.update(zip([n for n, _ in items], rows))
        else:
            for (_, _, axis), items in groups.items():
                self._stats.update(zip([n for n, _ in items], batch_stats([v for _, v in items], axis)))
        self._pending, self._pending_bytes = [], 0

    def stats(self) -> dict[str, dict]:
        """Name -> stats dict (see `tensor_stats`), in the order the taps fired."""
        if self.mode == "full":
            return {n: tensor_stats(self.tensors[n], stage_of(n).token_axis) for n in self.order}
        self._flush()
        return {n: self._stats[n] for n in self.order}

"""Where the CUDA attention kernels are used: off MLX's CUDA backend never, and on it only where
they compute what the op sequence would (the kernels themselves are checked on a GPU:
scripts/gpu_decode_attention.py, scripts/gpu_internals.py)."""

from __future__ import annotations

import mlx.core as mx

from mlx_tinyllama import cuda_attention, sources
from mlx_tinyllama.ops import Ops
from mlx_tinyllama.taps import ATTENTION_INTERNALS, Taps, tap_names


class ScaleTwice(Ops):
    def scale(self, scores, scale):
        return super().scale(super().scale(scores, scale), scale)


def test_observed_internals_only_where_the_kernel_computes_the_same_steps(monkeypatch):
    q, k = mx.zeros((1, 4, 3, 8)), mx.zeros((1, 2, 3, 8))
    if not cuda_attention.available():
        assert Ops().observed_internals(q, k, 0.125) is None  # this machine: the op sequence
    monkeypatch.setattr(cuda_attention, "available", lambda: True)
    monkeypatch.setattr(cuda_attention, "attention_internals", lambda *a: ("kernel",) * 4)
    assert Ops().observed_internals(q, k, 0.125) == ("kernel",) * 4
    assert Ops(kernels="explicit").observed_internals(q, k, 0.125) is None  # explicit: the data path itself
    assert Ops(policy="mixed", kernels="explicit").observed_internals(q, k, 0.125) is None
    assert Ops().observed_internals(q, k, 0.125, visible=mx.ones((1, 1, 1, 3), mx.bool_)) is None
    assert ScaleTwice().observed_internals(q, k, 0.125) is None  # a changed step is observed as written


def test_the_kernels_outputs_are_what_the_taps_record(tiny_dir, seed_ids, monkeypatch):
    """With the kernel in place (here a stand-in returning the op sequence's values, marked), the four
    internals taps of every layer record its outputs, in the table's order."""
    lm = sources.load(str(tiny_dir), "float32")
    names = tap_names(lm.config.num_hidden_layers)
    monkeypatch.setattr(cuda_attention, "available", lambda: False)  # the op sequence, on a GPU too
    plain = Taps(names, "full")
    mx.eval(lm.model(mx.array(seed_ids), tap=plain))
    calls = []

    def stand_in(q, k, scale, lowest):
        calls.append(q.shape)
        ops = Ops()
        s = ops.qk(q, k)
        s1 = ops.scale(s, scale)
        s2 = ops.add_mask(s1, q.shape[2], k.shape[2])
        return s + 1, s1 + 1, s2 + 1, ops.softmax(s2, q.dtype) + 1

    monkeypatch.setattr(cuda_attention, "available", lambda: True)
    monkeypatch.setattr(cuda_attention, "attention_internals", stand_in)
    marked = Taps(names, "full")
    logits = lm.model(mx.array(seed_ids), tap=marked)
    assert len(calls) == lm.config.num_hidden_layers
    assert mx.array_equal(logits[0], plain.tensors["logits"]).item()  # the data path is untouched
    assert marked.order == plain.order
    for i in range(lm.config.num_hidden_layers):
        for suffix in ATTENTION_INTERNALS:
            n = f"layers.{i}.{suffix}"
            assert mx.array_equal(marked.tensors[n], plain.tensors[n] + 1).item(), n

"""Half-precision linear layers on MLX's CPU backend (ops.Fp32GemmLinear): a long prefill
upcasts each weight per call and keeps no fp32 copy; the first few-row call (a decode step)
makes the kept copies; both give bit-identical results."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_tinyllama import decode, ops, sources
from mlx_tinyllama.ops import UPCAST_PER_CALL_ROWS, fp32_weight_copies
from mlx_tinyllama.taps import Taps

TAPS = ["embed", "layers.0.attn.q", "layers.1.attn.probs", "layers.3.mlp.down", "final_norm", "logits"]


@pytest.fixture(autouse=True)
def on_the_cpu():
    previous = mx.default_device()
    mx.set_default_device(mx.cpu)  # also on a GPU machine: this is the CPU backend's rule
    yield
    mx.set_default_device(previous)


def long_ids(n: int = UPCAST_PER_CALL_ROWS) -> mx.array:
    return mx.array(np.random.default_rng(0).integers(3, 32000, n).tolist())


def half_weights_bytes(model) -> int:
    return sum(m.weight.nbytes for m in model.modules() if isinstance(m, ops.Fp32GemmLinear))


def make_copies(model) -> None:
    """One single-token forward: every linear layer's first call has few rows."""
    mx.eval(model(mx.array([1])))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_per_call_upcast_and_kept_copies_give_identical_logits_and_taps(small_dir, dtype):
    ids = long_ids()
    runs = {}
    for kept in (False, True):
        lm = sources.load(str(small_dir), dtype)
        if kept:
            make_copies(lm.model)
        taps = Taps(TAPS, "full")
        mx.eval(lm.model(ids, tap=taps), taps.tensors)
        copies = fp32_weight_copies(lm.model)
        assert copies == (2 * half_weights_bytes(lm.model) if kept else 0), (kept, copies)
        runs[kept] = taps.tensors
    assert runs[False]["logits"].shape == (UPCAST_PER_CALL_ROWS, 32000)
    for name in TAPS:
        assert mx.array_equal(runs[False][name], runs[True][name]).item(), name


def test_a_long_prefill_keeps_no_fp32_copy_and_a_decode_step_makes_them(small_dir):
    """Measured through MLX's allocator, not only the module state: the memory that stays
    allocated after a long prefill is its logits; after one decode step it is the copies too."""
    lm = sources.load(str(small_dir), "float16")
    copies = 2 * half_weights_bytes(lm.model)
    cache = lm.model.make_cache()
    mx.synchronize()
    mx.clear_cache()
    base = mx.get_active_memory()
    logits = lm.model(long_ids(), cache=cache)
    mx.eval(logits, [(c.keys, c.values) for c in cache])
    kv = sum(c.keys.nbytes + c.values.nbytes for c in cache)
    kept = mx.get_active_memory() - base - logits.nbytes - kv
    assert fp32_weight_copies(lm.model) == 0
    assert kept < copies / 8, (kept, copies)  # a few small buffers at most, no copy
    del logits
    mx.synchronize()
    base = mx.get_active_memory()
    step = lm.model(mx.array([[5]]), cache=cache)
    mx.eval(step, [(c.keys, c.values) for c in cache])
    grown = mx.get_active_memory() - base - step.nbytes
    assert fp32_weight_copies(lm.model) == copies
    assert grown >= copies, (grown, copies)  # the same measurement sees the copies when they exist


def test_copies_made_while_the_compiled_decode_step_is_traced_are_constants(small_dir):
    """A long prompt then compiled steps: the copies are made during the trace (decode.py);
    they hold real values afterwards, and the steps equal those of a model whose copies
    existed before."""
    ids = long_ids()
    out = {}
    for kept in (False, True):
        lm = sources.load(str(small_dir), "float16")
        if kept:
            make_copies(lm.model)
        decoder = decode.CompiledDecoder(lm.model)
        cache = decoder.make_cache(UPCAST_PER_CALL_ROWS + 4)
        logits = [decoder(ids[None], cache)[:, -1]]
        assert fp32_weight_copies(lm.model) == (2 * half_weights_bytes(lm.model) if kept else 0)
        for _ in range(3):
            logits.append(decoder(mx.argmax(logits[-1], axis=-1)[None], cache)[:, -1])
        mx.eval(logits)
        assert decoder.steps == 3 and fp32_weight_copies(lm.model) == 2 * half_weights_bytes(lm.model)
        out[kept] = logits
        q = lm.model.layers[0].self_attn.q_proj
        assert mx.array_equal(q._weight32, q.weight.astype(mx.float32)).item()  # usable outside the trace
    for a, b in zip(out[False], out[True]):
        assert mx.array_equal(a, b).item()


def test_a_replaced_weight_gets_a_new_copy(tiny_dir):
    lm = sources.load(str(tiny_dir), "float16")
    q = lm.model.layers[0].self_attn.q_proj
    x = mx.ones((1, 2, q.weight.shape[1]), mx.float16)
    mx.eval(q(x))
    assert q.has_weight32
    q.weight = q.weight * 2  # e.g. load_weights after the first call
    assert not q.has_weight32 and fp32_weight_copies(lm.model) == 0
    assert mx.array_equal(q(x), (x.astype(mx.float32) @ q.weight.astype(mx.float32).T).astype(mx.float16)).item()
    assert q.has_weight32

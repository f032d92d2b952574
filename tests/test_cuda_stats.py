"""The one-kernel tap statistics of MLX's CUDA backend (cuda_stats.py), on any machine: the block
plan, the float64 merge of the blocks' partials, and the taps' flush through that path, with the
kernel's arithmetic emulated block by block in numpy. The kernel itself is checked on a GPU
(scripts/gpu_stats.py, run by `scripts/bench_gpu.sh tests`)."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_tinyllama import cuda_stats, sources, taps
from mlx_tinyllama.taps import Taps, tap_names

def assert_agrees(got: dict, want: dict, where: str) -> None:
    """The kernel's contract with the float64 host path (cuda_stats.mismatches)."""
    bad = cuda_stats.mismatches(got, want)
    assert not bad, f"{where}: " + "; ".join(bad)


def cases() -> list[tuple[np.ndarray, int, str]]:
    rng = np.random.default_rng(0)
    masked = rng.standard_normal((8, 38, 38)).astype(np.float32)
    masked[:, np.triu_indices(38, 1)[0], np.triu_indices(38, 1)[1]] = np.finfo(np.float32).min
    odd = rng.standard_normal((38, 100)).astype(np.float16)
    odd[0, 1], odd[5, 5], odd[7, 0] = np.nan, np.inf, -np.inf
    return [(rng.standard_normal((38, 512)).astype(np.float16) * 4 + 1, 0, "token-major, 5 blocks"),
            (rng.standard_normal((4, 38, 64)).astype(np.float32), 1, "head-major"),
            (masked, 1, "masked scores, float32 minimum"),
            (odd, 0, "NaN and Inf"),
            (np.full((3, 5), np.nan, np.float32), 0, "all NaN"),
            (np.full((9000,), 2.5, np.float32), 0, "constant over 3 blocks, 1-D"),
            (np.arange(12, dtype=np.float32).reshape(3, 4) + 1e6, 0, "offset far from zero"),
            (rng.standard_normal((2, 1)).astype(np.float32), 1, "one value per row")]


def test_plan_covers_every_value_once_and_finds_the_rows():
    shapes, axes = [(38, 512), (4, 38, 64), (9000,), (1,)], [0, 1, 0, 0]
    plan, meta = cuda_stats.plan(shapes, axes)
    for t, shape in enumerate(shapes):
        size = math.prod(shape)
        chunks = plan[plan[:, 0] == t, 1]
        assert list(chunks) == list(range(-(-size // cuda_stats.CHUNK)))  # contiguous, in order, none missing
        assert meta[t, 0] == size
    assert tuple(meta[0, 1:]) == (0, 37 * 512, 3)  # token-major: row t starts at t·512
    assert tuple(meta[1, 1:]) == (0, 37 * 64, 3)  # head-major: head 0, token t starts at t·64
    assert tuple(meta[2, 1:]) == (0, 0, 3) and tuple(meta[3, 1:]) == (0, 0, 1)  # 1-D: the tensor is the row


def test_merged_blocks_equal_the_float64_host_statistics():
    data = cases()
    plan, meta = cuda_stats.plan([a.shape for a, _, _ in data], [ax for _, ax, _ in data])
    merged = cuda_stats.merge(cuda_stats.emulate([a for a, _, _ in data], plan, meta), plan, meta)
    for (a, axis, label), got in zip(data, merged):
        x = mx.array(a)
        want = taps.batch_stats([x], axis)[0]
        assert_agrees(dict(taps._head(x), **got), want, label)


def test_the_merge_is_sensitive_to_one_wrong_block():
    """The comparison above can fail: one block's sum off by one value moves the mean and sum."""
    a = np.random.default_rng(1).standard_normal((38, 512)).astype(np.float32)
    plan, meta = cuda_stats.plan([a.shape], [0])
    parts = cuda_stats.emulate([a], plan, meta)
    parts[2, 5] += 1.0
    got = cuda_stats.merge(parts, plan, meta)[0]
    with pytest.raises(AssertionError):
        assert_agrees(dict(taps._head(mx.array(a)), **got), taps.batch_stats([mx.array(a)], 0)[0], "corrupted")


def emulated_kernel(k):
    """Stands in for the CUDA kernel of k inputs: the same outputs, from `emulate`."""

    def run(inputs, output_shapes, output_dtypes, **_):
        *xs, plan, meta = inputs
        arrays = [np.array(x.astype(mx.float32)) for x in xs]
        parts = cuda_stats.emulate(arrays, np.array(plan), np.array(meta))
        assert output_shapes == [(len(parts), 2 * cuda_stats.FIELDS)] and output_dtypes == [mx.uint32]
        return [mx.array(np.ascontiguousarray(parts).view(np.uint32))]

    return run


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_taps_through_the_kernel_path_equal_the_host_path(tiny_dir, seed_ids, monkeypatch, dtype):
    lm = sources.load(str(tiny_dir), dtype)
    names = tap_names(lm.config.num_hidden_layers)
    host = Taps(names, "stats")
    lm.model(mx.array(seed_ids), tap=host)
    want = host.stats()
    launches = []
    monkeypatch.setattr(cuda_stats, "available", lambda: True)
    monkeypatch.setattr(cuda_stats, "_kernel", lambda k: launches.append(k) or emulated_kernel(k))
    kernel = Taps(names, "stats")
    lm.model(mx.array(seed_ids), tap=kernel)
    got = kernel.stats()
    assert kernel.stats() == got  # a second flush has nothing pending and changes nothing
    assert list(got) == list(want)
    assert launches == [min(32, len(names) - s) for s in range(0, len(names), 32)]  # 32 taps a launch
    for n in names:
        assert_agrees(got[n], want[n], n)


def test_flushing_after_every_tap_gives_the_same_numbers(tiny_dir, seed_ids, monkeypatch):
    """The memory bound (a flush whenever flush_bytes are pending) cannot change a statistic: each
    tensor's blocks are merged on their own, whatever else shares the launch."""
    lm = sources.load(str(tiny_dir), "float32")
    names = tap_names(lm.config.num_hidden_layers)
    monkeypatch.setattr(cuda_stats, "available", lambda: True)
    monkeypatch.setattr(cuda_stats, "_kernel", emulated_kernel)
    one_batch, every_tap = Taps(names, "stats"), Taps(names, "stats", flush_bytes=1)
    lm.model(mx.array(seed_ids), tap=one_batch)
    lm.model(mx.array(seed_ids), tap=every_tap)
    assert every_tap.stats() == one_batch.stats()

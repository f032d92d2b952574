"""The statistics of a tap (taps.Taps records them): min, max, mean, std, absmax, sum over the
finite values in float64, NaN and Inf counted apart, and the first and last token rows; on the
host with numpy in cache-sized blocks, or on a GPU in a handful of kernels per group."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from . import cuda_stats


def _stats_on_device() -> bool:
    """GPUs reduce on the device; CPUs use numpy."""
    return mx.default_device().type == mx.gpu


def to_numpy(x: mx.array) -> np.ndarray:
    """x as a numpy array (bfloat16, which numpy lacks, as float32)."""
    return np.asarray(x.astype(mx.float32) if x.dtype == mx.bfloat16 else x)


def tensor_stats(x: mx.array, token_axis: int = 0) -> dict:
    """Statistics of one tap (batch dimension dropped); see `batch_stats`."""
    return batch_stats([x], token_axis)[0]


def batch_stats(xs: list[mx.array], token_axis: int = 0) -> list[dict]:
    """Statistics of same-shape tensors over their finite values, accumulated in float64;
    NaN and Inf are counted apart. first/last: 3 values of the first and last token row
    (head-major taps [H, T, ...]: of head 0).

    Small tensors (<= _BLOCK values, e.g. every tap of a decode step) are reduced together:
    one float64 buffer for the group, one `reduceat` per statistic, two-pass std. Large ones
    one at a time (`_moments`). Either way a tensor's numbers depend on its values only,
    never on the other tensors of the group."""
    x0 = xs[0]
    if x0.size and cuda_stats.available():
        return [dict(_head(x), **r) for x, r in zip(xs, cuda_stats.batch_stats(xs, [token_axis] * len(xs)))]
    if _stats_on_device() and x0.size:
        return _device_batch_stats(xs, token_axis)
    arrays = [to_numpy(x) for x in xs]
    head = _head(x0)
    n = x0.size
    if n == 0:
        return [_stats_of_finite(head, a.reshape(-1), a, token_axis) for a in arrays]
    small = n <= _BLOCK
    if small:
        buf = np.concatenate([a.reshape(-1) for a in arrays]).astype(np.float64)
        starts = np.arange(len(arrays)) * n
        lo, hi = np.minimum.reduceat(buf, starts), np.maximum.reduceat(buf, starts)
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite tensors: redone by the masked path
            total = np.add.reduceat(buf, starts)
            centred = buf - np.repeat(total / n, n)
            std = np.sqrt(np.add.reduceat(centred * centred, starts) / n)
    out = []
    for i, a in enumerate(arrays):
        flat = a.reshape(-1)
        lo_i, hi_i = (lo[i], hi[i]) if small else (float(flat.min()), float(flat.max()))
        if not (np.isfinite(lo_i) and np.isfinite(hi_i)):  # rare: mask the non-finite values
            out.append(_stats_of_finite(head, flat, a, token_axis))
            continue
        if small:
            total_i, std_i = total[i], std[i]
        else:
            sums, _, stds = _moments(flat[None])
            total_i, std_i = sums[0], stds[0]
        out.append(dict(head, min=float(lo_i), max=float(hi_i), mean=float(total_i / n), std=float(std_i),
                        absmax=float(max(-lo_i, hi_i)), sum=float(total_i), nan=0, inf=0, finite=n,
                        first=_row(a, token_axis, 0), last=_row(a, token_axis, -1)))
    return out


_BLOCK = 1 << 16  # values per block: a float64 block (512 KB) stays in the CPU's cache


def _moments(flat: np.ndarray):
    """sum, mean, std of each row of finite values `flat` [k, n] with one float64 conversion
    per value: blocks of _BLOCK columns, each converted once and reduced while in cache (no
    float64 copy of the whole tensor). std from
    moments shifted by the mean c of the row's first block: var = mean((x-c)²) - (mean-c)²,
    exact where the row is constant. Against the two-pass float64 value the relative
    error is about n·2⁻⁵³·((mean - c) / std)²: below 1e-12 on the tested rows (offset,
    narrow, constant, one masked -3e38 among normal values)."""
    k, n = flat.shape
    shift = flat[:, :_BLOCK].astype(np.float64).mean(axis=1, keepdims=True)  # near the mean: little cancellation
    total, s2 = np.zeros(k), np.zeros(k)
    for start in range(0, n, _BLOCK):
        block = flat[:, start:start + _BLOCK].astype(np.float64)
        total += block.sum(axis=1)
        block -= shift
        s2 += np.einsum("ij,ij->i", block, block)
    d = total / n - shift[:, 0]
    return total, total / n, np.sqrt(np.maximum(s2 / n - d * d, 0.0))


def _device_batch_stats(xs: list[mx.array], token_axis: int) -> list[dict]:
    """The same statistics on a GPU; see `_device_group`."""
    floats, counts = _device_group(xs, token_axis)
    mx.eval(floats, counts)
    return _device_rows(xs[0], np.array(floats), np.array(counts))


def _device_group(xs: list[mx.array], token_axis: int) -> tuple[mx.array, mx.array]:
    """Lazy statistics of same-shape tensors on the device: a handful of kernels for the
    group, two small arrays to bring back (copying every tapped tensor to the host would
    cost more than the forward pass). float32 accumulation, moments on x / absmax (masked
    scores hold the float32 minimum, whose plain sum overflows).
    Returns floats [n, 11] (min, max, mean, std, absmax, first 3, last 3) and counts
    [n, 3] (nan, inf, finite)."""
    x = mx.stack(xs).astype(mx.float32)
    n_rows = x.shape[0]
    flat = x.reshape(n_rows, -1)
    nan, inf = mx.isnan(flat), mx.isinf(flat)
    finite = mx.logical_not(mx.logical_or(nan, inf))
    count = finite.sum(axis=1)
    zero = mx.zeros_like(flat)
    big = mx.array(np.finfo(np.float32).max, mx.float32)
    absmax = mx.where(finite, mx.abs(flat), zero).max(axis=1)
    scale = mx.maximum(absmax, mx.array(np.finfo(np.float32).tiny, mx.float32))[:, None]
    xs_ = mx.where(finite, flat, zero) / scale
    c = mx.maximum(count, 1).astype(mx.float32)
    mean_s = xs_.sum(axis=1) / c
    var_s = mx.where(finite, (xs_ - mean_s[:, None]) ** 2, zero).sum(axis=1) / c
    if x.ndim == 2:  # 1-D taps: the row is the tensor
        first = last = flat[:, :3]
    else:
        first = (x[:, 0] if token_axis == 0 else x[:, 0, 0]).reshape(n_rows, -1)[:, :3]
        last = (x[:, -1] if token_axis == 0 else x[:, 0, -1]).reshape(n_rows, -1)[:, :3]
    floats = mx.concatenate([mx.stack([mx.where(finite, flat, big).min(axis=1), mx.where(finite, flat, -big).max(axis=1),
                                       mean_s * scale[:, 0], mx.sqrt(var_s) * scale[:, 0], absmax], axis=1),
                             first, last], axis=1)
    counts = mx.stack([nan.sum(axis=1), inf.sum(axis=1), count], axis=1)
    return floats, counts


_DTYPE_NAMES: dict = {}


def _head(x: mx.array, batched: bool = False) -> dict:
    """shape (without the batch dimension when `batched`) and dtype name of a tap."""
    if x.dtype not in _DTYPE_NAMES:
        _DTYPE_NAMES[x.dtype] = str(x.dtype).replace("mlx.core.", "")
    return {"shape": list(x.shape[1:] if batched else x.shape), "dtype": _DTYPE_NAMES[x.dtype]}


def _device_rows(x0: mx.array, floats: np.ndarray, counts: np.ndarray) -> list[dict]:
    head = _head(x0)
    out = []
    for f, (nan, inf, finite) in zip(floats.tolist(), counts.tolist()):
        d = dict(head, min=f[0], max=f[1], mean=f[2], std=f[3], absmax=f[4], nan=int(nan), inf=int(inf),
                 finite=int(finite), first=f[5:8], last=f[8:11])
        d["sum"] = d["mean"] * d["finite"]  # in Python floats: masked scores' sum exceeds float32
        if d["finite"] == 0:
            d.update({k: float("nan") for k in ("min", "max", "mean", "std", "absmax", "sum")})
        out.append(d)
    return out


def _stats_of_finite(head: dict, flat: np.ndarray, a: np.ndarray, token_axis: int) -> dict:
    """Statistics of the finite values of `flat` (NaN and Inf counted apart), two passes in
    blocks of _BLOCK values: a masked copy and float64 copies of a whole tensor would hold
    3.7 GB more for one [32, 2048, 2048] fp16 tap with an Inf (a 2,048-token dump)."""
    nan = inf = n = 0
    total, lo, hi = 0.0, np.inf, -np.inf
    for start in range(0, flat.size, _BLOCK):
        block = flat[start:start + _BLOCK]
        isnan, isinf = np.isnan(block), np.isinf(block)
        nan, inf = nan + int(isnan.sum()), inf + int(isinf.sum())
        v = block[~(isnan | isinf)].astype(np.float64)
        if v.size:
            n, total, lo, hi = n + v.size, total + v.sum(), min(lo, v.min()), max(hi, v.max())
    out = dict(head, nan=nan, inf=inf, finite=n, first=_row(a, token_axis, 0), last=_row(a, token_axis, -1))
    if n == 0:
        return dict(out, **{k: float("nan") for k in ("min", "max", "mean", "std", "absmax", "sum")})
    mean, s2 = total / n, 0.0
    for start in range(0, flat.size, _BLOCK):
        block = flat[start:start + _BLOCK]
        centred = block[np.isfinite(block)].astype(np.float64) - mean
        s2 += np.dot(centred, centred)
    return dict(out, min=float(lo), max=float(hi), mean=float(mean), std=float(np.sqrt(s2 / n)),
                absmax=float(max(-lo, hi)), sum=float(total))


def _row(a: np.ndarray, token_axis: int, t: int) -> list[float]:
    if a.ndim == 1:
        row = a
    elif token_axis == 0:
        row = a[t]
    else:
        row = a[0, t]
    return [float(v) for v in np.asarray(row, dtype=np.float32).reshape(-1)[:3]]

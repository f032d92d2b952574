"""Statistics of all the stats taps of a forward pass in one CUDA kernel per 32 tensors (MLX's CUDA backend).

Why: on a GPU, reducing each tap with MLX ops costs a dozen kernels per group of
same-shape taps and a read back per group: a 38-token TinyLlama prefill (6.5 ms)
took 21 ms with stats on its 443 taps. Here one launch covers up to MAX_INPUTS
tensors of any shapes and dtypes: each block reduces CHUNK values of one tensor to
float64 partials (finite count, NaN and Inf counts, min, max, sum, and the sum of
squares about the block's own mean), and the first block of each tensor also copies
its first and last token rows. All partials come back in one read, and the host
merges them in float64 (Chan, Golub and LeVeque's pairwise update), so the numbers
are those of the float64 host computation (`taps.batch_stats`) up to summation
order: relative differences of about 1e-15 in sum and mean, 1e-12 in std.

`plan` and `merge` are plain numpy, so the layout and the merge are tested on any
machine against `emulate` (the kernel's arithmetic, block by block, in numpy); the
kernel itself is checked on the GPU (scripts/gpu_stats.py, in the GPU test step).
"""

from __future__ import annotations

import functools
import math

import mlx.core as mx
import numpy as np

THREADS = 256
ITEMS = 16  # values per thread, kept in registers for the second pass
CHUNK = THREADS * ITEMS  # values per block
MAX_INPUTS = 32  # tensors per launch (the kernel's parameter list)
FIELDS = 13  # per block: n, nan, inf, min, max, sum, m2, first row [3], last row [3]

EXACT = ("shape", "dtype", "min", "max", "absmax", "nan", "inf", "finite", "first", "last")


def mismatches(got: dict, want: dict) -> list[str]:
    """Where statistics `got` (this kernel's) leave the bounds of the module docstring against
    `want` (the float64 host computation): counts, extremes and rows equal; sum and mean within
    1e-12 of n·absmax and absmax; std within 1e-9 relative (+1e-12·absmax). [] when they agree."""
    bad = []
    for k in EXACT:
        a, b = got[k], want[k]
        same = a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)) or (
            isinstance(a, list) and np.array_equal(np.array(a), np.array(b), equal_nan=True))
        if not same:
            bad.append(f"{k}: {a} vs {b}")
    n, amax = want["finite"], want["absmax"]
    if n:
        for k, bound in (("sum", 1e-12 * amax * n), ("mean", 1e-12 * amax),
                         ("std", 1e-9 * want["std"] + 1e-12 * amax)):
            if not abs(got[k] - want[k]) <= bound:
                bad.append(f"{k}: {got[k]!r} vs {want[k]!r} (bound {bound:.3g})")
    return bad


_HEADER = """
template <int ITEMS_, int THREADS_, typename P>
__device__ inline void tl_chunk(const P* p, long start, long size, int tid, float* v) {
    #pragma unroll
    for (int i = 0; i < ITEMS_; ++i) {
        const long idx = start + (long)i * THREADS_ + tid;  // coalesced: neighbouring threads, neighbouring values
        v[i] = idx < size ? static_cast<float>(p[idx]) : 0.0f;
    }
}
template <typename P>
__device__ inline double tl_at(const P* p, long i) { return (double)static_cast<float>(p[i]); }
"""

_BODY = """
    const int b = blockIdx.x;
    const int tid = threadIdx.x;
    const int t = plan[2 * b];
    const long start = (long)plan[2 * b + 1] * (long)(THREADS * ITEMS);
    const long size = meta[4 * t];
    float v[ITEMS];
    switch (t) { %(chunk)s }
    int nf = 0, nn = 0, ni = 0;
    double s = 0.0;
    float lo = INFINITY, hi = -INFINITY;
    #pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
        if (start + (long)i * THREADS + tid < size) {
            const float x = v[i];
            if (isnan(x)) { ++nn; } else if (isinf(x)) { ++ni; }
            else { ++nf; s += (double)x; lo = fminf(lo, x); hi = fmaxf(hi, x); }
        }
    }
    __shared__ double rs[THREADS];
    __shared__ float rlo[THREADS], rhi[THREADS];
    __shared__ int rnf[THREADS], rnn[THREADS], rni[THREADS];
    rs[tid] = s; rlo[tid] = lo; rhi[tid] = hi; rnf[tid] = nf; rnn[tid] = nn; rni[tid] = ni;
    __syncthreads();
    for (int w = THREADS / 2; w > 0; w >>= 1) {
        if (tid < w) {
            rs[tid] += rs[tid + w]; rlo[tid] = fminf(rlo[tid], rlo[tid + w]); rhi[tid] = fmaxf(rhi[tid], rhi[tid + w]);
            rnf[tid] += rnf[tid + w]; rnn[tid] += rnn[tid + w]; rni[tid] += rni[tid + w];
        }
        __syncthreads();
    }
    const int n = rnf[0];
    const double sum = rs[0];
    const double mean = n > 0 ? sum / n : 0.0;
    double m2 = 0.0;  // second pass over the registers: squares about the block's mean, no cancellation
    #pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
        if (start + (long)i * THREADS + tid < size && isfinite(v[i])) {
            const double d = (double)v[i] - mean;
            m2 += d * d;
        }
    }
    __syncthreads();
    rs[tid] = m2;
    __syncthreads();
    for (int w = THREADS / 2; w > 0; w >>= 1) {
        if (tid < w) rs[tid] += rs[tid + w];
        __syncthreads();
    }
    if (tid == 0) {
        double* o = reinterpret_cast<double*>(out) + (size_t)b * FIELDS;
        o[0] = n; o[1] = rnn[0]; o[2] = rni[0]; o[3] = rlo[0]; o[4] = rhi[0]; o[5] = sum; o[6] = rs[0];
        for (int j = 0; j < 6; ++j) o[7 + j] = 0.0;
        if (start == 0) {
            const long first = meta[4 * t + 1], last = meta[4 * t + 2], row_n = meta[4 * t + 3];
            for (int j = 0; j < row_n; ++j) {
                double f = 0.0, l = 0.0;
                switch (t) { %(rows)s }
                o[7 + j] = f; o[10 + j] = l;
            }
        }
    }
"""

_kernels: dict[int, object] = {}


def available() -> bool:
    """True when the default device is a GPU of MLX's CUDA backend."""
    cuda = getattr(mx, "cuda", None)
    return mx.default_device() == mx.gpu and cuda is not None and cuda.is_available()


def _kernel(k: int):
    """The kernel for k input tensors (compiled once per k by MLX, then per dtype combination)."""
    if k not in _kernels:
        names = [f"x{i}" for i in range(k)]
        chunk = " ".join(f"case {i}: tl_chunk<ITEMS, THREADS>({x}, start, size, tid, v); break;" for i, x in enumerate(names))
        rows = " ".join(f"case {i}: f = tl_at({x}, first + j); l = tl_at({x}, last + j); break;"
                        for i, x in enumerate(names))
        _kernels[k] = mx.fast.cuda_kernel(name=f"tinyllama_tap_stats_{k}", input_names=names + ["plan", "meta"],
                                          output_names=["out"], source=_BODY % {"chunk": chunk, "rows": rows},
                                          header=_HEADER, ensure_row_contiguous=True)
    return _kernels[k]


def row_offsets(shape: tuple, token_axis: int) -> tuple[int, int, int]:
    """Flat offsets of the first and last token rows, and how many of their values are kept (<= 3),
    in a row-major tensor of `shape`: what `tap_stats._row` reads (head-major taps: head 0)."""
    if len(shape) == 1:
        return 0, 0, min(3, shape[0])
    row = int(np.prod(shape[token_axis + 1:], dtype=np.int64))
    return 0, (shape[token_axis] - 1) * row, min(3, row)


def plan(shapes: list[tuple], token_axes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The blocks of one launch: plan [blocks, 2] int32 (tensor, chunk index), tensor-major, and
    meta [k, 4] int64 (size, first-row offset, last-row offset, values kept per row).
    Tensors must be non-empty."""
    meta = np.array([(math.prod(shape), *row_offsets(tuple(shape), axis)) for shape, axis in zip(shapes, token_axes)],
                    np.int64).reshape(-1, 4)
    n_chunks = -(-meta[:, 0] // CHUNK)
    tensor = np.repeat(np.arange(len(shapes)), n_chunks)
    chunk = np.arange(len(tensor)) - np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
    return np.stack([tensor, chunk], axis=1).astype(np.int32), meta


@functools.lru_cache(maxsize=64)
def _launch_plan(signature: tuple) -> tuple[np.ndarray, np.ndarray, mx.array, mx.array]:
    """plan/meta of a launch and their device copies, cached: a decode loop repeats the same shapes."""
    plan_, meta = plan([s for s, _ in signature], [a for _, a in signature])
    return plan_, meta, mx.array(plan_), mx.array(meta)


def emulate(arrays: list[np.ndarray], plan_: np.ndarray, meta: np.ndarray) -> np.ndarray:
    """The kernel's output [blocks, FIELDS] computed in numpy, block by block (for tests on any machine)."""
    out = np.zeros((len(plan_), FIELDS))
    for b, (t, c) in enumerate(plan_):
        flat = arrays[t].reshape(-1).astype(np.float32)
        v = flat[c * CHUNK:(c + 1) * CHUNK].astype(np.float64)
        finite = v[np.isfinite(v)]
        n = finite.size
        mean = finite.sum() / n if n else 0.0
        out[b, :7] = (n, np.isnan(v).sum(), np.isinf(v).sum(), finite.min() if n else np.inf,
                      finite.max() if n else -np.inf, finite.sum(), ((finite - mean) ** 2).sum())
        if c == 0:
            _, first, last, row_n = meta[t]
            out[b, 7:7 + row_n] = flat[first:first + row_n]
            out[b, 10:10 + row_n] = flat[last:last + row_n]
    return out


def merge(parts: np.ndarray, plan_: np.ndarray, meta: np.ndarray) -> list[dict]:
    """Per tensor of the launch: the statistics dict of `taps.batch_stats` (without shape and dtype)
    from the blocks' float64 partials; vectorised over tensors (a flush merges hundreds)."""
    first_block = np.flatnonzero(plan_[:, 1] == 0)  # plan is tensor-major: each tensor's blocks are contiguous
    n_b, s_b = parts[:, 0], parts[:, 5]
    n = np.add.reduceat(n_b, first_block)
    total = np.add.reduceat(s_b, first_block)
    mean = total / np.maximum(n, 1)
    mean_b = s_b / np.maximum(n_b, 1)
    dev = n_b * (mean_b - np.repeat(mean, np.diff(np.append(first_block, len(plan_))))) ** 2
    m2 = np.add.reduceat(parts[:, 6] + dev, first_block)  # Chan et al.: the blocks' moments merged exactly
    lo, hi = np.minimum.reduceat(parts[:, 3], first_block), np.maximum.reduceat(parts[:, 4], first_block)
    nan, inf = np.add.reduceat(parts[:, 1], first_block), np.add.reduceat(parts[:, 2], first_block)
    std = np.sqrt(m2 / np.maximum(n, 1))
    rows = parts[first_block, 7:13].tolist()
    out = []
    for t, (n_t, lo_t, hi_t, mean_t, std_t, sum_t, nan_t, inf_t) in enumerate(
            zip(n.tolist(), lo.tolist(), hi.tolist(), mean.tolist(), std.tolist(), total.tolist(), nan.tolist(),
                inf.tolist())):
        row_n = int(meta[t, 3])
        counts = dict(nan=int(nan_t), inf=int(inf_t), finite=int(n_t), first=rows[t][:row_n], last=rows[t][3:3 + row_n])
        if n_t == 0:
            out.append(dict({k: float("nan") for k in ("min", "max", "mean", "std", "absmax", "sum")}, **counts))
        else:
            out.append(dict(min=lo_t, max=hi_t, mean=mean_t, std=std_t, absmax=max(-lo_t, hi_t), sum=sum_t, **counts))
    return out


def batch_stats(xs: list[mx.array], token_axes: list[int], batched: bool = False) -> list[dict]:
    """Statistics of non-empty tensors `xs` (any shapes and dtypes), one launch per MAX_INPUTS
    tensors, one read back and one merge for all: see the module docstring. `batched`: every x
    has a leading batch dimension of 1, which the statistics (and token_axes) leave out."""
    if not xs:  # a flush with nothing pending
        return []
    plans, metas, outputs = [], [], []
    for start in range(0, len(xs), MAX_INPUTS):
        group = xs[start:start + MAX_INPUTS]
        signature = tuple((tuple(x.shape[1:] if batched else x.shape), a)
                          for x, a in zip(group, token_axes[start:start + MAX_INPUTS]))
        plan_, meta, plan_dev, meta_dev = _launch_plan(signature)
        (parts,) = _kernel(len(group))(
            inputs=[*group, plan_dev, meta_dev],
            template=[("THREADS", THREADS), ("ITEMS", ITEMS), ("FIELDS", FIELDS)],
            grid=(len(plan_) * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
            output_shapes=[(len(plan_), 2 * FIELDS)], output_dtypes=[mx.uint32])
        plans.append(plan_)
        metas.append(meta)
        outputs.append(parts)
    host = np.array(mx.concatenate(outputs) if len(outputs) > 1 else outputs[0]).view(np.float64)
    return merge(host, np.concatenate(plans), np.concatenate(metas))

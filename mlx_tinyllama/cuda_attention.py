"""Single-query attention over a fixed-capacity KV cache as one CUDA kernel (MLX's CUDA backend only).

Why: the compiled decode step (decode.py) attends over the whole preallocated cache with a
boolean mask that hides the unwritten slots. MLX's CUDA `scaled_dot_product_attention` has a
fused kernel for one query row only when no array mask is given; with one it falls back to
four separate kernels (scores, mask, softmax, weighted sum) in every layer, which made the
compiled step slower than the eager one on an H200. This kernel takes the mask as an input
and does what `mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=visible)`
does for T = 1, in one launch: float32 scores and softmax, output rounded to the input type.
On Metal and the CPU the library call stays (Metal's vector kernel takes the mask itself).
"""

from __future__ import annotations

import mlx.core as mx

THREADS = 128  # one block per query head; threads stride over the cache slots

_SOURCE = """
    const int h = blockIdx.x;
    const int tid = threadIdx.x;
    const int kvh = h / (H / KV);
    __shared__ float qs[D];
    __shared__ float s[S];
    __shared__ float red[THREADS];
    if (tid < D) qs[tid] = static_cast<float>(q[h * D + tid]);
    __syncthreads();
    const float sc = scale[0];
    const T* kb = k + (size_t)kvh * S * D;
    const T* vb = v + (size_t)kvh * S * D;
    float m = -INFINITY;
    for (int j = tid; j < S; j += THREADS) {
        float acc = -INFINITY;
        if (visible[j]) {
            acc = 0.0f;
            for (int d = 0; d < D; ++d) acc += qs[d] * static_cast<float>(kb[(size_t)j * D + d]);
            acc *= sc;
        }
        s[j] = acc;
        m = fmaxf(m, acc);
    }
    red[tid] = m;
    __syncthreads();
    for (int w = THREADS / 2; w > 0; w >>= 1) {
        if (tid < w) red[tid] = fmaxf(red[tid], red[tid + w]);
        __syncthreads();
    }
    const float mx_ = red[0];
    __syncthreads();
    float z = 0.0f;
    for (int j = tid; j < S; j += THREADS) {
        const float e = (s[j] == -INFINITY) ? 0.0f : expf(s[j] - mx_);
        s[j] = e;
        z += e;
    }
    red[tid] = z;
    __syncthreads();
    for (int w = THREADS / 2; w > 0; w >>= 1) {
        if (tid < w) red[tid] += red[tid + w];
        __syncthreads();
    }
    const float total = red[0];
    if (tid < D) {
        float o = 0.0f;
        for (int j = 0; j < S; ++j) {
            if (s[j] != 0.0f) o += s[j] * static_cast<float>(vb[(size_t)j * D + tid]);
        }
        out[h * D + tid] = static_cast<T>(o / total);
    }
"""

_kernel = None


def available() -> bool:
    """True when the default device is a GPU of MLX's CUDA backend."""
    cuda = getattr(mx, "cuda", None)
    return mx.default_device() == mx.gpu and cuda is not None and cuda.is_available()


def masked_decode_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, visible: mx.array) -> mx.array:
    """q [1, H, 1, D], k/v [1, KV, S, D], visible [..., S] (bool) -> [1, H, 1, D], in q's dtype."""
    global _kernel
    if _kernel is None:
        _kernel = mx.fast.cuda_kernel(name="tinyllama_masked_decode_attention",
                                      input_names=["q", "k", "v", "scale", "visible"], output_names=["out"],
                                      source=_SOURCE)
    _, H, _, D = q.shape
    KV, S = k.shape[1], k.shape[2]
    (out,) = _kernel(inputs=[q, k, v, mx.array([scale], mx.float32), visible.reshape(S)],
                     template=[("T", q.dtype), ("H", H), ("KV", KV), ("D", D), ("S", S), ("THREADS", THREADS)],
                     grid=(H * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
                     output_shapes=[q.shape], output_dtypes=[q.dtype])
    return out

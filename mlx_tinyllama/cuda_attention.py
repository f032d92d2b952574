"""Attention steps as single CUDA kernels (MLX's CUDA backend only): the compiled decode step's
masked single-query attention, and the attention internals that taps observe on the fused path.

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


# --- the observed attention internals ----------------------------------------------------------
#
# Why: on the fused path SDPA never materialises scores, scaled scores, masked scores and
# probabilities, so a tap that asks for them gets them recomputed with MLX ops: about eight
# kernels per layer, which on a GPU cost more than the rest of a tapped forward pass. This
# kernel makes all four in one launch per layer, with the roundings of that op sequence
# (ops.Ops.qk/scale/add_mask/softmax, policy "hf"): Q·Kᵀ accumulated in float32 and rounded to T,
# the scale and the causal mask applied in T arithmetic, softmax in float32 rounded to T. Only
# the order of the float32 sums differs from cuBLAS's and MLX's softmax, so a value can differ by
# one unit in the last place of T (scripts/gpu_internals.py counts them).

INTERNALS_THREADS = 128  # one block per (head, query row); threads stride over the keys

_INTERNALS_SOURCE = """
    const int H = dims[0], KV = dims[1], T = dims[2], S = dims[3], D = dims[4];
    const int row = blockIdx.x;  // h * T + t
    const int h = row / T, t = row % T;
    const int tid = threadIdx.x;
    const T_* qr = q + (size_t)row * D;
    const T_* kb = k + (size_t)(h / (H / KV)) * S * D;
    const size_t base = (size_t)row * S;
    const int last = S - T + t;  // the last key this query sees (causal)
    const T_ sc = scale[0];
    const T_ lowest = lowest_[0];
    const T_ zero = static_cast<T_>(0.0f);
    __shared__ float red[INTERNALS_THREADS];
    float m = -INFINITY;
    for (int j = tid; j < S; j += INTERNALS_THREADS) {
        float acc = 0.0f;
        for (int d = 0; d < D; ++d) acc += static_cast<float>(qr[d]) * static_cast<float>(kb[(size_t)j * D + d]);
        const T_ s0 = static_cast<T_>(acc);
        const T_ s1 = tl_mul(s0, sc);
        const T_ s2 = tl_add(s1, j > last ? lowest : zero);
        scores[base + j] = s0;
        scaled[base + j] = s1;
        masked[base + j] = s2;
        m = fmaxf(m, static_cast<float>(s2));
    }
    red[tid] = m;
    __syncthreads();
    for (int w = INTERNALS_THREADS / 2; w > 0; w >>= 1) {
        if (tid < w) red[tid] = fmaxf(red[tid], red[tid + w]);
        __syncthreads();
    }
    const float mx_ = red[0];
    __syncthreads();
    float z = 0.0f;
    for (int j = tid; j < S; j += INTERNALS_THREADS) z += expf(static_cast<float>(masked[base + j]) - mx_);
    red[tid] = z;
    __syncthreads();
    for (int w = INTERNALS_THREADS / 2; w > 0; w >>= 1) {
        if (tid < w) red[tid] += red[tid + w];
        __syncthreads();
    }
    const float total = red[0];
    for (int j = tid; j < S; j += INTERNALS_THREADS)
        probs[base + j] = static_cast<T_>(expf(static_cast<float>(masked[base + j]) - mx_) / total);
"""

# T arithmetic, correctly rounded, as MLX's elementwise multiply and add in that type.
_INTERNALS_HEADER = """
__device__ inline float tl_mul(float a, float b) { return a * b; }
__device__ inline float tl_add(float a, float b) { return a + b; }
__device__ inline __half tl_mul(__half a, __half b) { return __hmul(a, b); }
__device__ inline __half tl_add(__half a, __half b) { return __hadd(a, b); }
__device__ inline __nv_bfloat16 tl_mul(__nv_bfloat16 a, __nv_bfloat16 b) { return __hmul(a, b); }
__device__ inline __nv_bfloat16 tl_add(__nv_bfloat16 a, __nv_bfloat16 b) { return __hadd(a, b); }
"""

_internals_kernel = None


def attention_internals(q: mx.array, k: mx.array, scale: float, lowest: float):
    """q [1, H, T, D] (after RoPE), k [1, KV, S, D] -> scores, scaled, masked, probs, each [1, H, T, S]
    in q's dtype, masked with `lowest` above the causal diagonal (query t sees keys 0..S-T+t)."""
    global _internals_kernel
    if _internals_kernel is None:
        _internals_kernel = mx.fast.cuda_kernel(
            name="tinyllama_attention_internals", input_names=["q", "k", "scale", "lowest_", "dims"],
            output_names=["scores", "scaled", "masked", "probs"], source=_INTERNALS_SOURCE,
            header=_INTERNALS_HEADER)
    _, H, T, D = q.shape
    KV, S = k.shape[1], k.shape[2]
    dt = q.dtype
    return _internals_kernel(
        inputs=[q, k.astype(dt), mx.array([scale], dt), mx.array([lowest], dt), mx.array([H, KV, T, S, D], mx.int32)],
        template=[("T_", dt), ("INTERNALS_THREADS", INTERNALS_THREADS)],
        grid=(H * T * INTERNALS_THREADS, 1, 1), threadgroup=(INTERNALS_THREADS, 1, 1),
        output_shapes=[(1, H, T, S)] * 4, output_dtypes=[dt] * 4)

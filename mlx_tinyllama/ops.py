"""The sub-operations of the forward pass, under a precision policy.

`Ops` is the one place where "how is this step computed" is decided:
- kernels="fused": MLX's fused kernels (mx.fast.rms_norm, mx.fast.rope,
  mx.fast.scaled_dot_product_attention): the fast path.
- kernels="explicit": every sub-operation as separate MLX ops, in the order and
  precision transformers uses, so each one can be tapped (and faulted).

Precision policies (what runs in float32 when the model runs in fp16/bf16):
- "hf":        transformers' policy: RMSNorm statistics, softmax and SiLU in fp32.
- "mixed":     "hf" plus the attention scores (Q·Kᵀ, scale, mask) in fp32.
- "fp16-pure": every op in the model dtype, as a naive engine does.
Only "hf" has a fused form; the others force explicit kernels.

Half-precision matmuls on MLX's CPU backend (and only there) run as fp32 GEMM
of the upcast operands, the result rounded to the half type: fp16/bf16 in, fp32
accumulation, fp16/bf16 out. That is what Metal's GEMM does (half tiles, fp32
accumulators) and what transformers does on a CPU, and it is the only way to make
fp16 fast there: MLX's CPU half matmul is a scalar loop (~8x slower than fp32
through BLAS). The linear layers keep their half weights as the parameters
(`Fp32GemmLinear`); on Metal and CUDA nothing changes (`cpu_half_gemm` is False
there). A call of many rows (a prefill of >= UPCAST_PER_CALL_ROWS tokens) upcasts
the weight inside the call: N·K conversions against 2·rows·N·K GEMM flops, one
transient fp32 weight at a time. A call of few rows (a decode step) would spend
more on the conversion than on the GEMM, so the first such call makes an exact
fp32 copy of the weight and keeps it (twice the weight memory, 4.1 GB for
TinyLlama, paid only by runs that decode or prefill short prompts).

Fault injection (see `faults.py`) subclasses Ops and overrides one method.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache, partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import cuda_attention
from .errors import UserError

POLICIES = ("hf", "mixed", "fp16-pure")
KERNELS = ("fused", "explicit")
PROJECTIONS = ("separate", "concatenated")


def mask_value(dtype: mx.Dtype) -> float:
    """transformers' eager causal mask adds the dtype's most negative finite value."""
    return float(mx.finfo(dtype).min)


def _rdiv(numerator: float, x: np.ndarray) -> np.ndarray:
    """numerator / x as torch computes a Python number over a float32 tensor: x's float32
    reciprocal times the number in float32 (not one division: the last bit differs)."""
    return (np.float32(1) / x).astype(np.float32) * np.float32(numerator)


def rope_inv_freq(head_dim: int, theta: float, llama3: tuple | None = None) -> mx.array:
    """1 / theta^(2i/d), bit for bit transformers' float32 values (torch raises a Python number to
    a float32 tensor in double, then rounds). `llama3`: (factor, low_freq_factor, high_freq_factor,
    original context): Llama 3.1's scaling divides the low frequencies (wavelengths above
    original/low) by factor, keeps the high ones (below original/high) and blends the band
    between, each step rounded as transformers rounds it (tests/test_family.py checks the bits)."""
    f32 = np.float32
    exponent = (np.arange(0, head_dim, 2, dtype=np.int64).astype(f32) / f32(head_dim)).astype(f32)
    inv_freq = (f32(1) / (np.float64(theta) ** exponent.astype(np.float64)).astype(f32)).astype(f32)
    if llama3 is not None:
        factor, low, high, original = llama3
        wavelen = _rdiv(2 * np.pi, inv_freq)
        scaled = np.where(wavelen > original / low, (inv_freq / f32(factor)).astype(f32), inv_freq)
        smooth = ((_rdiv(original, wavelen) - f32(low)) / f32(high - low)).astype(f32)
        smoothed = ((f32(1) - smooth) * scaled / f32(factor) + smooth * scaled).astype(f32)
        medium = ~(wavelen < original / high) & ~(wavelen > original / low)
        inv_freq = np.where(medium, smoothed, scaled).astype(f32)
    return mx.array(inv_freq)


@dataclass(frozen=True)
class Rope:
    """RoPE constants of a model: inverse frequencies (transformers' float32 values),
    their reciprocals for mx.fast.rope (divided once, not per call), position scale."""

    inv_freq: mx.array
    freqs: mx.array
    position_scale: float = 1.0

    @classmethod
    def make(cls, head_dim: int, theta: float, position_scale: float = 1.0, llama3: tuple | None = None) -> "Rope":
        inv_freq = rope_inv_freq(head_dim, theta, llama3)
        freqs = 1.0 / inv_freq
        mx.eval(inv_freq, freqs)
        return cls(inv_freq, freqs, position_scale)

    @classmethod
    def from_config(cls, cfg) -> "Rope":
        """The model's RoPE: default, linear (positions / factor) or llama3 (scaled frequencies)."""
        llama3 = None
        if cfg.rope_type == "llama3":
            llama3 = (cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                      cfg.rope_original_max_position)
        scale = 1.0 / cfg.rope_factor if cfg.rope_type == "linear" else 1.0
        rope = cls.make(cfg.head_dim, cfg.rope_theta, scale, llama3)
        if not cfg.rope_freq_factors:
            return rope
        # llama.cpp divides each frequency by its factor (Llama 3 from a GGUF's rope_freqs)
        inv_freq = rope.inv_freq / mx.array(np.array(cfg.rope_freq_factors, np.float32))
        freqs = 1.0 / inv_freq
        mx.eval(inv_freq, freqs)
        return cls(inv_freq, freqs, scale)


def cpu_half_gemm(dtype: mx.Dtype) -> bool:
    """Does a matmul in `dtype` run as fp32 GEMM (a half type on MLX's CPU backend)?"""
    return dtype in (mx.float16, mx.bfloat16) and mx.default_device().type == mx.cpu


def matmul(a: mx.array, b: mx.array) -> mx.array:
    """a @ b; in half precision on the CPU, fp32 GEMM of the upcast operands rounded to a's dtype."""
    if cpu_half_gemm(a.dtype):
        return (a.astype(mx.float32) @ b.astype(mx.float32)).astype(a.dtype)
    return a @ b


# Rows (tokens) from which a half linear layer on the CPU upcasts its weight per call
# instead of keeping an fp32 copy. Measured on a 2-core x86 VM with OpenBLAS
# (scripts/cpu_upcast_cost.py, docs/benchmarks.md): converting a [5632, 2048] weight
# costs about the fp32 GEMM of 150 rows, so per call it adds ~55 % to that layer at
# 512 rows and ~12 % at 2,048; a whole 512-token fp16 prefill of TinyLlama takes 1.13x
# its time with the copies (the attention dominates it) and holds 4.1 GB less.
UPCAST_PER_CALL_ROWS = 512


class Fp32GemmLinear(nn.Module):
    """An nn.Linear (with or without a bias) whose half-precision matmul on the CPU is fp32 GEMM of the upcast
    operands. `weight` stays the model's half-precision parameter. Calls of many rows upcast
    it per call; the first call of fewer than UPCAST_PER_CALL_ROWS rows makes an exact fp32
    copy (`_weight32`, underscore: not a parameter) that every later call reads. Both are
    the same fp32 values, so the result does not depend on which one a call uses."""

    def __init__(self, weight: mx.array, bias: mx.array | None = None):
        super().__init__()
        self.weight = weight
        if bias is not None:  # Qwen2's q/k/v: added in fp32 before the one rounding, as a CPU addmm does
            self.bias = bias
        self._weight32 = None  # made on the first few-row call (`weight32`)
        self._weight32_of = None  # the weight it is a copy of: a replaced weight gets a new copy

    @property
    def has_weight32(self) -> bool:
        return self._weight32 is not None and self._weight32_of is self.weight

    def weight32(self, rows: int) -> mx.array:
        """The weight in fp32 for a call of `rows` rows: the kept copy if there is one, else a
        per-call upcast (many rows) or a new kept copy (few rows)."""
        if self.has_weight32:
            return self._weight32
        self._weight32 = None  # a copy of a replaced weight is not kept alive
        w32 = self.weight.astype(mx.float32)
        if rows >= UPCAST_PER_CALL_ROWS:
            return w32  # transient: freed with this call's graph
        mx.eval(w32)  # a constant, also when a compiled decode step is being traced (decode.py)
        self._weight32, self._weight32_of = w32, self.weight
        return w32

    def __call__(self, x: mx.array) -> mx.array:
        bias = self.bias if "bias" in self else None
        if cpu_half_gemm(x.dtype):
            rows = x.size // x.shape[-1]
            y = x.astype(mx.float32) @ self.weight32(rows).T
            return (y if bias is None else y + bias.astype(mx.float32)).astype(x.dtype)
        return x @ self.weight.T if bias is None else mx.addmm(bias, x, self.weight.T)


def use_fp32_gemm(model: nn.Module) -> int:
    """Replace every nn.Linear of `model` by an Fp32GemmLinear on the same weight
    (call it when `cpu_half_gemm(weight dtype)`; no fp32 copy is made here); returns how many
    were replaced."""
    n = 0
    for parent in model.modules():
        for key, child in list(parent.children().items()):
            if type(child) is nn.Linear:
                setattr(parent, key, Fp32GemmLinear(child.weight, child.bias if "bias" in child else None))
                n += 1
    return n


def fp32_weight_copies(model: nn.Module) -> int:
    """Bytes held by the fp32 weight copies of `model`'s Fp32GemmLinear layers."""
    return sum(m._weight32.nbytes for m in model.modules() if isinstance(m, Fp32GemmLinear) and m.has_weight32)


@partial(mx.compile, shapeless=True)
def _silu(x: mx.array) -> mx.array:
    return silu_fp32(x)  # one fused kernel; the same arithmetic as the explicit form


@partial(mx.compile, shapeless=True)
def _swiglu(gate: mx.array, up: mx.array) -> mx.array:
    return silu_fp32(gate) * up  # SiLU(gate) × up in one kernel, each step rounded as unfused


def silu_fp32(x: mx.array) -> mx.array:
    """SiLU computed in fp32 and rounded once to x's dtype, as torch's silu does in half
    precision (x * sigmoid(x) in fp16 rounds twice: ~10 % more error downstream)."""
    x32 = x.astype(mx.float32)
    return (x32 * mx.sigmoid(x32)).astype(x.dtype)


@lru_cache(maxsize=8)
def _causal_mask(T: int, S: int, dtype: mx.Dtype, window: int = 0) -> mx.array:
    """One mask per shape, shared by every layer of a forward pass (and the next one of the same
    length): five kernels once instead of in each of 22 layers. `window` > 0 also hides the keys
    `window` or more positions behind the query (a sliding window, as transformers' Mistral)."""
    rows = mx.arange(S - T, S)[:, None]
    cols = mx.arange(S)[None, :]
    hidden = cols > rows
    if window:
        hidden = hidden | (cols <= rows - window)
    mask = mx.where(hidden, mx.array(mask_value(dtype), dtype), mx.array(0, dtype))
    mx.eval(mask)
    return mask


def rotate_half(x: mx.array) -> mx.array:
    half = x.shape[-1] // 2
    return mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)


_INTERNAL_STEPS = ("qk", "scale", "add_mask", "causal_mask", "softmax", "scores_dtype")


@dataclass(frozen=True)
class Ops:
    policy: str = "hf"
    kernels: str = "fused"
    # "concatenated": q/k/v and gate/up as one matmul each, where the model holds the concatenated
    # weights (decode.concatenate_projections): fewer kernel launches for a GPU decode step.
    projections: str = "separate"

    def __post_init__(self):  # the one check of these names, for the CLI (sources.make_ops) and callers alike
        if self.projections not in PROJECTIONS:
            raise UserError(f"unknown projections {self.projections!r}; choose one of {', '.join(PROJECTIONS)}")
        if self.policy not in POLICIES:
            raise UserError(f"unknown precision policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.kernels not in KERNELS:
            raise UserError(f"unknown kernels {self.kernels!r}; choose one of {', '.join(KERNELS)}")
        if self.policy != "hf" and self.kernels == "fused":
            raise UserError(f"policy {self.policy!r} runs on explicit kernels only (fused kernels follow the 'hf' "
                            "policy)")

    @property
    def fused(self) -> bool:
        return self.kernels == "fused"

    # --- RMSNorm -----------------------------------------------------------
    def rms_norm(self, x: mx.array, weight: mx.array, eps: float) -> mx.array:
        if self.fused:
            return mx.fast.rms_norm(x, weight, eps)
        if self.policy == "fp16-pure":
            variance = mx.mean(x * x, axis=-1, keepdims=True)  # x*x overflows in fp16 above 256
            return weight * (x * mx.rsqrt(variance + mx.array(eps, x.dtype)))
        # transformers: statistics in fp32, cast back to the input dtype, then × weight.
        x32 = x.astype(mx.float32)
        variance = mx.mean(mx.square(x32), axis=-1, keepdims=True)
        return weight * (x32 * mx.rsqrt(variance + eps)).astype(x.dtype)

    # --- RoPE (rotate-half, as transformers) -----------------------------------
    def rope(self, x: mx.array, offset: int, rope: Rope) -> mx.array:
        """x: [B, heads, T, D] at positions offset .. offset+T-1."""
        if self.fused:
            return mx.fast.rope(x, x.shape[-1], traditional=False, base=None, scale=rope.position_scale,
                                offset=offset, freqs=rope.freqs)
        cos, sin = self.rope_cos_sin(x.shape[-2], offset, rope.inv_freq, rope.position_scale, x.dtype)
        return x * cos + rotate_half(x) * sin

    def rope_cos_sin(self, T: int, offset: int, inv_freq, position_scale, dtype):
        """cos/sin in fp32, then cast to the model dtype (transformers' LlamaRotaryEmbedding)."""
        positions = (mx.arange(T) + offset).astype(mx.float32) * position_scale  # offset: int or array
        freqs = positions[:, None] * inv_freq[None, :]
        emb = mx.concatenate([freqs, freqs], axis=-1)
        return mx.cos(emb).astype(dtype), mx.sin(emb).astype(dtype)

    # --- attention ------------------------------------------------------------
    def causal_mask(self, T: int, S: int, dtype: mx.Dtype, window: int = 0) -> mx.array | None:
        """Additive [T, S] mask: query t (absolute position S-T+t) sees keys 0..S-T+t, and with a
        sliding `window` only the last `window` of them."""
        if T == 1 and not (window and S > window):
            return None
        return _causal_mask(T, S, dtype, window if window and S > window else 0)

    def scores_dtype(self, dtype: mx.Dtype) -> mx.Dtype:
        return mx.float32 if self.policy == "mixed" else dtype

    def qk(self, q: mx.array, k: mx.array) -> mx.array:
        """Q·Kᵀ with GQA: q [B, H, T, D], k [B, KV, S, D] -> [B, H, T, S]; head h uses KV head h // n_rep."""
        B, H, T, D = q.shape
        KV = k.shape[1]
        dt = self.scores_dtype(q.dtype)
        qg = q.astype(dt).reshape(B, KV, H // KV, T, D)
        kg = k.astype(dt)[:, :, None]
        return matmul(qg, kg.swapaxes(-1, -2)).reshape(B, H, T, k.shape[2])

    def scale(self, scores: mx.array, scale: float) -> mx.array:
        return scores * mx.array(scale, scores.dtype)

    def add_mask(self, scores: mx.array, T: int, S: int, visible: mx.array | None = None,
                 window: int = 0) -> mx.array:
        """+ the causal mask; `visible` [.., S] (a fixed-capacity cache's written slots, within the
        window) masks the rest too."""
        w = 0 if visible is not None else window
        # Three arguments when there is no window: fault subclasses (faults.py) override the 3-argument form.
        mask = self.causal_mask(T, S, scores.dtype, w) if w else self.causal_mask(T, S, scores.dtype)
        if visible is not None:
            hidden = mx.where(visible, mx.array(0, scores.dtype), mx.array(mask_value(scores.dtype), scores.dtype))
            mask = hidden if mask is None else mx.minimum(mask, hidden)
        return scores if mask is None else scores + mask

    def softmax(self, scores: mx.array, out_dtype: mx.Dtype) -> mx.array:
        if self.policy == "fp16-pure":
            m = mx.max(scores, axis=-1, keepdims=True)
            e = mx.exp(scores - m)
            return (e / mx.sum(e, axis=-1, keepdims=True)).astype(out_dtype)
        return mx.softmax(scores.astype(mx.float32), axis=-1).astype(out_dtype)

    def pv(self, probs: mx.array, v: mx.array) -> mx.array:
        """probs [B, H, T, S] · v [B, KV, S, D] -> [B, H, T, D] (same GQA grouping as qk)."""
        B, H, T, S = probs.shape
        KV, D = v.shape[1], v.shape[3]
        out = matmul(probs.reshape(B, KV, H // KV, T, S), v[:, :, None])
        return out.reshape(B, H, T, D)

    def fused_attention(self, q, k, v, scale: float, visible: mx.array | None = None, window: int = 0) -> mx.array:
        """`visible` [1, 1, 1, S] (boolean, True = attend): the fixed-capacity cache's written slots
        (within the window); `window`: a sliding window of keys, as an additive mask once it hides any."""
        T, S = q.shape[2], k.shape[2]
        if visible is None and window and S > window:
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=_causal_mask(T, S, q.dtype, window))
        if visible is not None:
            if T > 1:
                raise ValueError("a visibility mask is for single-token steps")
            if cuda_attention.available():  # MLX's CUDA SDPA has no one-kernel path with an array mask
                return cuda_attention.masked_decode_attention(q, k, v, scale, visible)
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=visible)
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal" if T > 1 else None)

    def observed_internals(self, q, k, scale: float, visible: mx.array | None = None, window: int = 0):
        """The fused path's observed scores, scaled and masked scores and probs in one CUDA kernel
        (cuda_attention.attention_internals: the roundings of qk/scale/add_mask/softmax), or None
        where that does not apply: off CUDA, with a visibility mask, another policy, or an Ops
        subclass that changes one of those steps (a fault must be seen as written)."""
        if not (self.fused and self.policy == "hf" and visible is None and cuda_attention.available()) \
                or (window and k.shape[2] > window):  # the kernel knows the causal mask only
            return None
        if any(getattr(type(self), m) is not getattr(Ops, m) for m in _INTERNAL_STEPS):
            return None
        return cuda_attention.attention_internals(q, k, scale, mask_value(q.dtype))

    # --- MLP ------------------------------------------------------------------
    def silu(self, x: mx.array) -> mx.array:
        if self.policy == "fp16-pure":
            return x * mx.sigmoid(x)
        return _silu(x) if self.fused else silu_fp32(x)

    def swiglu(self, gate: mx.array, up: mx.array) -> mx.array:
        """SiLU(gate) × up. Fused: one kernel; explicit: the two steps, each rounded."""
        if self.fused:
            return _swiglu(gate, up)
        return self.silu(gate) * up

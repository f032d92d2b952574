"""The sub-operations of the forward pass, under a precision policy.

`Ops` is the one place where "how is this step computed" is decided:
- kernels="fused": MLX's fused kernels (mx.fast.rms_norm, mx.fast.rope,
  mx.fast.scaled_dot_product_attention): the fast path.
- kernels="explicit": every sub-operation as separate MLX ops, in the order and
  precision transformers uses, so each one can be tapped (and faulted).

Precision policies (what runs in float32 when the model runs in fp16/bf16):
- "hf":        transformers' policy: RMSNorm statistics and softmax in fp32.
- "mixed":     "hf" plus the attention scores (Q·Kᵀ, scale, mask) in fp32.
- "fp16-pure": every op in the model dtype, as a naive engine does.
Only "hf" has a fused form; the others force explicit kernels.

Fault injection (see `faults.py`) subclasses Ops and overrides one method.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import numpy as np

POLICIES = ("hf", "mixed", "fp16-pure")
KERNELS = ("fused", "explicit")


def mask_value(dtype: mx.Dtype) -> float:
    """transformers' eager causal mask adds the dtype's most negative finite value."""
    return float(mx.finfo(dtype).min)


def rope_inv_freq(head_dim: int, theta: float) -> mx.array:
    """1 / theta^(2i/d) in float32, as transformers' default RoPE computes it."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return mx.array((1.0 / (np.float32(theta) ** exponent)).astype(np.float32))


@dataclass(frozen=True)
class Rope:
    """RoPE constants of a model: inverse frequencies (transformers' float32 values),
    their reciprocals for mx.fast.rope (divided once, not per call), position scale."""

    inv_freq: mx.array
    freqs: mx.array
    position_scale: float = 1.0

    @classmethod
    def make(cls, head_dim: int, theta: float, position_scale: float = 1.0) -> "Rope":
        inv_freq = rope_inv_freq(head_dim, theta)
        freqs = 1.0 / inv_freq
        mx.eval(inv_freq, freqs)
        return cls(inv_freq, freqs, position_scale)


@partial(mx.compile, shapeless=True)
def _silu(x: mx.array) -> mx.array:
    return x * mx.sigmoid(x)  # one fused kernel; the same arithmetic as the explicit form


@partial(mx.compile, shapeless=True)
def _swiglu(gate: mx.array, up: mx.array) -> mx.array:
    return (gate * mx.sigmoid(gate)) * up  # SiLU(gate) × up in one kernel, each step rounded as unfused


def rotate_half(x: mx.array) -> mx.array:
    half = x.shape[-1] // 2
    return mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)


@dataclass(frozen=True)
class Ops:
    policy: str = "hf"
    kernels: str = "fused"

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy {self.policy!r} not in {POLICIES}")
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels {self.kernels!r} not in {KERNELS}")
        if self.policy != "hf" and self.kernels == "fused":
            raise ValueError(f"policy {self.policy!r} needs kernels='explicit'")

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
        positions = mx.arange(offset, offset + T, dtype=mx.float32) * position_scale
        freqs = positions[:, None] * inv_freq[None, :]
        emb = mx.concatenate([freqs, freqs], axis=-1)
        return mx.cos(emb).astype(dtype), mx.sin(emb).astype(dtype)

    # --- attention ------------------------------------------------------------
    def causal_mask(self, T: int, S: int, dtype: mx.Dtype) -> mx.array | None:
        """Additive [T, S] mask: query t (absolute position S-T+t) sees keys 0..S-T+t."""
        if T == 1:
            return None
        rows = mx.arange(S - T, S)[:, None]
        cols = mx.arange(S)[None, :]
        return mx.where(cols > rows, mx.array(mask_value(dtype), dtype), mx.array(0, dtype))

    def scores_dtype(self, dtype: mx.Dtype) -> mx.Dtype:
        return mx.float32 if self.policy == "mixed" else dtype

    def qk(self, q: mx.array, k: mx.array) -> mx.array:
        """Q·Kᵀ with GQA: q [B, H, T, D], k [B, KV, S, D] -> [B, H, T, S]; head h uses KV head h // n_rep."""
        B, H, T, D = q.shape
        KV = k.shape[1]
        dt = self.scores_dtype(q.dtype)
        qg = q.astype(dt).reshape(B, KV, H // KV, T, D)
        kg = k.astype(dt)[:, :, None]
        return (qg @ kg.swapaxes(-1, -2)).reshape(B, H, T, k.shape[2])

    def scale(self, scores: mx.array, scale: float) -> mx.array:
        return scores * mx.array(scale, scores.dtype)

    def add_mask(self, scores: mx.array, T: int, S: int) -> mx.array:
        mask = self.causal_mask(T, S, scores.dtype)
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
        out = probs.reshape(B, KV, H // KV, T, S) @ v[:, :, None]
        return out.reshape(B, H, T, D)

    def fused_attention(self, q, k, v, scale: float) -> mx.array:
        T = q.shape[2]
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal" if T > 1 else None)

    # --- MLP ------------------------------------------------------------------
    def silu(self, x: mx.array) -> mx.array:
        return _silu(x) if self.fused else x * mx.sigmoid(x)

    def swiglu(self, gate: mx.array, up: mx.array) -> mx.array:
        """SiLU(gate) × up. Fused: one kernel; explicit: the two steps, each rounded."""
        if self.fused:
            return _swiglu(gate, up)
        return self.silu(gate) * up

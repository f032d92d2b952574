"""Deliberate faults, one sub-operation each, to prove that the comparison tools
find the stage where an engine goes wrong.

Each fault is an `Ops` subclass that overrides one method (so it always runs on
explicit kernels), or a KV cache that misbehaves. These are the mistakes real
engines make: the softmax over the wrong axis, interleaved-pair RoPE on
rotate-half weights, RoPE positions off by one, a causal mask off by one or
missing, the wrong query-head -> KV-head mapping, a cache that loses an entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from .errors import UserError
from .ops import Ops


@dataclass(frozen=True)
class SoftmaxAxis(Ops):
    def softmax(self, scores, out_dtype):
        return mx.softmax(scores.astype(mx.float32), axis=-2).astype(out_dtype)  # over queries, not keys


@dataclass(frozen=True)
class RopeInterleaved(Ops):
    def rope(self, x, offset, rope):
        return mx.fast.rope(x, x.shape[-1], traditional=True, base=None, scale=rope.position_scale,
                            offset=offset, freqs=rope.freqs)  # GGML-style pairs on HF-layout weights


@dataclass(frozen=True)
class RopeOffset(Ops):
    def rope(self, x, offset, rope):
        return super().rope(x, offset + 1, rope)  # positions start at 1, not 0


@dataclass(frozen=True)
class DecodeRopeOffset(Ops):
    """RoPE one position late whenever a cache offset is non-zero: decode steps use the
    wrong position while the prefill is right. (`RopeOffset`, which shifts every path, is
    invisible to the paths check: RoPE is relative, both paths shift alike.)"""

    def rope(self, x, offset, rope):
        return super().rope(x, mx.where(offset > 0, offset + 1, 0) if isinstance(offset, mx.array)
                            else (offset + 1 if offset > 0 else 0), rope)  # array offset: the compiled step


@dataclass(frozen=True)
class MaskOffByOne(Ops):
    def causal_mask(self, T, S, dtype):
        rows = mx.arange(S - T, S)[:, None] + 1  # each query also sees the next token
        cols = mx.arange(S)[None, :]
        return mx.where(cols > rows, mx.array(float(mx.finfo(dtype).min), dtype), mx.array(0, dtype))


@dataclass(frozen=True)
class NoMask(Ops):
    def causal_mask(self, T, S, dtype):
        return None


@dataclass(frozen=True)
class GqaMapping(Ops):
    def qk(self, q, k):
        return super().qk(q, _interleave_kv(k, q.shape[1]))

    def pv(self, probs, v):
        return super().pv(probs, _interleave_kv(v, probs.shape[1]))


def _interleave_kv(k: mx.array, n_heads: int) -> mx.array:
    """Tile KV heads so query head h reads KV head h % n_kv (right: h // n_rep)."""
    reps = n_heads // k.shape[1]
    return mx.concatenate([k] * reps, axis=1)


@dataclass(frozen=True)
class SiluAsGelu(Ops):
    def silu(self, x):
        return x * mx.sigmoid(1.702 * x)  # the GELU approximation in place of SiLU


@dataclass(frozen=True)
class NormNoEps(Ops):
    def rms_norm(self, x, weight, eps):
        return super().rms_norm(x, weight, 0.0) * mx.array(1.0 + 64 * eps, x.dtype)  # eps dropped, off by a scale


OPS_FAULTS = {
    "softmax-axis": (SoftmaxAxis, "layers.0.attn.probs", "softmax over the query axis instead of the key axis"),
    "rope-interleaved": (RopeInterleaved, "layers.0.attn.q_rope", "interleaved-pair RoPE applied to rotate-half (HF) weights"),
    "rope-offset": (RopeOffset, "layers.0.attn.q_rope", "RoPE positions shifted by one"),
    "mask-off-by-one": (MaskOffByOne, "layers.0.attn.scores_masked", "causal mask lets each token see the next one"),
    "no-mask": (NoMask, "layers.0.attn.scores_masked", "no causal mask"),
    "gqa-mapping": (GqaMapping, "layers.0.attn.scores", "query head h uses KV head h % n_kv instead of h // n_rep"),
    "silu-gelu": (SiluAsGelu, "layers.0.mlp.act", "GELU in place of SiLU"),
    "norm-scale": (NormNoEps, "layers.0.attn_norm", "RMSNorm output off by a constant factor"),
}


def inject(model, name: str):
    """Put fault `name` into `model`'s ops (in place); return the expected first divergent tap."""
    if name not in OPS_FAULTS:
        raise UserError(f"unknown fault {name!r}; faults: {', '.join(OPS_FAULTS)}")
    cls, first_tap, _ = OPS_FAULTS[name]
    model.ops = cls(policy=model.ops.policy, kernels="explicit")
    return first_tap


def decode_rope_offset(model) -> None:
    """Put the decode-only RoPE offset into `model`'s ops (in place); caught by the paths check."""
    model.ops = DecodeRopeOffset(policy=model.ops.policy, kernels=model.ops.kernels)


def dropping_caches(model, position: int) -> list:
    """One `DroppingKVCache` per layer: every layer loses the entry at `position`."""
    return [DroppingKVCache(position) for _ in model.layers]


class DroppingKVCache:
    """An mlx-lm KVCache that loses the entry at position `drop` once it has been written."""

    def __init__(self, drop: int):
        from mlx_lm.models.cache import KVCache

        self.inner = KVCache()
        self.drop = drop

    @property
    def offset(self):
        return self.inner.offset

    def update_and_fetch(self, keys, values):
        k, v = self.inner.update_and_fetch(keys, values)
        S = k.shape[2]
        if S > self.drop and keys.shape[2] < S:  # decode steps after the dropped position was cached
            k = mx.concatenate([k[:, :, : self.drop], k[:, :, self.drop + 1:]], axis=2)
            v = mx.concatenate([v[:, :, : self.drop], v[:, :, self.drop + 1:]], axis=2)
        return k, v

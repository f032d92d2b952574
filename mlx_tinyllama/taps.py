"""The canonical tap names: one table that every feature (run, compare, paths,
stability, report, the transformers reference) uses, and the recorder that the
forward pass calls at each stage.

A tap is an identity on the data path: `x = tap("layers.0.attn.q", x)`. With no
tap selected the recorder is `NO_TAPS`, whose call returns its argument and does
nothing else, so instrumentation costs nothing when it is off.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterable

import mlx.core as mx
import numpy as np

from .errors import UserError


@dataclass(frozen=True)
class Stage:
    name: str  # within a layer: "attn.q"; global: "embed"
    shape: str  # symbolic shape, batch dimension dropped
    kind: str  # stage kind for grouping: embed, norm, attention, mlp, residual, head
    what: str  # one line a user reads in tables and hints
    token_axis: int  # which axis of the tap indexes token positions (query positions)


# Forward order. Shapes: T query tokens, S key positions (cache + T), H query heads,
# KV key/value heads, D head_dim, I intermediate, V vocab.
GLOBAL_HEAD = (Stage("embed", "[T, hidden]", "embed", "token embedding lookup", 0),)
LAYER_STAGES = (
    Stage("attn_norm", "[T, hidden]", "norm", "RMSNorm before attention (input_layernorm)", 0),
    Stage("attn.q", "[H, T, D]", "attention", "query projection, split into heads", 1),
    Stage("attn.k", "[KV, T, D]", "attention", "key projection, split into KV heads", 1),
    Stage("attn.v", "[KV, T, D]", "attention", "value projection, split into KV heads", 1),
    Stage("attn.q_rope", "[H, T, D]", "attention", "query after rotary position embedding", 1),
    Stage("attn.k_rope", "[KV, T, D]", "attention", "key after rotary position embedding", 1),
    Stage("attn.scores", "[H, T, S]", "attention", "Q·Kᵀ before scaling (GQA: query head h uses KV head h // n_rep)", 1),
    Stage("attn.scores_scaled", "[H, T, S]", "attention", "scores × 1/sqrt(head_dim)", 1),
    Stage("attn.scores_masked", "[H, T, S]", "attention", "scaled scores + causal mask (dtype minimum above the diagonal)", 1),
    Stage("attn.probs", "[H, T, S]", "attention", "softmax over key positions", 1),
    Stage("attn.context", "[T, H*D]", "attention", "probs·V with heads merged, before o_proj", 0),
    Stage("attn.out", "[T, hidden]", "attention", "o_proj output, before the residual add", 0),
    Stage("resid_mid", "[T, hidden]", "residual", "residual stream after the attention add", 0),
    Stage("mlp_norm", "[T, hidden]", "norm", "RMSNorm before the MLP (post_attention_layernorm)", 0),
    Stage("mlp.gate", "[T, I]", "mlp", "gate_proj output", 0),
    Stage("mlp.up", "[T, I]", "mlp", "up_proj output", 0),
    Stage("mlp.act", "[T, I]", "mlp", "SiLU(gate)", 0),
    Stage("mlp.prod", "[T, I]", "mlp", "SiLU(gate) × up", 0),
    Stage("mlp.down", "[T, hidden]", "mlp", "down_proj output, before the residual add", 0),
    Stage("out", "[T, hidden]", "residual", "decoder layer output (after both residual adds)", 0),
)
GLOBAL_TAIL = (
    Stage("final_norm", "[T, hidden]", "norm", "final RMSNorm (model.norm)", 0),
    Stage("logits", "[T, V]", "head", "lm_head output", 0),
)

# The attention internals that a fused attention kernel does not expose: on the
# fused path they are recomputed from the same q_rope/k_rope for observation.
ATTENTION_INTERNALS = ("attn.scores", "attn.scores_scaled", "attn.scores_masked", "attn.probs")

_BY_SUFFIX = {s.name: s for s in GLOBAL_HEAD + LAYER_STAGES + GLOBAL_TAIL}


def tap_names(num_layers: int) -> list[str]:
    """Every canonical tap name of a model with `num_layers` layers, in forward order."""
    names = [s.name for s in GLOBAL_HEAD]
    for i in range(num_layers):
        names += [f"layers.{i}.{s.name}" for s in LAYER_STAGES]
    names += [s.name for s in GLOBAL_TAIL]
    return names


def split_name(name: str) -> tuple[int | None, str]:
    """`layers.3.attn.q` -> (3, "attn.q"); `logits` -> (None, "logits")."""
    if name.startswith("layers."):
        _, idx, rest = name.split(".", 2)
        return int(idx), rest
    return None, name


def stage_of(name: str) -> Stage:
    return _BY_SUFFIX[split_name(name)[1]]


def select(patterns: Iterable[str], num_layers: int) -> list[str]:
    """Expand glob patterns (`layers.0.*`, `*.attn.probs`, `logits`) to tap names in forward order."""
    names = tap_names(num_layers)
    chosen: set[str] = set()
    for pat in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise UserError(
                f"tap pattern {pat!r} matches no stage. Valid names (layer i in 0..{num_layers - 1}): "
                + ", ".join([s.name for s in GLOBAL_HEAD] + [f"layers.i.{s.name}" for s in LAYER_STAGES]
                            + [s.name for s in GLOBAL_TAIL])
            )
        chosen.update(hits)
    return [n for n in names if n in chosen]


def forward_index(num_layers: int) -> dict[str, int]:
    return {n: k for k, n in enumerate(tap_names(num_layers))}


# ---------------------------------------------------------------------------
# Recording


class NoTaps:
    """Taps off: an identity that the forward pass calls at every stage."""

    enabled = False

    def __call__(self, name: str, x: mx.array) -> mx.array:
        return x

    def wants(self, name: str) -> bool:
        return False


NO_TAPS = NoTaps()


class Taps:
    """Records the selected stages of one forward call.

    mode="stats": per tap a small dict of statistics (computed on the device, one
    host sync at the end); mode="full": the whole tensor (batch dimension dropped).
    `names` are canonical names (use `select` to expand globs).
    """

    enabled = True

    def __init__(self, names: Iterable[str], mode: str = "stats"):
        if mode not in ("stats", "full"):
            raise ValueError(mode)
        self.names = set(names)
        self.mode = mode
        self.tensors: dict[str, mx.array] = {}
        self._pending: dict[str, tuple] = {}
        self.order: list[str] = []

    def wants(self, name: str) -> bool:
        return name in self.names

    def __call__(self, name: str, x: mx.array) -> mx.array:
        if name in self.names:
            value = x[0]  # drop the batch dimension
            self.order.append(name)
            if self.mode == "full":
                self.tensors[name] = value
            else:
                self._pending[name] = (tuple(value.shape), value.dtype, _stats_arrays(value, stage_of(name).token_axis))
        return x

    def stats(self) -> dict[str, dict]:
        """Name -> stats dict (see `tensor_stats`), in the order the taps fired."""
        if self.mode == "full":
            return {n: tensor_stats(self.tensors[n], stage_of(n).token_axis) for n in self.order}
        mx.eval([v[2] for v in self._pending.values()])
        return {n: _stats_to_py(*self._pending[n]) for n in self.order}


def _stats_arrays(x: mx.array, token_axis: int) -> dict[str, mx.array]:
    """Device-side statistics over the finite values of x (NaN/Inf are counted apart)."""
    xf = x.astype(mx.float32)
    nan = mx.isnan(xf)
    inf = mx.isinf(xf)
    finite = mx.logical_not(mx.logical_or(nan, inf))
    n_finite = finite.sum()
    zero = mx.zeros_like(xf)
    xz = mx.where(finite, xf, zero)
    big = mx.array(np.finfo(np.float32).max, dtype=mx.float32)
    n = mx.maximum(n_finite, 1).astype(mx.float32)
    absmax = mx.abs(xz).max()
    # Moments on x / absmax: masked scores hold the float32 minimum, whose plain sum overflows.
    scale = mx.maximum(absmax, mx.array(np.finfo(np.float32).tiny, dtype=mx.float32))
    xs = xz / scale
    mean_s = xs.sum() / n
    var_s = mx.where(finite, (xs - mean_s) ** 2, zero).sum() / n
    first_row = _row(x, token_axis, 0)
    last_row = _row(x, token_axis, -1)
    return {
        "min": mx.where(finite, xf, big).min(),
        "max": mx.where(finite, xf, -big).max(),
        "mean": mean_s * scale,
        "std": mx.sqrt(var_s) * scale,
        "absmax": absmax,
        "sum": mean_s * scale * n,
        "nan": nan.sum(),
        "inf": inf.sum(),
        "finite": n_finite,
        "first": first_row[:3].astype(mx.float32),
        "last": last_row[:3].astype(mx.float32),
    }


def _row(x: mx.array, token_axis: int, t: int) -> mx.array:
    """Row t along the token axis; for head-major taps ([H, T, ...]) of head 0."""
    if x.ndim == 1:
        return x
    if token_axis == 0:
        return x[t].reshape(-1)
    return x[0, t].reshape(-1)


def _stats_to_py(shape, dtype, arrays) -> dict:
    out = {"shape": list(shape), "dtype": str(dtype).replace("mlx.core.", "")}
    for k, v in arrays.items():
        if k in ("first", "last"):
            out[k] = [float(a) for a in v.tolist()]
        elif k in ("nan", "inf", "finite"):
            out[k] = int(v.item())
        else:
            out[k] = float(v.item())
    if out["finite"] == 0:
        for k in ("min", "max", "mean", "std", "absmax", "sum"):
            out[k] = float("nan")
    return out


def tensor_stats(x: mx.array, token_axis: int = 0) -> dict:
    """The stats dict of one tensor (batch dimension already dropped)."""
    arrays = _stats_arrays(x, token_axis)
    mx.eval(list(arrays.values()))
    return _stats_to_py(tuple(x.shape), x.dtype, arrays)

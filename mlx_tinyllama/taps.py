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

    mode="stats": per tap a small dict of statistics; mode="full": the whole
    tensor (batch dimension dropped). `names` are canonical names (use `select`
    to expand globs).

    Statistics are computed in batches: taps of the same shape are stacked and
    reduced together, so a decode step with every stage tapped costs a few dozen
    kernels rather than ~20 per tap (which dominates on a GPU). Pending tensors
    are flushed once they hold `flush_bytes`, which bounds the memory that
    waiting taps keep alive (attention scores of long prompts are large).
    """

    enabled = True

    def __init__(self, names: Iterable[str], mode: str = "stats", flush_bytes: int = 1 << 28):
        if mode not in ("stats", "full"):
            raise ValueError(mode)
        self.names = set(names)
        self.mode = mode
        self.flush_bytes = flush_bytes
        self.tensors: dict[str, mx.array] = {}
        self.order: list[str] = []
        self._pending: list[tuple[str, mx.array]] = []
        self._pending_bytes = 0
        self._batches: list[tuple[list[str], dict[str, mx.array]]] = []

    def wants(self, name: str) -> bool:
        return name in self.names

    def __call__(self, name: str, x: mx.array) -> mx.array:
        if name in self.names:
            value = x[0]  # drop the batch dimension
            self.order.append(name)
            if self.mode == "full":
                self.tensors[name] = value
            else:
                self._pending.append((name, value))
                self._pending_bytes += value.nbytes
                if self._pending_bytes >= self.flush_bytes:
                    self._flush()
        return x

    def _flush(self) -> None:
        groups: dict[tuple, list[tuple[str, mx.array]]] = {}
        for name, value in self._pending:
            key = (tuple(value.shape), value.dtype, stage_of(name).token_axis)
            groups.setdefault(key, []).append((name, value))
        for (shape, dtype, axis), items in groups.items():
            arrays = _batched_stats(mx.stack([v for _, v in items]), axis)
            mx.async_eval(list(arrays.values()))  # start now; the tapped tensors can then be freed
            self._batches.append(([n for n, _ in items], {"shape": shape, "dtype": dtype, **arrays}))
        self._pending, self._pending_bytes = [], 0

    def stats(self) -> dict[str, dict]:
        """Name -> stats dict (see `tensor_stats`), in the order the taps fired."""
        if self.mode == "full":
            return {n: tensor_stats(self.tensors[n], stage_of(n).token_axis) for n in self.order}
        self._flush()
        mx.eval([a for _, arrays in self._batches for k, a in arrays.items() if k not in ("shape", "dtype")])
        out = {}
        for names, arrays in self._batches:
            out.update(_batch_to_py(names, arrays))
        return {n: out[n] for n in self.order}


_STAT_KEYS = ("min", "max", "mean", "std", "absmax", "sum", "nan", "inf", "finite", "first", "last")


def _batched_stats(x: mx.array, token_axis: int) -> dict[str, mx.array]:
    """Statistics of each x[i] over its finite values (NaN/Inf counted apart); x: [n, *tap shape]."""
    n = x.shape[0]
    if x.ndim == 1:
        x = x[:, None]
    first, last = _rows(x, token_axis)
    flat = x.reshape(n, -1)
    return dict(zip(_STAT_KEYS, _moments(flat) + (first, last)))


@mx.compile
def _moments(x: mx.array):
    """Moments on x / absmax: masked scores hold the float32 minimum, whose plain sum overflows."""
    xf = x.astype(mx.float32)
    nan = mx.isnan(xf)
    inf = mx.isinf(xf)
    finite = mx.logical_not(mx.logical_or(nan, inf))
    n_finite = finite.sum(axis=1)
    zero = mx.zeros_like(xf)
    xz = mx.where(finite, xf, zero)
    big = mx.array(np.finfo(np.float32).max, dtype=mx.float32)
    count = mx.maximum(n_finite, 1).astype(mx.float32)
    absmax = mx.abs(xz).max(axis=1)
    scale = mx.maximum(absmax, mx.array(np.finfo(np.float32).tiny, dtype=mx.float32))
    xs = xz / scale[:, None]
    mean_s = xs.sum(axis=1) / count
    var_s = mx.where(finite, (xs - mean_s[:, None]) ** 2, zero).sum(axis=1) / count
    return (mx.where(finite, xf, big).min(axis=1), mx.where(finite, xf, -big).max(axis=1), mean_s * scale,
            mx.sqrt(var_s) * scale, absmax, mean_s * scale * count, nan.sum(axis=1), inf.sum(axis=1), n_finite)


def _rows(x: mx.array, token_axis: int) -> tuple[mx.array, mx.array]:
    """First 3 values of the first and last token rows; head-major taps ([n, H, T, ...]) of head 0."""
    if x.ndim == 2:
        return x[:, :3].astype(mx.float32), x[:, :3].astype(mx.float32)
    if token_axis == 0:
        first, last = x[:, 0], x[:, -1]
    else:
        first, last = x[:, 0, 0], x[:, 0, -1]
    n = x.shape[0]
    return first.reshape(n, -1)[:, :3].astype(mx.float32), last.reshape(n, -1)[:, :3].astype(mx.float32)


def _batch_to_py(names: list[str], arrays: dict) -> dict[str, dict]:
    values = {k: arrays[k].tolist() for k in _STAT_KEYS}
    out = {}
    for i, name in enumerate(names):
        d = {"shape": list(arrays["shape"]), "dtype": str(arrays["dtype"]).replace("mlx.core.", "")}
        for k in _STAT_KEYS:
            v = values[k][i]
            d[k] = [float(a) for a in v] if k in ("first", "last") else (
                int(v) if k in ("nan", "inf", "finite") else float(v))
        if d["finite"] == 0:
            for k in ("min", "max", "mean", "std", "absmax", "sum"):
                d[k] = float("nan")
        out[name] = d
    return out


def tensor_stats(x: mx.array, token_axis: int = 0) -> dict:
    """The stats dict of one tensor (batch dimension already dropped)."""
    arrays = _batched_stats(x[None], token_axis)
    mx.eval(list(arrays.values()))
    return _batch_to_py(["x"], {"shape": tuple(x.shape), "dtype": x.dtype, **arrays})["x"]

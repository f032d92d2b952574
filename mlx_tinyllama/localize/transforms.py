"""The library of layout and semantics transformations that diagnosis tries on a diverging stage:
each turns their tensor (a layout mistake in how it was written) or our op (a semantic mistake
in how they computed it) into the other, and when the two then match, the transformation names
the mistake. docs/compare.md lists them; tests/test_localize.py injects each one's fault.

A transform gets a `Case` (the stage, their tensor, ours from the same inputs, those inputs,
the ops to recompute with) and returns candidate pairs (ID, a, b): a stands for their side,
b for ours. Parametrised IDs carry their parameter: `rope_offset:2`, `mask_offset:-1`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

import itertools

from ..stages import HEAD_AXES, Stage, inputs_of, split_name, stage_of

OFFSETS = [k for k in range(-8, 9) if k]


@dataclass
class Case:
    tap: str
    theirs: np.ndarray
    ours: np.ndarray  # ours from their inputs (replay), or the reference's tensor
    inputs: list[np.ndarray] | None  # the op's inputs (theirs, or the reference's), None when unknown
    ops: object | None  # replay.StageOps for recomputing the op with a variant
    cfg: object  # ModelConfig
    upstream: dict[str, np.ndarray] | None = None  # their canonical tensors, for variants that reach back

    @property
    def stage(self) -> str:
        return split_name(self.tap)[1]

    def variant(self, **kw) -> np.ndarray | None:
        if self.ops is None or self.inputs is None:
            return None
        try:
            return self.ops.run(self.tap, self.inputs, **kw)
        except (ValueError, IndexError):  # inputs that do not fit this op (a decode step without its cache)
            return None


@dataclass(frozen=True)
class Transform:
    id: str
    group: str  # layout | rope | attention | tokens and precision
    where: Callable[[Stage], bool]  # the stages it applies to, by their registry facts
    words: str  # what a match means, said to the user ({k}: the parameter)
    pairs: Callable[[Case], list[tuple[str, np.ndarray, np.ndarray]]]
    dtype: str | None = None  # judge the match with this dtype's tolerance (fp16_rounding)

    def applies(self, tap: str) -> bool:
        return self.where(stage_of(tap))


def _any(s: Stage) -> bool:
    return True


def _op_is(*ops: str) -> Callable[[Stage], bool]:
    return lambda s: s.op in ops


def _op(tid: str, **kw):
    def pairs(c: Case):
        v = c.variant(**kw)
        return [] if v is None or v.shape != c.theirs.shape else [(tid, c.theirs, v)]
    return pairs


def _op_offsets(tid: str, key: str, extra=lambda c: []):
    def pairs(c: Case):
        out = []
        for k in OFFSETS + [k for k in extra(c) if k not in OFFSETS and k]:
            v = c.variant(**{key: k})
            if v is not None and v.shape == c.theirs.shape:
                out.append((f"{tid}:{k}", c.theirs, v))
        return out
    return pairs


def _transpose(c: Case):
    x = c.theirs
    return [("transpose", x.reshape(x.shape[::-1]).T, c.ours)] if x.ndim == 2 else []


def _ggml_dim_order(c: Case):
    x = c.theirs
    if x.ndim != 3:
        return []
    heads, tokens, d = x.shape
    return [("ggml_dim_order", x.reshape(tokens, heads, d).transpose(1, 0, 2), c.ours)]


def _axis_orders(c: Case):
    """Their buffer holds the tensor with its axes in another order, under the canonical shape: for
    every order but the two with their own ID (2-D: transpose; [tokens, heads, ...]: ggml_dim_order)."""
    x, dims = c.theirs, stage_of(c.tap).dims
    if x.ndim < 3 or x.ndim != len(dims):
        return []
    out = []
    for p in itertools.permutations(range(x.ndim)):
        if p == tuple(range(x.ndim)) or (p[:2] == (1, 0) and dims[0] in HEAD_AXES and p[2:] == tuple(range(2, x.ndim))):
            continue
        back = x.reshape([x.shape[i] for i in p]).transpose(np.argsort(p))
        out.append(("axis_order:" + ",".join(dims[i] for i in p), back, c.ours))
    return out


def group_major(H: int, KV: int) -> np.ndarray:
    """Position r*KV + kv of a group-major head order holds head kv*n_rep + r (KV-major, ours)."""
    n_rep = H // KV
    return np.array([kv * n_rep + r for r in range(n_rep) for kv in range(KV)])


def _heads_group_major(c: Case):
    H, KV = c.cfg.num_attention_heads, c.cfg.num_key_value_heads
    if KV in (1, H):
        return []
    order, x = group_major(H, KV), c.theirs
    back = np.empty_like(x)
    if stage_of(c.tap).dims[0] == "head" and x.shape[0] == H:
        back[order] = x
    elif x.ndim == 2 and x.shape[1] % H == 0:
        t = x.shape[0]
        back = back.reshape(t, H, -1)
        back[:, order] = x.reshape(t, H, -1)
        back = back.reshape(x.shape)
    else:
        return []
    return [("heads_group_major", back, c.ours)]


def _scores_already_scaled(c: Case):
    return [("scores_already_scaled", c.theirs, (c.ours * np.float32(c.cfg.attn_scale)).astype(np.float32))]


def _heads_order(c: Case):
    x = c.theirs
    H, D = c.cfg.num_attention_heads, c.cfg.head_dim
    if x.ndim != 2 or x.shape[1] != H * D:
        return []
    T = x.shape[0]
    return [("heads_order", x.reshape(T, D, H).transpose(0, 2, 1).reshape(T, H * D), c.ours),
            ("heads_order", x.reshape(T, H, D)[:, ::-1].reshape(T, H * D), c.ours)]


KV_OPS = ("qk", "pv", "repeat_kv")  # the ops that map query heads to KV heads (StageOps' kv_map)
THROUGH = KV_OPS + ("rope", "scale", "mask", "softmax")  # recomputed when not dumped, for a variant upstream


def _reach_back(c: Case, tap: str, kw: dict, depth: int = 0):
    """Ours at `tap` from their dumped tensors, with `kw` applied at every op that maps heads to KV
    heads; an attention input they did not dump is recomputed the same way. None when an input is
    unknown or does not fit, or when no such op was recomputed (the variant would change nothing)."""
    st = stage_of(tap)
    if c.ops is None or depth > 8 or st.op not in THROUGH:
        return None
    vals, varied = [], st.op in KV_OPS
    for i in inputs_of(tap, c.cfg.num_hidden_layers):
        v = (c.upstream or {}).get(i)
        if v is None:
            v = _reach_back(c, i, kw, depth + 1)
            if v is None:
                return None
            v, inner = v
            varied = varied or inner
        vals.append(v)
    if not varied:
        return None
    try:
        return c.ops.run(tap, vals, **(kw if st.op in KV_OPS else {})), True
    except (ValueError, IndexError):
        return None


def _kv_head_mapping(c: Case):
    H, KV = c.cfg.num_attention_heads, c.cfg.num_key_value_heads
    modulo = np.arange(H) % KV
    if KV == H or np.array_equal(modulo, np.arange(H) // (H // KV)):
        return []
    back = _reach_back(c, c.tap, {"kv_map": modulo}) if c.upstream is not None else None
    found = [c.variant(kv_map=modulo) if stage_of(c.tap).op in KV_OPS else None, back[0] if back else None]
    return [("kv_head_mapping", c.theirs, v) for v in found if v is not None and v.shape == c.theirs.shape]


def _bos_shift(c: Case):
    x, ref = c.theirs, c.ours
    if stage_of(c.tap).token_axis != 0 or x.shape[0] < 2:
        return []
    return [("bos_shift", x[1:], ref[:-1])]  # their row t holds our row t-1: one token late


def _fp16_rounding(c: Case):
    x = np.asarray(c.theirs, np.float64)
    finite = np.isfinite(x)
    with np.errstate(over="ignore"):
        theirs_half = np.array_equal(x[finite], x[finite].astype(np.float16).astype(np.float64))
        ours = np.asarray(c.ours, np.float64)
        ours_half = np.array_equal(ours[np.isfinite(ours)], ours[np.isfinite(ours)].astype(np.float16))
    if not theirs_half or ours_half:  # only informative when their values are all on the fp16 grid, ours not
        return []
    return [("fp16_rounding", c.theirs, c.ours)]


def _double_scale(c: Case):
    s = c.cfg.attn_scale
    return _op("double_scale", scale=s * s)(c)


def _positions_restart(c: Case):
    pos = getattr(c.ops, "position", 0) or 0
    return [-pos] if pos else []


TRANSFORMS: tuple[Transform, ...] = (
    Transform("transpose", "layout", _any,
              "the values are right but written transposed: a column-major buffer under the row-major shape",
              _transpose),
    Transform("ggml_dim_order", "layout", lambda s: len(s.dims) == 3 and s.head_major,
              "the values are right but the buffer is in ggml's [tokens, heads, head_dim] order under the "
              "shape [heads, tokens, head_dim]", _ggml_dim_order),
    Transform("axis_order", "layout", lambda s: len(s.dims) >= 3,
              "the values are right but the buffer holds the axes in the order [{k}] under the canonical shape "
              "(a transpose of two axes, per head too, or ggml's reversed ne order)", _axis_orders),
    Transform("heads_group_major", "layout", lambda s: (s.dims[0] == "head" and s.op != "repeat_kv")
              or "head*dim" in s.dims,
              "the query heads are in group-major order (position r*n_kv_heads + g holds head g*n_rep + r): "
              "the heads of one KV group are not adjacent", _heads_group_major),
    Transform("heads_order", "layout", lambda s: "head*dim" in s.dims,
              "the heads are merged in another order (head_dim-major, or heads reversed) before o_proj",
              _heads_order),
    Transform("rope_interleaved", "rope", _op_is("rope"),
              "RoPE rotates interleaved pairs (x[2i], x[2i+1]) (GPT-J/ggml style) where the weights expect "
              "rotate-half pairs (x[i], x[i+D/2])", _op("rope_interleaved", interleaved=True)),
    Transform("rope_offset", "rope", _op_is("rope"),
              "RoPE uses positions shifted by {k} (positions start at the wrong value, or are not advanced "
              "in decode)", _op_offsets("rope_offset", "rope_offset", _positions_restart)),
    Transform("missing_scale", "attention", _op_is("scale"),
              "the scores are not multiplied by 1/sqrt(head_dim)", _op("missing_scale", scale=1.0)),
    Transform("double_scale", "attention", _op_is("scale"),
              "the scores are multiplied by 1/sqrt(head_dim) twice (1/head_dim)", _double_scale),
    Transform("softmax_axis", "attention", _op_is("softmax"),
              "the softmax runs over the query axis instead of the key axis", _op("softmax_axis", softmax_axis=-2)),
    Transform("mask_off", "attention", _op_is("mask"),
              "no causal mask: every query sees every key", _op("mask_off", mask_off=True)),
    Transform("mask_offset", "attention", _op_is("mask"),
              "the causal mask is shifted by {k}: query t sees keys up to t{k:+d}",
              _op_offsets("mask_offset", "mask_shift")),
    Transform("scores_already_scaled", "attention", _op_is("qk"),
              "these are the scaled scores Q·Kᵀ/sqrt(head_dim), given as the unscaled attn.scores (an exporter's "
              "scaled MatMul, as ONNX Runtime's): map them to attn.scores_scaled", _scores_already_scaled),
    Transform("kv_head_mapping", "attention", _op_is(*KV_OPS, "scale", "mask", "softmax"),
              "query head h reads KV head h % n_kv_heads; grouped-query attention needs h // (n_heads / n_kv_heads)",
              _kv_head_mapping),
    Transform("bos_shift", "tokens and precision", _any,
              "every token row is one position late: an extra BOS (or a shifted id buffer) went in first",
              _bos_shift),
    Transform("fp16_rounding", "tokens and precision", _any,
              "the values are right to float16 precision: this stage is computed or stored in float16 while the "
              "dump says {dtype} (give --against-dtype float16 if that is intended)", _fp16_rounding,
              dtype="float16"),
)

BY_ID = {t.id: t for t in TRANSFORMS}


def words(tid: str, dtype: str | None = None) -> str:
    """The plain-language meaning of a (possibly parametrised) transform ID."""
    base, _, k = tid.partition(":")
    text = BY_ID[base].words
    param = int(k) if k.lstrip("-").isdigit() else (k or 0)
    return text.format(k=param, dtype=dtype or "float32")

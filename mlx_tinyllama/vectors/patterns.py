"""Failure patterns of a kernel vector: errorshape's shapes (the ones `compare` names on a stage)
read on one op's output.

A kernel vector has no tap name, so this module says which of its axes are token rows and heads
(per op, from the manifest's layouts) and what to call the kernel; errorshape does the reading.
Two things only a kernel vector can show are added there too, as shared primitives: the output of
a known mistake recomputed on the case's own inputs (`check.hypotheses`: RoPE one position late,
no causal mask, ...; errorshape.explain_alternative) and a small dense error that grows with the
reduction length across an op's cases (errorshape.accumulation). docs/vectors.md lists the names.

`label` is the name a `vectors check` row reports: the shared name, with the boundary where the
shape has one (`rows_zero_from:32`, `last_partial_tile:16`, `columns_from:48`).
"""

from __future__ import annotations

import math

import numpy as np

from .. import errorshape
from ..errorshape import Pattern
from ..metrics import metrics
from ..stages import Stage, all_stages

# (token axis, head axis) of each op's output. Activations are [T, features]; attention tensors
# are [heads, T, head_dim or keys] (docs/vectors.md, "Running your kernels on them").
AXES = {"matmul": (0, None), "rms_norm": (0, None), "silu": (0, None), "swiglu": (0, None), "add": (0, None),
        "embedding": (0, None), "rope": (1, 0), "scores": (1, 0), "softmax": (1, 0), "sdpa": (1, 0)}
# The names only a kernel vector gives: a recomputed mistake, or nothing found.
OWN = ("wrong_offset", "mask_missing", "unclassified")
# Where the boundary of a shape is, for its label.
BOUNDARY = {"rows_zero_from": "first_wrong_row", "rows_stale_from": "first_wrong_row",
            "rows_wrong_from": "first_wrong_row", "rows_nonfinite_from": "first_wrong_row",
            "last_partial_tile": "first_wrong_row", "rows_mostly_wrong_from": "first_wrong_row",
            "columns_from": "first_wrong_column"}
# What each recomputed mistake points to (check.hypotheses names them).
CAUSES = {
    "wrong_offset": ("the position (offset) is off: RoPE's starting position, or the causal mask placed for another "
                     "query position in decode or a chunked prefill",
                     "check the offset passed to RoPE and to the mask at this T and S"),
    "mask_missing": ("the causal mask is not applied, or applied after the softmax",
                     "check that key j is hidden from query i when j > offset + i"),
    "overflow_nonfinite": ("an overflow in an intermediate: x² in float16 overflows above |x| = 256, the variance is "
                           "inf and the row becomes 0",
                           "compute RMSNorm's mean of squares in float32"),
    "transposed": ("the weight read as [in, out]: x @ w instead of x @ w.T (linear weights are [out, in])",
                   "check the weight layout the matmul assumes"),
}


def stage(op: str, case_name: str = "") -> Stage | None:
    """The stage the case reproduces: the first whose `vectors` family is the case's."""
    family = ".".join(case_name.split(".")[:2]) if op == "matmul" and case_name else op
    return next((s for s in all_stages() if s.vectors == family), None)


def kernel(op: str, case_name: str = "") -> str:
    """What computes the case, as compare's hint names the stage it reproduces ("q_proj matmul",
    "softmax kernel"), so a pattern reads the same sentence in both commands."""
    found = stage(op, case_name)
    return found.kernel if found else f"{op} kernel"


def named(name: str, words: str) -> Pattern:
    """A mistake this module knows the cause of (CAUSES), seen as `words`."""
    cause, step = CAUSES[name]
    return Pattern(name, words, cause, step)


def alternative(name: str, words: str, output) -> tuple[Pattern, np.ndarray]:
    """A known mistake of the case's op and what it computes on the case's inputs."""
    return named(name, words), np.asarray(output, np.float64)


def unclassified(a: np.ndarray, b: np.ndarray, kernel_name: str) -> Pattern:
    m = metrics(a, b)
    nmse = m["nmse"] if np.isfinite(a).all() else math.inf
    return Pattern("unclassified", f"NMSE {nmse:.3g}, cosine {m['cosine']:.4f}: no shape holds",
                   "none of the shapes (rows, heads, columns, order, factor, precision)",
                   f"compare the {kernel_name} with the case's semantics line", {"nmse": nmse})


def classify(a: np.ndarray, b: np.ndarray, budget: float, alternatives=(), op: str = "matmul",
             n_kv_heads: int | None = None, case_name: str = "") -> Pattern:
    """The pattern of a failing output `a` against the golden `b` (same shape): a recomputed
    mistake it equals, else the shape of its error (errorshape.explain with the op's axes), else
    `unclassified`. A small dense error comes back as `dense_small`: `resolve` reads it over the
    op's cases."""
    name = kernel(op, case_name)
    found = errorshape.explain_alternative(a, b, budget, alternatives)
    if found is None:
        if a.ndim < 2:  # a bare vector is one row
            a, b = a.reshape(1, -1), b.reshape(1, -1)
        token_axis, head_axis = AXES[op] if a.ndim == 3 else (0, None)
        found = errorshape.explain(a, b, token_axis=token_axis, budget=budget, kernel=name, head_axis=head_axis,
                                   n_kv_heads=n_kv_heads)
    if found is None:
        return unclassified(a, b, name)
    at = stage(op, case_name)
    return errorshape.read_at(at.name, found) if at else found


def resolve(pattern: Pattern, points: list[tuple[int, float]], op: str, case_name: str = "") -> Pattern:
    """`dense_small` over the op's (reduction length, NMSE) points: accumulation precision when
    it grows with the length (errorshape.accumulation)."""
    return errorshape.accumulation(pattern, points, kernel(op, case_name))


def label(pattern: Pattern) -> str:
    key = BOUNDARY.get(pattern.name)
    at = pattern.evidence.get(key) if key else None
    return pattern.name if at is None else f"{pattern.name}:{at}"


def transposition(a: np.ndarray, b: np.ndarray, budget: float) -> list[int] | None:
    """The axis order of the golden output that a differently shaped result matches, if any."""
    return errorshape.transposition(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                    errorshape.ROW_SLACK * budget)

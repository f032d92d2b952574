"""Failure patterns: what a failing kernel's output looks like next to the golden output.

Each name says what kind of bug to look for (docs/vectors.md has the list with causes):

    overflow_nonfinite      NaN/Inf where the golden output is finite, or an overflow recognised by
                            its output (RMSNorm's x² in fp16: rows of zeros)
    wrong_offset            matches the golden output at another position (RoPE offset, mask row)
    mask_missing            matches the golden output without the causal mask
    transposed              matches a transposed output, or w read as [in, out]
    zero_rows_from:R        rows R.. are zero, rows before R are right (tile loading, M edge)
    zero_cols_from:C        columns C.. are zero, columns before C are right (N edge)
    rows_repeated           wrong rows are copies of other rows (a row index stuck or reused)
    underflow_zero          most of the error sits where the output is 0 and the golden value is not
    garbage_tail            right up to some row / element, wrong (non-zero) from there on
    accumulation_precision  small error everywhere that grows with the reduction length (fp16 sums)
    unclassified            none of the above

Rows are the output viewed as 2-D: the last axis is the columns, every other axis
is flattened into rows ([H, T, S] scores: row h*T + t).
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from ..metrics import metrics

PATTERNS = ("overflow_nonfinite", "wrong_offset", "mask_missing", "transposed", "zero_rows_from:R",
            "zero_cols_from:C", "rows_repeated", "underflow_zero", "garbage_tail", "accumulation_precision",
            "unclassified")
# A "match" of a hypothesis, a row or a region: within this many times the case's NMSE budget.
MATCH = 4.0
# A failure with NMSE below this is a precision problem (small error everywhere), not a wrong value.
PRECISION_NMSE = 1e-2


def _nmse(a: np.ndarray, b: np.ndarray) -> float:
    power = float(np.sum(b * b))
    err = float(np.sum((a - b) ** 2))
    return err / power if power > 0 else (0.0 if err == 0 else math.inf)


def _rows(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(1, -1)


def matches(a: np.ndarray, b: np.ndarray, budget: float) -> bool:
    if a.shape != b.shape or not np.isfinite(a).all():
        return False
    return _nmse(a, b) <= MATCH * budget


def permuted(a: np.ndarray, b: np.ndarray, budget: float) -> tuple[int, ...] | None:
    """The axis order of b (not the identity) whose transposition a matches, if any."""
    if a.size != b.size or b.ndim < 2 or b.ndim > 4:
        return None
    for perm in itertools.permutations(range(b.ndim)):
        if perm == tuple(range(b.ndim)):
            continue
        bt = b.transpose(perm)
        if bt.shape == a.shape and matches(a, bt, budget):
            return perm
    return None


def _zero_tail(a2: np.ndarray, b2: np.ndarray, budget: float) -> int | None:
    """R such that rows R.. of a are all zero (not all of b's), hold most of the error, and
    rows before R match."""
    zero = ~a2.any(axis=1)
    if not zero.any() or not zero[-1]:
        return None
    R = len(zero) - int(np.argmin(zero[::-1])) if not zero.all() else 0
    if not b2[R:].any():
        return None
    err = (a2 - b2) ** 2
    if err[R:].sum() < 0.5 * err.sum():  # a zero tail that is not where the error is
        return None
    return R if R == 0 or matches(a2[:R], b2[:R], budget) else None


def _row_ok(a2: np.ndarray, b2: np.ndarray, budget: float) -> np.ndarray:
    power = np.sum(b2 * b2, axis=1)
    err = np.sum((a2 - b2) ** 2, axis=1)
    return err <= MATCH * budget * np.maximum(power, 1e-30)


def _repeated(a2: np.ndarray, b2: np.ndarray, bad: np.ndarray) -> tuple[int, int] | None:
    """(wrong row, the row it copies) when most wrong rows equal another row of a whose golden
    row differs (repeated tokens give equal golden rows: those are no copies)."""
    seen: dict[bytes, int] = {}
    first_copy, copies = None, 0
    for r in range(a2.shape[0]):
        key = a2[r].tobytes()
        if key in seen and bad[r] and not np.array_equal(b2[r], b2[seen[key]]):
            copies += 1
            first_copy = first_copy or (r, seen[key])
        seen.setdefault(key, r)
    return first_copy if bad.sum() and copies >= 0.5 * bad.sum() else None


def _garbage_tail(a: np.ndarray, b: np.ndarray, budget: float) -> str | None:
    """'from row R' / 'from element i' when everything before is right and most after is wrong."""
    a2, b2 = _rows(a), _rows(b)
    ok = _row_ok(a2, b2, budget)
    if not ok.all():
        R = int(np.argmin(ok))
        if R > 0 and (~ok[R:]).mean() >= 0.5:
            return f"from row {R}"
        if R > 0:
            return None
    fa, fb = a.reshape(-1), b.reshape(-1)
    scale = math.sqrt(float(np.mean(fb * fb))) or 1.0
    bad = np.abs(fa - fb) > 6 * math.sqrt(MATCH * budget) * scale
    if not bad.any():
        return None
    i = int(np.argmax(bad))
    return f"from element {i}" if i > 0 and bad[i:].mean() >= 0.5 else None


def classify(a: np.ndarray, b: np.ndarray, budget: float, hypotheses: list[tuple[str, str, np.ndarray]]) -> tuple[str, str]:
    """(pattern, detail) of a failing output `a` against the golden `b` (same shape, float64).
    `hypotheses`: (pattern, detail, output) that a known mistake would give (wrong offset, no mask,
    ...), tried first because each names its cause exactly. Returns 'precision' for a small
    dense error: `op_pattern` decides between accumulation_precision and unclassified."""
    bad_nf = ~np.isfinite(a) & np.isfinite(b)
    if bad_nf.any():
        idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad_nf)), a.shape))
        return "overflow_nonfinite", f"{int(bad_nf.sum())} non-finite values, first at {list(idx)}"
    for pattern, detail, alt in hypotheses:
        if matches(a, alt, budget):
            return pattern, detail
    perm = permuted(a, b, budget)
    if perm is not None:
        return "transposed", f"matches the golden output with axes {list(perm)}"
    a2, b2 = _rows(a), _rows(b)
    R = _zero_tail(a2, b2, budget)
    if R is not None:
        return f"zero_rows_from:{R}", f"rows {R}..{a2.shape[0] - 1} of {a2.shape[0]} are zero"
    C = _zero_tail(a2.T, b2.T, budget)
    if C is not None:
        return f"zero_cols_from:{C}", f"columns {C}..{a2.shape[1] - 1} of {a2.shape[1]} are zero"
    copy = _repeated(a2, b2, ~_row_ok(a2, b2, budget))
    if copy is not None:
        return "rows_repeated", f"row {copy[0]} equals row {copy[1]}"
    flushed = (a == 0) & (b != 0)
    err = (a - b) ** 2
    if flushed.any() and err[flushed].sum() >= 0.5 * err.sum():
        return "underflow_zero", f"{int(flushed.sum())} values are 0 where the golden value is not " \
                                 f"(largest {float(np.abs(b[flushed]).max()):.3g})"
    tail = _garbage_tail(a, b, budget)
    if tail is not None:
        return "garbage_tail", tail
    if _nmse(a, b) < PRECISION_NMSE:
        return "precision", f"NMSE {_nmse(a, b):.3g}: small error everywhere"
    return "unclassified", f"NMSE {_nmse(a, b):.3g}, cosine {metrics(a, b)['cosine']:.4f}"


def growth_exponent(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(nmse) against log(n) over the op's cases (None: one n only)."""
    pts = [(math.log(n), math.log(e)) for n, e in points if n > 1 and e > 0 and math.isfinite(e)]
    if len({x for x, _ in pts}) < 2:
        return None
    xs, ys = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    return float(np.polyfit(xs, ys, 1)[0])


def op_pattern(pattern: str, detail: str, points: list[tuple[int, float]]) -> tuple[str, str]:
    """Resolve 'precision' with the op's (reduction length, NMSE) over all its cases: error
    growing at least like sqrt(n) in amplitude (NMSE ~ n^p, p >= 0.5) is accumulation_precision."""
    if pattern != "precision":
        return pattern, detail
    p = growth_exponent(points)
    if p is not None and p >= 0.5:
        return "accumulation_precision", f"{detail}; NMSE grows like n^{p:.2f} with the reduction length"
    why = "one reduction length only" if p is None else f"NMSE ~ n^{p:.2f}, not growing with the reduction length"
    return "unclassified", f"{detail} ({why})"

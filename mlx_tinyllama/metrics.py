"""The differences between two tensors that the tolerances bound (tolerances.py): NMSE, amplitudes,
cosine, non-finite values, and which attention positions are masked or weighted after the softmax
in a given dtype (a mask is judged by its effect, not by its value)."""

from __future__ import annotations

import math

import numpy as np

from .tolerances import EMULATED, MASKED_BELOW, UNIT_ROUNDOFF, ZERO_WEIGHT_BELOW, dtype_key


def _as_f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def first_nonfinite(x) -> tuple[int, ...] | None:
    """Index of the first NaN/Inf of x in C order, or None."""
    bad = ~np.isfinite(_as_f64(x))
    if not bad.any():
        return None
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), bad.shape))


def zero_weight_threshold(dtype) -> float:
    """ln of the weight below which a softmax output in `dtype` is exactly zero (ZERO_WEIGHT_BELOW);
    an emulated or quantized class rounds its softmax like the dtype it emulates (q8_0: float32)."""
    key = dtype_key(dtype) if dtype is not None else "float32"
    key = EMULATED.get(key, key)
    return ZERO_WEIGHT_BELOW.get(key, ZERO_WEIGHT_BELOW["float32"])


def _below_top(x) -> np.ndarray:
    """Each masked score minus the largest finite score of its row (keys on the last axis)."""
    x = _as_f64(x)
    finite = np.where(np.isfinite(x), x, -np.inf)
    top = finite.max(axis=-1, keepdims=True) if x.ndim else finite
    with np.errstate(invalid="ignore"):
        return np.where(np.isfinite(top), x - top, np.nan)


def weighted_positions(x, dtype=None) -> np.ndarray:
    """Where a masked score keeps a weight of at least one unit roundoff of `dtype` after the softmax
    (exp(s - max) >= u): it visibly changes the row. A position masked on one side and weighted on
    the other is a mask mismatch; one masked on one side and between the two thresholds on the other
    (a real score far below its row's maximum, a correct engine) weighs nothing either way."""
    key = EMULATED.get(dtype_key(dtype), dtype_key(dtype)) if dtype is not None else "float32"
    with np.errstate(invalid="ignore"):
        return _below_top(x) >= math.log(UNIT_ROUNDOFF.get(key, UNIT_ROUNDOFF["float32"]))


def masked_positions(x, dtype=None) -> np.ndarray:
    """Where masked attention scores (keys on the last axis) give zero weight after the softmax in
    `dtype` (float32 when None): -inf, the dtype's minimum, or any value so far below its row's
    largest score that exp() of the difference rounds to zero (-1e4 in float16 or float32)."""
    x = _as_f64(x)
    with np.errstate(invalid="ignore"):
        by_effect = _below_top(x) < zero_weight_threshold(dtype)
    return (x <= MASKED_BELOW) | np.isneginf(x) | by_effect


def metrics(a, b, known=None, masked: bool = False, mask_dtype=None) -> dict:
    """Differences of a (the side under test) from b (the reference), same shape.

    Returns nmse = sum((a-b)^2)/sum(b^2), max_abs, max_rel (|a-b|/|b| where |b| is
    not tiny), cosine, rel_rms = max|a-b| / rms(b), the first non-finite index of
    each side, nonfinite = how many positions are non-finite in a but finite in b.
    `known`: a boolean mask of the positions to compare (sparse dumps).
    `masked`: attention scores after the causal mask: positions masked on both sides are equal by
    definition; masked on one side and weighted on the other (weighted_positions) are counted in
    mask_mismatch; masked on either side, they are excluded from the other metrics. "Masked" is by effect (masked_positions): zero weight after a softmax in
    `mask_dtype`, the candidate's dtype (float32 when None), so -1e4, -65504 and -inf all mask.
    """
    a, b = _as_f64(a), _as_f64(b)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    sel = np.ones(a.shape, bool) if known is None else np.asarray(known, bool)
    out = {"mask_mismatch": 0}
    fa, fb = np.isfinite(a), np.isfinite(b)
    ma = mb = np.zeros(a.shape, bool)
    if masked:  # -inf is a mask value too (engines use it; float32's minimum becomes -inf in fp16)
        ma, mb = masked_positions(a, mask_dtype), masked_positions(b, mask_dtype)
        flips = (ma & ~mb & weighted_positions(b, mask_dtype)) | (mb & ~ma & weighted_positions(a, mask_dtype))
        out["mask_mismatch"] = int((sel & flips).sum())
    out["first_nonfinite_a"] = first_nonfinite(np.where(sel & ~ma, a, 0.0))
    out["first_nonfinite_b"] = first_nonfinite(np.where(sel & ~mb, b, 0.0))
    if masked:
        sel = sel & ~ma & ~mb
        fa, fb = fa | ma, fb | mb
    out["nonfinite"] = int((sel & ~fa & fb).sum())
    both = sel & fa & fb
    n = int(both.sum())
    out["compared"] = n
    if n == 0:
        nan = float("nan")
        out.update(nmse=nan if out["nonfinite"] == 0 else math.inf, max_abs=nan, max_rel=nan, cosine=nan, rel_rms=nan)
        if out["nonfinite"]:
            out.update(max_abs=math.inf, rel_rms=math.inf)
        return out
    av, bv = a[both], b[both]
    d = av - bv
    power = float(np.sum(bv * bv))
    err = float(np.sum(d * d))
    rms_b = math.sqrt(power / n)
    out["nmse"] = err / power if power > 0 else (0.0 if err == 0 else math.inf)
    out["max_abs"] = float(np.max(np.abs(d)))
    big = np.abs(bv) > max(rms_b * 1e-3, 1e-30)  # relative error is meaningless near zero
    out["max_rel"] = float(np.max(np.abs(d[big]) / np.abs(bv[big]))) if big.any() else 0.0
    na, nb = float(np.linalg.norm(av)), math.sqrt(power)
    out["cosine"] = float(np.dot(av, bv) / (na * nb)) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0)
    out["rel_rms"] = out["max_abs"] / rms_b if rms_b > 0 else (0.0 if out["max_abs"] == 0 else math.inf)
    if out["nonfinite"]:  # NaN where the reference is finite: nothing else matters
        out["nmse"] = out["rel_rms"] = math.inf
    return out


# The softmax's amplification of its scores' error (tolerances.py, "softmax readers"): a
# property of the reference's scores, measured with the verdict's own mask rule.
def softmax_amplification(scores, token_axis: int = 1, dtype=None) -> dict[str, np.ndarray]:
    """Per token row of the reference's masked scores (keys on the last axis, heads and any other
    axis summed): s2 = sum s**2 and n = count over the keys that are not masked (as
    masked_positions masks: -inf, the dtype's minimum, or zero weight after a softmax in `dtype`), f = sum p**2 (1 -
    2p + P2) and p2 = sum p**2 over the softmax rows. A of rows R = (sum s2 / sum n) * (sum f /
    sum p2) over R (row_amplification, total_amplification)."""
    s = np.moveaxis(np.asarray(scores, np.float64), token_axis, 0)
    keep = np.isfinite(s) & ~masked_positions(s, dtype)  # the one mask rule, the verdict's
    top = np.where(keep, s, -np.inf).max(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore"):
        e = np.where(keep, np.exp(np.where(keep, s - top, 0.0)), 0.0)
    total = e.sum(axis=-1, keepdims=True)
    p = np.divide(e, total, out=np.zeros_like(e), where=total > 0)
    P2 = (p * p).sum(axis=-1, keepdims=True)
    rows = tuple(range(1, s.ndim))
    return {"s2": np.where(keep, s * s, 0.0).sum(axis=rows), "n": keep.sum(axis=rows),
            "f": (p * p * (1.0 - 2.0 * p + P2)).sum(axis=rows), "p2": P2.sum(axis=rows)}


def row_amplification(a: dict[str, np.ndarray]) -> np.ndarray:
    """A of each token row (softmax_amplification)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (a["s2"] / a["n"]) * (a["f"] / a["p2"])
    return np.where(np.isfinite(out), out, 0.0)


def total_amplification(a: dict[str, np.ndarray]) -> float:
    """A of the whole tensor (softmax_amplification): its NMSE is over every row at once."""
    n, p2 = float(a["n"].sum()), float(a["p2"].sum())
    return float(a["s2"].sum() / n * a["f"].sum() / p2) if n > 0 and p2 > 0 else 0.0

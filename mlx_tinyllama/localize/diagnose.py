"""Diagnosis: when a stage diverges, try every transformation of the library (transforms.py) on
their tensor or on our op; those that make the two match name the mistake, in words."""

from __future__ import annotations

from typing import Callable

from .replay import local_ratio
from .transforms import TRANSFORMS, Case, words


def diagnose(case: Case, tolerance: Callable[[str], float], their_dtype: str | None) -> list[dict]:
    """[{stage, transform, ratio_after, words}] for the transforms after which the stage matches
    (ratio_after <= 1), best first; parametrised ones with their best parameter only.
    `tolerance(dtype)`: the stage's NMSE tolerance when their side has that dtype."""
    found: dict[str, dict] = {}
    for t in TRANSFORMS:
        if not t.applies(case.tap):
            continue
        tol = tolerance(t.dtype or their_dtype or "float32")
        for tid, a, b in t.pairs(case):
            if a.shape != b.shape:
                continue
            ratio, _ = local_ratio(case.tap, a, b, tol)
            if ratio <= 1.0 and (t.id not in found or ratio < found[t.id]["ratio_after"]):
                found[t.id] = {"stage": case.tap, "transform": tid, "ratio_after": ratio,
                               "words": words(tid, their_dtype)}
    return sorted(found.values(), key=lambda d: d["ratio_after"])

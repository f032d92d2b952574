"""Localizing the cause of a divergence, beyond compare's first stage over tolerance: replay
(each stage's local error, from their own inputs: replay.py), diagnosis (the layout or semantic
mistake that explains a diverging stage: transforms.py, diagnose.py), coverage (which stages
were really checked: coverage.py) and decode steps (their per-step dumps against our KV-cache
decode and the prefill rows: steps.py). `localize()` adds the first three to a compare result.
"""

from __future__ import annotations

import numpy as np

from .. import refs as R
from .coverage import coverage
from .diagnose import diagnose
from .replay import StageOps, localized, recipe_inputs, replay
from ..tolerances import Basis
from .transforms import Case


def canonical_tensors(side: R.Side, cfg: dict, n_tokens: int) -> dict[str, np.ndarray]:
    """A side's full tensors in the canonical layout (those that hold every token row)."""
    out = {}
    for tap, x in side.tensors.items():
        if not R.is_known_tap(tap) or tap in R.SHORTCUT_TAPS:
            continue
        try:
            y, _, rows, _ = R.to_canonical(tap, x, None, cfg, n_tokens, side.layout)
        except ValueError:
            continue
        if rows is None:
            out[tap] = np.asarray(y, np.float32)
    return out


def localize(result: dict, candidate: R.Side, references: list[R.Side], lm, tol, n_tokens: int,
             n_layers: int | None = None) -> dict:
    """Add `coverage`, and with the model (`lm`, for its weights) `localized`, `diagnosis` and each
    stage's `local_ratio` to a compare result (in place; also returned)."""
    L = int(lm.config.num_hidden_layers) if lm is not None else int(n_layers or 0)
    result["coverage"] = coverage(result, candidate, references, L)
    result.setdefault("localized", None)
    result.setdefault("diagnosis", [])
    if lm is None or not candidate.tensors:
        result["replay"] = {"replayed": 0, "note": "replay needs full tensors from their side and the model's "
                                                   "weights (--model)"}
        return result
    cfg = lm.config.as_dict()
    if result.get("tolerance_basis"):  # the verdict's tolerances, exactly: replay judges on the same basis
        tol = tol.pinned(Basis(**result["tolerance_basis"]))
    theirs = canonical_tensors(candidate, cfg, n_tokens)
    ids = candidate.ids or result.get("tokens")
    position = int((candidate.provenance.get("metadata") or {}).get("position", 0) or 0)
    rep = replay(theirs, lm, ids, tol, candidate.dtype, position)
    ratios = {s["tap"]: s["ratio"] for s in result["stages"]}
    for s in result["stages"]:
        s["local_ratio"] = rep.stages.get(s["tap"], {}).get("local_ratio")
    # A stage whose own arithmetic is over its tolerance is a fault even where the compared tensors stay
    # within theirs (upstream errors can cancel it): verdict.py makes that `diverged`, never `match`.
    result["localized"] = localized(rep, ratios)
    result["replay"] = {"replayed": len(rep.outputs),
                        "skipped": {t: s["skipped"] for t, s in rep.stages.items() if "skipped" in s}}
    result["diagnosis"] = _diagnosis(result, rep, theirs, references, lm, ids, position, getattr(tol, "base", None) or tol,
                                     (result.get("tolerance_basis") or {}).get("dtype") or candidate.dtype, n_tokens)
    first = result["first_divergence"]
    if first and first["error"]["metric"] != "shape" and result["localized"] is None and rep.outputs:
        # (a shape mismatch is a layout or a missing row, not an error accumulated upstream)
        worst = max((s for s in rep.stages.values() if "local_ratio" in s), key=lambda s: s["local_ratio"])
        result["replay"]["note"] = (f"no stage's local error exceeds its tolerance: the divergence at "
                                    f"{result['first_divergence']['tap']} accumulates from small errors upstream (largest "
                                    f"local error: {worst['tap']}, {worst['local_ratio']:.2g} of its tolerance)")
    return result


def _diagnosis(result, rep, theirs, references, lm, ids, position, tol, dtype, n_tokens) -> list[dict]:
    """Diagnose the localized stage from their inputs; without one, the first divergence from ours."""
    if result["status"] != "diverged":
        return []
    L, cfg = lm.config.num_hidden_layers, lm.config
    loc = result["localized"]
    if loc:
        tap = loc["stage"]
        case = Case(tap, theirs[tap], rep.outputs[tap], rep.inputs[tap], StageOps(lm, ids, position), cfg, theirs)
    else:
        tap = result["first_divergence"]["tap"]
        ref = next((r for r in references if r.kind == "run" and tap in r.tensors), None)
        if tap not in theirs or ref is None:
            return []
        ours = canonical_tensors(ref, cfg.as_dict(), n_tokens)
        ins = recipe_inputs(tap, L)
        inputs = [ours[i] for i in ins] if all(i in ours for i in ins) else None
        case = Case(tap, theirs[tap], ours[tap], inputs, StageOps(lm, ids, position), cfg, theirs)
    return diagnose(case, lambda d: tol.get(tap, "nmse", d, "float32", L), dtype)


__all__ = ["localize", "coverage", "diagnose", "replay", "canonical_tensors"]

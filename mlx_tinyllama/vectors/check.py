"""`vectors check`: another engine's outputs against the golden outputs, case by case and per op.

A case passes when its NMSE is within the manifest's tolerance (tolerances.kernel_nmse_budget),
nothing is NaN/Inf where the golden output is finite and, for the scores, the same positions
are masked. A failing case gets a pattern (patterns.py: the shapes `compare` names, read on the
op's output); an op reports its first failing case (manifest order: shapes ascending) with that
case's pattern.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import UserError
from ..tolerances import MASKED_BELOW, unit_roundoff
from ..metrics import metrics
from .. import errorshape
from . import patterns
from ..ops import Ops
from .engine import golden, run_op
from .store import Vectors, read_safetensors, to_numpy

MASKED_OPS = ("scores",)  # outputs that hold masked positions (any value <= -32752, or -inf)


def hypotheses(case: dict, inputs: dict) -> list[tuple[patterns.Pattern, np.ndarray]]:
    """The outputs known mistakes give on this case, for the ops where a mistake has a
    recomputable form: (pattern, output)."""
    op, params = case["op"], case["params"]
    alts: list[tuple[str, str, dict]] = []
    if op in ("rope", "scores", "sdpa"):
        offset = params["offset"]
        for other in sorted({offset - 1, offset + 1, 0} - {offset}):
            if other >= 0:
                what = "RoPE positions start at" if op == "rope" else "the mask is placed for a query at position"
                alts.append(("wrong_offset", f"{what} {other}, not {offset}", dict(params, offset=other)))
    if op in ("scores", "sdpa"):
        alts.append(("mask_missing", "matches the output without the causal mask", dict(params, masked=False)))
    out = [(pattern, detail, golden(op, inputs, alt_params).astype(np.float64)) for pattern, detail, alt_params in alts]
    if op == "rms_norm" and case["dtype"] == "float16":  # x² overflows fp16 above 256: inf variance, zero rows
        alt = run_op(Ops("fp16-pure", "explicit"), op, inputs, params, mx.float16)
        out.append(("overflow_nonfinite", "matches x² computed in float16: above |x| = 256 it overflows to inf "
                                          "(the variance is inf, the row becomes 0)", to_numpy(alt).astype(np.float64)))
    if op == "matmul" and case["shapes"]["w"][0] == case["shapes"]["w"][1]:
        alt = np.asarray(inputs["x"], np.float64) @ np.asarray(inputs["w"], np.float64)
        out.append(("transposed", "matches x @ w: w read as [in, out], not [out, in]", alt))
    return [patterns.alternative(name, words, output) for name, words, output in out]


def _as_output(a: np.ndarray, op: str) -> np.ndarray:
    a = a.astype(np.float64)
    if op in MASKED_OPS:
        a = np.where(np.isneginf(a), -3.4e38, a)  # -inf is a legitimate masked value
    return a


def _unmasked(x: np.ndarray, op: str) -> np.ndarray:
    """For naming a failure: masked positions (any masked value) all read 0, so outputs that
    mask the same positions compare equal whatever masked value each side uses."""
    return np.where(x <= MASKED_BELOW, 0.0, x) if op in MASKED_OPS else x


def check_case(vectors: Vectors, case: dict, result: np.ndarray) -> dict:
    b = vectors.golden(case).astype(np.float64)
    a = _as_output(result, case["op"])
    budget = case["tolerance"]["nmse"]
    row = {"name": case["name"], "op": case["op"], "shape": case.get("shape", case["name"]),
           "n": case["tolerance"]["n"], "tolerance": budget, "pattern": None, "detail": None,
           "explanation": None}
    if a.shape != b.shape:
        perm = patterns.transposition(a, b, budget)
        if perm is None:
            raise UserError(f"results: {case['output']} has shape {list(a.shape)}, the manifest says {list(b.shape)}")
        found = errorshape.transposed(perm, patterns.kernel(case["op"], case["name"]))
        found.words = f"shape {list(a.shape)}: {found.words}"
        return row | {"pass": False, "nmse": None, "pattern": patterns.label(found), "detail": found.words,
                      "explanation": found.as_dict()}
    m = metrics(a, b, masked=case["op"] in MASKED_OPS)
    ok = m["nmse"] <= budget and m["nonfinite"] == 0 and m["mask_mismatch"] == 0
    u = unit_roundoff(case["dtype"])
    row.update({"pass": bool(ok), "nmse": m["nmse"], "ratio": m["nmse"] / budget if budget else None,
                "nmse_u2": m["nmse"] / u ** 2, "kappa": case["tolerance"]["kappa"],
                "max_abs": m["max_abs"], "nonfinite": m["nonfinite"], "mask_mismatch": m["mask_mismatch"]})
    if not ok:
        op = case["op"]
        b0 = _unmasked(b, op)
        alts = [(p, _unmasked(x, op)) for p, x in hypotheses(case, vectors.inputs(case))]
        found = patterns.classify(_unmasked(a, op), b0, budget, alts, op, _kv_heads(case), case["name"])
        if m["mask_mismatch"] and found.name in ("dense_small", "unclassified"):
            found = patterns.named("mask_missing", f"{m['mask_mismatch']} positions masked on one side only")
        _set_pattern(row, found)
    return row


def _kv_heads(case: dict) -> int | None:
    """Where query heads read shared KV heads (scores, sdpa): the KV head count, for the GQA reading."""
    return case["shapes"]["k"][0] if case["op"] in ("scores", "sdpa") else None


def _set_pattern(row: dict, found: patterns.Pattern) -> None:
    row.update(pattern=patterns.label(found), detail=found.words, explanation=found.as_dict())


def load_results(path) -> dict[str, np.ndarray]:
    return {k: to_numpy(v) for k, v in read_safetensors(Path(path), "--results").items()}


def check(vectors: Vectors, results: dict[str, np.ndarray], ops: list[str] | None = None,
          names: list[str] | None = None) -> dict:
    cases = vectors.select(ops, names)
    missing = [c["output"] for c in cases if c["output"] not in results]
    if missing:
        raise UserError(f"results lack {len(missing)} of the {len(cases)} outputs checked, e.g. "
                        f"{', '.join(missing[:3])} (keys are the manifest's output keys; check fewer ops with --ops)")
    known = {c["output"] for c in vectors.cases}
    unknown = sorted(k for k in results if k not in known)
    rows = [check_case(vectors, c, results[c["output"]]) for c in cases]
    by_op: dict[str, list[dict]] = {}
    for row in rows:
        by_op.setdefault(row["op"], []).append(row)
    summary = []
    for op, op_rows in by_op.items():
        failed = [r for r in op_rows if not r["pass"]]
        points = [(r["n"], r["nmse"]) for r in op_rows if r.get("nmse") is not None]
        for r in failed:  # every failing case gets the op-level reading of a small dense error
            if r["explanation"]["name"] == "dense_small":
                _set_pattern(r, patterns.resolve(patterns.Pattern(**r["explanation"]), points, op, r["name"]))
        first = failed[0] if failed else None
        summary.append({"op": op, "cases": len(op_rows), "failed": len(failed), "pass": not failed,
                        "first_failing": first["name"] if first else None,
                        "first_failing_shape": first["shape"] if first else None,
                        "pattern": first["pattern"] if first else None, "detail": first["detail"] if first else None,
                        "explanation": first["explanation"] if first else None,
                        "patterns": sorted({r["pattern"] for r in failed}),
                        "worst_ratio": max((r.get("ratio") or 0.0 for r in op_rows), default=0.0),
                        # NMSE in squared units of the dtype's roundoff: the measure behind KERNEL_ROUND
                        "worst_nmse_u2": max((r.get("nmse_u2") or 0.0 for r in op_rows), default=0.0),
                        "worst_nmse_u2_per_kappa2": max((r["nmse_u2"] / r["kappa"] ** 2 for r in op_rows
                                                         if r.get("kappa")), default=None)})
    return {"vectors": str(vectors.dir), "dtype": vectors.manifest["dtype"], "model": vectors.manifest["model"],
            "pass": all(s["pass"] for s in summary), "ops": summary, "cases": rows, "ignored_keys": unknown}

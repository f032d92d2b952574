"""Coverage: which layer × stage a comparison actually checked. A stage that the other engine
never dumped must not pass silently as "matched": every canonical tap is compared, missing
(their dump lacks it), not comparable (and why) or a shape mismatch, and `--require GLOB`
turns a required stage that was not compared into a failure."""

from __future__ import annotations

from ..taps import GLOBAL_HEAD, GLOBAL_TAIL, LAYER_STAGES, select, split_name, tap_names

COMPARED, MISSING, NOT_COMPARABLE, SHAPE = "compared", "missing", "not_comparable", "shape_mismatch"
SYMBOL = {"ok": "✓", "diverged": "✗", MISSING: "·", NOT_COMPARABLE: "?", SHAPE: "S"}


def coverage(result: dict, candidate, references, n_layers: int) -> dict:
    """{compared, missing, not_comparable: {name: reason}, shape_mismatch: {tap: note}, cells: {tap: status}}
    over every canonical tap, from a compare result and the two sides."""
    by_tap: dict[str, list[dict]] = {}
    for e in result["entries"]:
        by_tap.setdefault(e["tap"], []).append(e)
    theirs = candidate.taps()
    ours = set().union(*(r.taps() for r in references)) if references else set()
    out = {"compared": [], "missing": [], "not_comparable": {}, "shape_mismatch": {}, "cells": {}}
    for tap in tap_names(n_layers):
        entries = by_tap.get(tap, [])
        shape = [e for e in entries if e["metric"] == "shape"]
        if any(e["metric"] != "shape" for e in entries):
            status = COMPARED
            out["compared"].append(tap)
        elif shape:
            status = SHAPE
            out["shape_mismatch"][tap] = shape[0]["note"]
        elif tap not in theirs:
            status = MISSING
            out["missing"].append(tap)
        else:
            status = NOT_COMPARABLE
            out["not_comparable"][tap] = ("the reference holds no value for this stage" if tap not in ours
                                          else "no value of the reference could be compared with theirs")
        out["cells"][tap] = status
    for n in candidate.not_comparable:  # their tensors that map to no canonical stage
        out["not_comparable"][n["key"]] = n["reason"]
    for n in result.get("not_compared", []):
        if n.get("source") != candidate.name:
            out["not_comparable"].setdefault(n["key"], n["reason"])
    return out


def required_not_compared(cov: dict, patterns: list[str], n_layers: int) -> list[str]:
    """The taps matched by the `--require` globs that were not compared (an unknown glob is a UserError)."""
    return [t for t in select(patterns, n_layers) if cov["cells"].get(t) != COMPARED]


def grid_lines(cov: dict, stages_ok: dict[str, bool], n_layers: int) -> list[str]:
    """Stage × layer, one symbol per cell: ✓ matches, ✗ diverges, · missing, ? not comparable, S shape."""
    def cell(tap: str) -> str:
        status = cov["cells"].get(tap, MISSING)
        if status == COMPARED:
            return SYMBOL["ok" if stages_ok.get(tap, True) else "diverged"]
        return SYMBOL[status]

    width = max(len(s.name) for s in GLOBAL_HEAD + LAYER_STAGES + GLOBAL_TAIL)
    cols = [str(i % 10) for i in range(n_layers)]
    lines = [f"{'layer':<{width}}  {' '.join(cols)}"]
    for s in GLOBAL_HEAD:
        lines.append(f"{s.name:<{width}}  {cell(s.name)}")
    for s in LAYER_STAGES:
        lines.append(f"{s.name:<{width}}  {' '.join(cell(f'layers.{i}.{s.name}') for i in range(n_layers))}")
    for s in GLOBAL_TAIL:
        lines.append(f"{s.name:<{width}}  {cell(s.name)}")
    return lines


def summary(cov: dict) -> str:
    n = len(cov["cells"])
    parts = [f"coverage: {len(cov['compared'])}/{n} stages compared"]
    if cov["missing"]:
        parts.append(f"{len(cov['missing'])} missing from their dump (e.g. {_few(cov['missing'])})")
    canon = [k for k in cov["not_comparable"] if k in cov["cells"]]
    if canon:
        parts.append(f"{len(canon)} not comparable (e.g. {canon[0]}: {cov['not_comparable'][canon[0]]})")
    if cov["shape_mismatch"]:
        parts.append(f"{len(cov['shape_mismatch'])} shape mismatch (e.g. {next(iter(cov['shape_mismatch']))})")
    other = len(cov["not_comparable"]) - len(canon)
    if other:
        parts.append(f"{other} of their tensor(s) with no canonical name")
    return "; ".join(parts)


def _few(taps: list[str]) -> str:
    stages = sorted({split_name(t)[1] for t in taps})
    return ", ".join(stages[:4]) + (" ..." if len(stages) > 4 else "")

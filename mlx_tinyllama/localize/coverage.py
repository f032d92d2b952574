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


def gaps(cov: dict, examples: bool = False) -> list[str]:
    """What was not compared, in words (missing, not comparable, shape mismatches, names that are no
    tap), with an example of each where `examples`: the coverage line and the verdict line share it."""
    parts = []
    if cov["missing"]:
        parts.append(f"{len(cov['missing'])} missing from their dump"
                     + (f" (e.g. {_few(cov['missing'])})" if examples else ""))
    canon = [k for k in cov["not_comparable"] if k in cov["cells"]]
    if canon:
        parts.append(f"{len(canon)} not comparable"
                     + (f" (e.g. {canon[0]}: {cov['not_comparable'][canon[0]]})" if examples else ""))
    if cov["shape_mismatch"]:
        parts.append(f"{len(cov['shape_mismatch'])} shape mismatch"
                     + (f" (e.g. {next(iter(cov['shape_mismatch']))})" if examples else ""))
    other = len(cov["not_comparable"]) - len(canon)
    if other:
        parts.append(f"{other} of their tensor(s) with no canonical name"
                     + (" (ignored by --ignore-unmapped)" if cov.get("ignored_unmapped") and not examples else ""))
    return parts


def summary(cov: dict) -> str:
    return "; ".join([f"coverage: {len(cov['compared'])}/{len(cov['cells'])} stages compared", *gaps(cov, True)])


def _few(taps: list[str]) -> str:
    stages = sorted({split_name(t)[1] for t in taps})
    return ", ".join(stages[:4]) + (" ..." if len(stages) > 4 else "")


# ---------------------------------------------------------------------------
# What the candidate holds, before anything is compared: names the tool does not know, and a
# dump or log that stops early. Either would otherwise end in a `match` over whatever was left.

UNMAPPED_REASON = "no canonical tap for this name (give --map)"  # refs.loaders' reason for an unknown name


def unmapped_names(candidate) -> list[str]:
    """Their tensor names that are not a canonical tap nor in --map. A node of the engine's own
    format that its parser lists with another reason (llama.cpp's inp_embd, ...) is not one."""
    return [n["key"] for n in candidate.not_comparable if n.get("reason") == UNMAPPED_REASON]


def unmapped_message(names: list[str], source: str) -> str:
    names = list(dict.fromkeys(names))  # one name in several step files is one name
    few = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return (f"{source}: {len(names)} tensor name(s) are not canonical taps and not in --map ({few}); "
            "nothing was compared. Write a starting map with `compare --against "
            f"{source} --model M --suggest-map MAP.json`, check it and give --map MAP.json, or pass "
            "--ignore-unmapped to compare only the names that are known")


def where_it_stops(taps: set[str], n_layers: int) -> tuple[str, str] | None:
    """Where a dump or log that should hold a forward pass stops early, and the likely cause; or None.

    The rule (docs/localize.md): the last stage it holds is final_norm or logits (an engine that
    died, or a log cut mid-block, has neither); from its first layer (layer 0 when it holds embed)
    to the last, no layer holds nothing. A stage missing from some layers only is not a cut (an
    engine whose graph differs in one layer, a fault itself, leaves such a hole): coverage counts it
    as missing and the verdict line says so. Dumps that leave out a kind of stage in every layer (a
    fused attention without scores) or hold the seed's plan (layer 0 whole, then each layer's out)
    pass."""
    order = tap_names(n_layers)
    present = [t for t in order if t in taps]
    if not present:
        return None
    last = present[-1]
    if last not in ("final_norm", "logits"):
        return f"stops after {last}", "the engine died or the file was cut (nothing after it: no final_norm, no logits)"
    held = {layer for layer, _ in map(split_name, present) if layer is not None}
    if held:
        first = 0 if "embed" in taps else min(held)
        empty = [i for i in range(first, n_layers) if i not in held]
        if empty:
            return (f"holds nothing of layer(s) {_ranges(empty)} although it holds stages before and after them",
                    "the file was cut or a layer was skipped")
    return None


def _ranges(xs: list[int]) -> str:
    out, start = [], xs[0]
    for a, b in zip(xs, xs[1:] + [None]):
        if b != a + 1:
            out.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ", ".join(out)

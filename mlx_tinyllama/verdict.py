"""The verdict of a comparison, stated once: status, exit code and the one line that says the
outcome with its coverage ("match: 41/43 stages ..."). The printed output, the JSON and the exit
code all take it from here, so none of them can say `match` while another says otherwise."""

from __future__ import annotations

import math

from .formatting import fmt

MATCH, DIVERGED, INCOMPLETE = "match", "diverged", "incomplete"


def verdict(result: dict) -> dict:
    """{status, exit_code, line, compared, stages, partial} from a compare result that has been
    through localize (coverage, localized) and the --require check."""
    cov = result.get("coverage")
    if cov:
        compared, total = len(cov["compared"]), len(cov["cells"])
    else:  # no coverage (a result built without it): the stages compared, out of an unknown number
        compared, total = len(result["stages"]), None
    of = f"{compared}/{total} stages" if total else f"{compared} stages (coverage not computed)"
    first, loc = result.get("first_divergence"), result.get("localized")
    required = (result.get("required") or {}).get("not_compared") or []
    partial = (cov or {}).get("partial")
    if first:
        status = DIVERGED
        line = f"diverged at {first['tap']} ({_why(first, cov)}): {of} compared"
    elif loc:  # every stage within tolerance of our numbers, yet one stage's own arithmetic is not
        status = DIVERGED
        line = (f"diverged at {loc['stage']}: its own error, replayed from their inputs, is "
                f"{fmt(loc['local_ratio'])}x its tolerance, although each of the {of} compared is within "
                "tolerance of the reference")
    elif required:
        status = INCOMPLETE
        line = (f"incomplete: {of} compared and within tolerance, but {len(required)} stage(s) that --require "
                f"asks for were not compared ({', '.join(required[:4])}{' ...' if len(required) > 4 else ''})")
    else:
        status = MATCH
        line = f"match: {of}"
    if partial:
        line += f" (partial dump, by --partial: it {partial})"
    gaps = _not_compared(cov) if cov else ""
    if gaps:
        line += f"; not compared: {gaps}"
    if result.get("shared_input"):
        line += "; the reference shares the engine's converted file: conversion faults are not checked (see note)"
    return {"status": status, "exit_code": 0 if status == MATCH else 1, "line": line, "compared": compared,
            "stages": total, "partial": partial}


def _why(first: dict, cov: dict | None) -> str:
    err = first["error"]
    if err["metric"] == "shape":
        note = ((cov or {}).get("shape_mismatch") or {}).get(first["tap"])
        return "shape mismatch" + (f": {note}" if note else "")
    if not math.isfinite(err["ratio"]):  # a count against a tolerance of 0 (non-finite values, top-k ids)
        return f"{err['metric']} = {fmt(err['value'])}, tolerance {fmt(err['tolerance'])}"
    return f"{err['metric']} {fmt(err['ratio'])}x its tolerance"


def _not_compared(cov: dict) -> str:
    from .localize.coverage import gaps

    return ", ".join(gaps(cov))


def shared_input(source, candidate_kind: str) -> dict | None:
    """When the reference ran from a converted file (a GGUF) that the other engine may have run too,
    a fault of the conversion is on both sides and cannot show: say so (None for an HF checkpoint)."""
    if source.format != "gguf":
        return None
    path = str(source.path)
    who = ("the same GGUF the engine ran" if candidate_kind == "llama.cpp-log"
           else "a GGUF (--model), the file the engine may have run too")
    return {"file": path, "format": "gguf",
            "note": f"the reference was computed from {who} ({path}): a conversion fault (e.g. Q/K written "
                    "without the permutation) is invisible to this compare; check the file with "
                    f"`python -m mlx_tinyllama.trace gguf-check --gguf {path} --hf HF_DIR`"}


def steps_verdict(result: dict) -> dict:
    """The verdict of `compare --against-steps`: the same rules over decode steps (their step dumps
    against our KV-cache decode); the line says how many steps and how many stages each held."""
    steps = result["steps"]
    counts = [len(s["stages"]) for s in steps]
    total = max((len(s["stages"]) + len(s["missing"]) for s in steps), default=0)
    positions = f"position {steps[0]['position']}" if len(steps) == 1 else \
        f"positions {steps[0]['position']}-{steps[-1]['position']}"
    per = f"{min(counts)}/{total}" if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}/{total}"
    of = f"{len(steps)} step(s) at {positions}, {per} stages each"
    first, loc = result.get("first_divergence"), result.get("localized")
    if first:
        status = DIVERGED
        line = f"diverged at position {first['position']}, {first['tap']} ({fmt(first['ratio'])}x its tolerance): {of}"
    elif loc:
        status = DIVERGED
        line = (f"diverged at position {loc['position']}, {loc['stage']}: its own error, replayed from their "
                f"inputs, is {fmt(loc['local_ratio'])}x its tolerance, although every step is within tolerance "
                f"of our decode ({of})")
    else:
        status = MATCH
        line = f"match: {of}"
    if min(counts) < total:
        line += f"; not compared: {total * len(steps) - sum(counts)} stage(s) missing from their dumps"
    unreplayed = result.get("not_replayed") or []
    if unreplayed:  # their attention was compared with ours, but not checked against their own cache
        line += (f"; not replayed from their own cache: {sum(len(s['stages']) for s in unreplayed)} attention "
                 f"stage(s) of {len(unreplayed)} step(s) (not_replayed says why)")
    other = len(result.get("not_compared") or [])
    if other:
        line += f"; {other} of their tensor(s) with no canonical name (ignored by --ignore-unmapped)"
    return {"status": status, "exit_code": 0 if status == MATCH else 1, "line": line, "steps": len(steps),
            "compared": sum(counts), "stages": total * len(steps), "partial": None}

"""The comparison's sections: the divergence heat map (stage × layer, the first
divergence framed) and the table of every check."""

from __future__ import annotations

from ..formatting import fmt
from ..outputs import number
from .blocks import Section, describe, divergence_matrix, heatmap_plot, infer_layers
from .render import Report, build


def compare_report(result: dict, lm, html_path=None, plots_dir=None, attention_layers=None,
                   attention_heads=None) -> Report:
    """The comparison report: NMSE heat map stage × layer with the first divergence, and the table."""
    opts = {"attention_layers": attention_layers, "attention_heads": attention_heads}
    return build("compare", "Comparison against a reference", result, lm, html_path, plots_dir,
                  lambda obs: comparison_sections(result, lm), opts)


def _entry_values(entries: list[dict], preferred: str = "nmse") -> tuple[dict[str, float], str]:
    """One number per tap for the heat map: the `preferred` metric where a tap has it."""
    values: dict[str, float] = {}
    metric_of: dict[str, str] = {}
    for e in entries:
        tap, metric = e.get("tap"), e.get("metric", "")
        if tap is None:
            continue
        value = number(e.get("value"))
        if tap not in values or (metric == preferred and metric_of[tap] != preferred):
            values[tap], metric_of[tap] = value, metric
        elif metric == metric_of[tap] and not value <= values[tap]:  # the worst of several references (NaN wins)
            values[tap] = value
    metrics = sorted(set(metric_of.values()))
    return values, (preferred if preferred in metrics else ", ".join(metrics) or preferred)


def comparison_sections(result: dict, lm) -> tuple[list[Section], str, bool | None]:
    entries = result["entries"]
    n = infer_layers([e["tap"] for e in entries], lm)
    values, metric = _entry_values(entries)
    divergence = result["first_divergence"]
    first = divergence["tap"] if divergence else None
    status = result["status"]
    ok = status == "match"
    data = divergence_matrix(values, n, first)
    data.update(metric=metric, status=status)
    sec = Section("divergence", "Divergence map", data=data, data_id="divergence-data")
    sec.intro = (f"Error of every compared stage against the reference ({metric}, log scale), stages in forward "
                 "order from top to bottom. The first stage that fails its tolerance is framed in red: "
                 "everything after it inherits the error, so fix that stage first.")
    sec.facts = [("status", status), ("first divergence", first or "none"), ("what it is", describe(first))]
    if result.get("verdict"):  # the verdict line, as printed: the outcome with its coverage
        sec.facts.insert(1, ("verdict", result["verdict"]["line"]))
    if divergence:
        sec.facts.append(("where to look", divergence["hint"]))
    nonfinite = result["first_nonfinite"]
    if nonfinite:
        sec.facts.append(("first non-finite value", f"{nonfinite['tap']} {nonfinite['index']}"))
    if entries:
        sec.plots.append(heatmap_plot(data, stem="divergence", title=f"{metric} vs reference, stage × layer",
                                      label=f"{metric} (log)", mark_label="first divergence"))
    table = _entries_table(entries, first)
    secs = [sec]
    if result.get("coverage"):
        secs.append(_localization_section(result, n))
    secs.append(Section("comparison-table", "Comparison table", tables=[table] if table else [],
                        intro="" if entries else "This comparison has no entries."))
    return secs, f"comparison: {status}" + (f", first divergence at {first}" if first else ""), ok


def _entries_table(entries: list[dict], first: str | None) -> dict | None:
    if not entries:
        return None
    rows, bad = [], []
    for k, e in enumerate(entries):
        rows.append([str(e.get("tap", "")), str(e.get("metric", "")), fmt(number(e.get("value"))),
                     fmt(number(e.get("tolerance"))) if e.get("tolerance") is not None else "",
                     fmt(e.get("ok")) + ("  ← first divergence" if first and e.get("tap") == first else "")])
        if e.get("ok") is False:
            bad.append(k)
    return {"caption": "every check, in forward order", "columns": ["tap", "metric", "value", "tolerance", "ok"],
            "rows": rows, "bad_rows": bad}


def _localization_section(result: dict, n_layers: int) -> Section:
    """Coverage (every layer × stage: compared, missing, not comparable, shape mismatch), the
    localized stage and the diagnosis (localize/, docs/localize.md)."""
    from ..localize.coverage import SYMBOL, grid_lines, summary

    cov = result["coverage"]
    ok = {s["tap"]: s["ok"] for s in result["stages"]}
    lines = grid_lines(cov, ok, n_layers)
    rows = [line.split("  ", 1) for line in lines[1:]]
    rows = [[name.strip(), cells.strip()] for name, cells in rows]
    bad = [k for k, (_, cells) in enumerate(rows) if set(cells.split()) - {SYMBOL["ok"]}]
    grid = {"caption": "coverage: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in SYMBOL.items()),
            "columns": ["stage", "layers " + lines[0].split("  ", 1)[1].strip()], "rows": rows, "bad_rows": bad}
    sec = Section("localization", "Coverage and localization", tables=[grid],
                  data={"coverage": cov, "localized": result.get("localized"), "diagnosis": result.get("diagnosis"),
                        "required": result.get("required")}, data_id="localization-data")
    sec.intro = ("Which stages were really compared, and where the cause is: replay feeds their input of each "
                 "stage through our op, so a stage's local error is told apart from the error it inherited.")
    loc = result.get("localized")
    sec.facts = [("coverage", summary(cov))]
    if loc:
        sec.facts.append(("localized", f"{loc['stage']}: local error {fmt(loc['local_ratio'])}x its tolerance, "
                                       f"inherited {fmt(loc['inherited_ratio'])}x"))
    elif result.get("replay", {}).get("note"):
        sec.facts.append(("localized", result["replay"]["note"]))
    for d in result.get("diagnosis") or []:
        sec.facts.append(("diagnosis", f"{d['stage']}: {d['transform']}: {d['words']}"))
    req = result.get("required")
    if req:
        sec.facts.append(("required", ", ".join(req["patterns"]) + (
            f": not compared {', '.join(req['not_compared'])}" if req["not_compared"] else ": all compared")))
    return sec

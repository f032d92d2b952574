"""The paths check's sections: logits difference per position and, per path, a stage ×
position heat map of the row NMSE against the prefill."""

from __future__ import annotations

import math

import numpy as np

from ..formatting import fmt
from ..outputs import number
from ..taps import split_name
from .blocks import GLOBAL_NAMES, LAYER_STAGE_NAMES, Plot, Section, describe, plot, slug
from .render import Report, build


def paths_report(result: dict, lm, html_path=None, plots_dir=None, attention_layers=None,
                 attention_heads=None) -> Report:
    """The paths report: prefill vs decode (and other paths) difference per position and stage."""
    opts = {"attention_layers": attention_layers, "attention_heads": attention_heads}
    return build("paths", "Prefill vs decode paths", result, lm, html_path, plots_dir,
                  lambda obs: paths_sections(result, lm), opts)


# --- paths -------------------------------------------------------------------------


def paths_sections(result: dict, lm) -> tuple[list[Section], str, bool | None]:
    from ..plots import drift_figure

    paths = result["paths"]
    first = result["first_divergence"]
    ok = result.get("agree")
    sec = Section("paths", "Prefill vs decode")
    sec.intro = ("Each cached path (decode = one token per step, chunk-k = k tokens per step) against the single "
                 "prefill, position by position. A correct KV cache gives the prefill's numbers at every position.")
    tol = (result.get("tolerance") or {}).get("nmse")
    sec.facts = [("first divergence", _path_divergence_text(first)), ("what it is", describe(first["tap"] if first else None)),
                 ("tolerance", f"per-row NMSE ≤ {fmt(number(tol))}" if tol is not None else "")]
    if result.get("fault"):
        sec.facts.append(("injected fault", f"{result['fault'].get('name')}"
                          + (f" at position {result['fault']['position']}" if result["fault"].get("position")
                             is not None else "")))
    by_pos = {p.get("path", f"path {k}"): [number(v) for v in p.get("logits_nmse_by_position") or []]
              for k, p in enumerate(paths)}
    by_pos = {k: v for k, v in by_pos.items() if v}
    if by_pos:
        n = max(len(v) for v in by_pos.values())
        fig = drift_figure(list(range(n)), {k: v + [math.nan] * (n - len(v)) for k, v in by_pos.items()},
                           title="logits NMSE vs prefill, per position", ylabel="NMSE (log)")
        fig.axes[0].set_xlabel("token position")
        sec.plots.append(plot("paths_logits", "logits difference per position", "gaps = exactly equal", fig))
    data = _tap_position_data(result, first)
    if data is not None:
        sec.data, sec.data_id = data, "paths-data"
        sec.plots += [_position_heatmap(path_data) for path_data in data["paths"]]
    else:
        sec.facts.append(("per stage and position", "not in this result (it has per-position logits only)"))
    rows = [[str(p.get("path")), str(p.get("steps", "")), fmt(p.get("agree")), str(p.get("worst_tap", "")),
             fmt(number(p.get("worst_tap_nmse"))), fmt(number(p.get("logits_max_abs_diff"))),
             fmt(number(p.get("logits_max_nmse")))] for p in paths]
    if rows:
        sec.tables.append({"caption": "paths", "columns": ["path", "steps", "agree", "worst tap", "worst NMSE",
                                                           "logits max |Δ|", "logits max NMSE"],
                           "rows": rows, "bad_rows": [k for k, p in enumerate(paths) if p.get("agree") is False]})
    cont = result.get("continuation")
    if cont:
        sec.facts.append(("greedy continuation", f"{cont.get('n')} tokens, "
                          + ("cached = recomputed" if cont.get("agree") else
                             f"first mismatch at step {cont.get('first_mismatch_step')}")))
    status = "paths agree" if ok else ("paths diverge: " + _path_divergence_text(first) if first else "paths differ")
    return [sec], status, ok if ok is not None else None


def _path_divergence_text(first) -> str:
    if not first:
        return "none"
    return f"{first.get('path')} path, {first.get('tap')}, position {first.get('position')}"


def _tap_position_data(result: dict, first) -> dict | None:
    """Per path, a stage × position matrix of the row NMSE against the prefill (max over layers,
    so a row is one stage kind of every layer) from the result's `nmse_by_tap_position`
    ({path: {tap: [per position]}}); each path's own first divergence marked on its map, the
    overall first one (`first`: the path that diverged first in the order checked) at the top."""
    table = result.get("nmse_by_tap_position")
    if not table:
        return None
    own = {p.get("path"): p.get("first_divergence") for p in result["paths"]}
    paths = [_path_matrix(path, per_tap, own.get(path) or first) for path, per_tap in table.items() if per_tap]
    mark = next((p["first_divergence"] for p in paths
                 if p["first_divergence"] and first and p["path"] == first.get("path")), None)
    return {"metric": "row NMSE vs the prefill, max over layers", "paths": paths, "first_divergence": mark}


def _path_matrix(path: str, per_tap: dict[str, list], first) -> dict:
    n_pos = max(len(v) for v in per_tap.values())
    stages = [s for s in GLOBAL_NAMES[:1] + LAYER_STAGE_NAMES + GLOBAL_NAMES[1:]
              if any(split_name(t)[1] == s for t in per_tap)]
    matrix = np.full((len(stages), n_pos), np.nan)
    for tap, values in per_tap.items():
        r = stages.index(split_name(tap)[1])
        row = np.array([number(v) for v in values], dtype=np.float64)
        matrix[r, :len(row)] = np.fmax(matrix[r, :len(row)], row)  # NaN = not measured, never wins
    mark = None
    if first and first.get("path") == path and split_name(first.get("tap") or "")[1] in stages:
        stage = split_name(first["tap"])[1]
        mark = {"path": path, "tap": first["tap"], "stage": stage, "position": first.get("position"),
                "row": stages.index(stage)}
    return {"path": path, "stages": stages, "positions": list(range(n_pos)), "matrix": matrix.tolist(),
            "first_divergence": mark}


def _position_heatmap(data: dict) -> Plot:
    from ..plots import stage_layer_heatmap

    first = data["first_divergence"]
    mark = (first["row"], first["position"]) if first and first.get("position") is not None else None
    fig = stage_layer_heatmap(np.array(data["matrix"], dtype=np.float64), data["stages"], data["positions"],
                              title=f"{data['path']} vs prefill: row NMSE per stage (max over layers) and position",
                              colorbar_label="row NMSE (log)", mark=mark, mark_label="first divergence",
                              column_label="token position")
    return plot(f"{slug(data['path'])}_stage_position", f"{data['path']} vs prefill per stage and position",
                 "grey = not measured; magenta = not comparable (NaN/Inf where the prefill has a number, or "
                 "another number of keys)" + (f"; red frame = first divergence {first['tap']} at position "
                                              f"{first['position']}" if first else ""), fig)

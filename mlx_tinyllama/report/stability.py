"""The stability run's sections: fp16 headroom per stage and layer, the first
non-finite or collapsed stage, and the drift from fp32 per layer."""

from __future__ import annotations

import math

import numpy as np

from ..outputs import number
from .blocks import Plot, Section, describe, divergence_matrix, infer_layers, plot, slug
from .render import Report, build


def stability_report(result: dict, lm, html_path=None, plots_dir=None, attention_layers=None,
                     attention_heads=None) -> Report:
    """The stability report: headroom per stage and layer, first non-finite stage, fp16-vs-fp32 drift."""
    opts = {"attention_layers": attention_layers, "attention_heads": attention_heads,
            "fallback_stats": _stability_stats(result), "fallback_source": "the float32 reference run's absmax"}
    return build("stability", "Numerical stability", result, lm, html_path, plots_dir,
                  lambda obs: stability_sections(result, lm), opts)


# --- stability -------------------------------------------------------------------------


def _runs(result: dict) -> dict[str, dict]:
    """{"float16 · hf": run, ...} from stability's runs{dtype: {policy: run}}."""
    out = {}
    for dtype, by_policy in (result.get("runs") or {}).items():
        for policy, run in by_policy.items():
            out[f"{dtype} · {policy}"] = run
    return out


def _stability_stats(result: dict) -> dict[str, dict]:
    """The float32 reference's absmax per tap, for the magnitude plot when the report has no model
    (stability records no mean/std, so RMS is left out)."""
    taps = (result.get("reference") or {}).get("taps") or {}
    return {t: {"absmax": v["absmax"], "mean": math.nan, "std": math.nan, "nan": 0, "inf": 0}
            for t, v in taps.items() if isinstance(v, dict) and "absmax" in v}


def stability_sections(result: dict, lm) -> tuple[list[Section], str, bool | None]:
    from ..plots import drift_figure

    secs, problems, drift = [], [], {}
    for name, run in _runs(result).items():
        taps = run.get("taps") or {}
        n = infer_layers(taps, lm)
        first = run.get("first_nonfinite") or run.get("first_collapse")
        what = "first non-finite" if run.get("first_nonfinite") else "first collapse"
        if first:
            problems.append(f"{name}: {what} at {first}")
        sec = Section(f"stability-{slug(name)}", f"Stability · {name}")
        sec.intro = ("Headroom = log2(65504 / absmax): how many doublings a stage's largest value has left before "
                     "the fp16 limit (≤ 0: beyond it). The first stage with NaN/Inf (or, failing that, the first "
                     "whose rows collapse to zero) is framed in red.")
        origin = run.get("origin") or {}
        sec.facts = [("first non-finite stage", run.get("first_nonfinite") or "none"),
                     ("first collapsed stage", run.get("first_collapse") or "none"),
                     ("what it is", describe(first))]
        if origin.get("explanation"):
            sec.facts.append(("why", origin["explanation"]))
        headroom = {t: number(v.get("headroom")) for t, v in taps.items() if isinstance(v, dict) and "headroom" in v}
        if headroom:
            data = divergence_matrix(headroom, n, first)
            data.update(metric="headroom (log2 doublings to 65504)", run=name)
            sec.data, sec.data_id = data, f"headroom-data-{slug(name)}"
            sec.plots.append(headroom_plot(data, stem=f"headroom_{slug(name)}", mark_label=what,
                                           title=f"fp16 headroom per stage and layer ({name})"))
        series = [number((taps.get(f"layers.{i}.out") or {}).get("nmse")) for i in range(n)]
        if any(math.isfinite(v) for v in series):
            drift[name] = series
        secs.append(sec)
    if drift:
        n = max(len(v) for v in drift.values())
        sec = Section("drift", "Low precision vs fp32: drift per layer", data={"nmse_by_layer": drift},
                      data_id="drift-data")
        sec.intro = "NMSE of each layer's output against the float32 run of the same weights: how error grows with depth."
        sec.plots.append(plot("drift", "NMSE vs fp32 per layer (layer outputs)", "gaps = exactly equal or non-finite",
                               drift_figure(list(range(n)), drift, title="drift from fp32 per layer",
                                            ylabel="NMSE vs fp32 (log)")))
        secs.append(sec)
    for dtype, text in (result.get("recommendation") or {}).items():
        if secs:
            secs[0].facts.insert(0, (f"recommendation ({dtype})", text))
    status = "all runs finite" if not problems else "; ".join(problems)
    return secs, status, not problems


def headroom_plot(data: dict, *, stem: str, title: str, mark_label: str) -> Plot:
    """Headroom is already a logarithm (doublings, may be negative or inf): a linear, clipped scale."""
    from ..plots import stage_layer_heatmap

    matrix = np.array(data["matrix"], dtype=np.float64)
    # inf headroom = no finite non-zero value (all NaN after an overflow, or all zero): grey, not "safe".
    matrix = np.where(np.isposinf(matrix), np.nan, matrix)
    first = data.get("first_divergence")
    mark = (first["row"], first["layer"]) if first and first.get("row") is not None else None
    fig = stage_layer_heatmap(np.clip(matrix, *HEADROOM_RANGE), data["stages"], data["layers"], title=title,
                              colorbar_label="headroom, doublings (clipped)", mark=mark, mark_label=mark_label,
                              log=False, cmap="RdYlGn")
    return plot(stem, title, "red = little or no headroom; grey = not measured or no finite non-zero value"
                 + (f"; red frame = {mark_label}: {first['tap']}" if first else ""), fig)


HEADROOM_RANGE = (-4.0, 20.0)

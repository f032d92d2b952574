"""Self-contained HTML reports (and the same plots as PNG files) for `run`,
`compare`, `paths` and `stability`.

One report is one HTML file: the figures are base64 PNGs inside it, the data
behind the heat maps is a JSON block inside it (`<script type="application/json"
id="divergence-data">` and friends), so it opens anywhere without a network.
The HTML comes from a jinja2 template with autoescape on; the figures come from
plots.py.

Entry points (each writes `html_path` and/or PNGs into `plots_dir`, either may be None):
    run_report(result, lm, html_path=None, plots_dir=None, **options)
    compare_report(result, lm, html_path=None, plots_dir=None, **options)
    paths_report(result, lm, html_path=None, plots_dir=None, **options)
    stability_report(result, lm, html_path=None, plots_dir=None, **options)
`result` is the command's JSON result: its header (results.ResultHeader) says which
model and prompt. options: attention_layers, attention_heads (lists of ints; default:
first and last layer, heads 0 and 1). `lm` (or None) lets the report run one more
forward pass to measure every stage and record the attention probabilities.
"""

from __future__ import annotations

import base64
import datetime as _dt
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UserError
from .taps import GLOBAL_HEAD, GLOBAL_TAIL, LAYER_STAGES, Taps, split_name, stage_of, tap_names
from .formatting import fmt
from .outputs import check_dir, check_file, json_safe, number
from .results import PromptRecord, ResultHeader

# Magnitude panels: which layer stages go together in one plot.
MAGNITUDE_PANELS = (
    ("norms (RMSNorm outputs)", ("attn_norm", "mlp_norm")),
    ("attention projections", ("attn.q", "attn.k", "attn.v", "attn.q_rope", "attn.k_rope", "attn.context", "attn.out")),
    ("attention scores", ("attn.scores", "attn.scores_scaled", "attn.probs")),
    ("MLP", ("mlp.gate", "mlp.up", "mlp.act", "mlp.prod", "mlp.down")),
    ("residual stream", ("resid_mid", "out")),
)
# Masked scores hold the dtype minimum above the diagonal: their absmax is the mask, not data.
NOT_PLOTTED = ("attn.scores_masked",)
DEFAULT_ATTENTION_HEADS = (0, 1)
LAYER_STAGE_NAMES = [s.name for s in LAYER_STAGES]
GLOBAL_NAMES = [s.name for s in GLOBAL_HEAD + GLOBAL_TAIL]


# ---------------------------------------------------------------------------
# Building blocks


@dataclass
class Plot:
    """One figure: its file stem (for --plots), title, caption and PNG bytes."""

    stem: str
    title: str
    caption: str
    png: bytes

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


@dataclass
class Section:
    """One part of the page. `kind` picks the template block; `data` goes into a JSON script block."""

    id: str
    title: str
    intro: str = ""
    plots: list[Plot] = field(default_factory=list)
    tables: list[dict] = field(default_factory=list)  # {"caption", "columns", "rows", "bad_rows"}
    facts: list[tuple[str, str]] = field(default_factory=list)
    data: dict | None = None
    data_id: str | None = None


def parse_int_list(text: str | None, option: str) -> list[int] | None:
    if text is None:
        return None
    items = [t for t in re.split(r"[,\s]+", text.strip()) if t]
    try:
        values = [int(t) for t in items]
    except ValueError:
        raise UserError(f"{option}: expected comma-separated integers like 0,1, got {text!r}") from None
    if not values:
        raise UserError(f"{option}: no values given")
    return values


def _plot(stem: str, title: str, caption: str, fig) -> Plot:
    from .plots import png_bytes

    return Plot(stem, title, caption, png_bytes(fig))


# ---------------------------------------------------------------------------
# Observation: one extra forward pass for magnitudes and attention maps


class _BothTaps:
    """Feeds one forward pass to two recorders: stats of every stage, full tensors of a few."""

    enabled = True

    def __init__(self, stats: Taps, full: Taps):
        self.stats, self.full = stats, full

    def wants(self, name: str) -> bool:
        return self.stats.wants(name) or self.full.wants(name)

    def __call__(self, name, x):
        self.full(name, x)
        return self.stats(name, x)


@dataclass
class Observation:
    stats: dict[str, dict]
    probs: dict[int, np.ndarray]  # layer -> [H, T, S] float32
    last_logits: object  # mx.array [V]


def observe(lm, ids: list[int], attention_layers: list[int]) -> Observation:
    """Every stage's stats and the attention probabilities of `attention_layers`, in one prefill."""
    import mlx.core as mx

    lm.config.check_ids(ids)
    n = lm.config.num_hidden_layers
    stats = Taps(tap_names(n), "stats")
    full = Taps([f"layers.{i}.attn.probs" for i in attention_layers], "full")
    logits = lm.model(mx.array(ids), tap=_BothTaps(stats, full))
    mx.eval(logits)
    probs = {}
    for name, t in full.tensors.items():
        probs[split_name(name)[0]] = np.array(t.astype(mx.float32))
    return Observation(stats.stats(), probs, logits[0, -1])


def _choose(values: list[int] | None, default: list[int], limit: int, what: str) -> list[int]:
    chosen = list(dict.fromkeys(values if values is not None else default))
    bad = [v for v in chosen if not 0 <= v < limit]
    if bad:
        raise UserError(f"{what} {bad[0]} does not exist: the model has {limit} (0..{limit - 1})")
    return chosen


# ---------------------------------------------------------------------------
# Header


def page_header(result: dict, lm) -> dict:
    """What the page's header shows: the result's header (results.ResultHeader), and the
    prompt's pieces from the model's tokenizer where the result has none."""
    head = ResultHeader.from_dict(result)
    model = head.model or {}
    prompt = head.prompt or PromptRecord([])  # stability and run always have one; compare of two files may not
    pieces = prompt.pieces or _pieces(lm, prompt.ids)
    return {
        "model": model.get("spec") or "none run here (stored results compared)",
        "format": model.get("format") or "",
        "origin": model.get("origin") or "",
        "dtype": head.dtype or "",
        "policy": head.policy or "",
        "kernels": head.kernels or "",
        "device": head.device,
        "config": model.get("config") or {},
        "prompt_text": prompt.text,
        "prompt_source": prompt.source,
        "tokens": [{"pos": i, "id": t, "piece": pieces[i] if i < len(pieces) else ""}
                   for i, t in enumerate(prompt.ids)],
        "versions": head.versions,
        "created": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
    }


def _prompt(result: dict) -> PromptRecord:
    return ResultHeader.from_dict(result).prompt or PromptRecord([])


def _pieces(lm, ids: list[int]) -> list[str]:
    tok = _tokenizer(lm)
    return tok.pieces(ids) if tok is not None and ids else []


def _tokenizer(lm):
    if lm is None:
        return None
    from .runtime import tokenizer_for

    try:
        return tokenizer_for(lm)
    except UserError:  # a model without a tokenizer still gets a report, with ids only
        return None


# ---------------------------------------------------------------------------
# Sections


def rms_of(stats: dict) -> float:
    """Root mean square from the recorded mean and (population) std."""
    mean, std = number(stats.get("mean")), number(stats.get("std"))
    return math.sqrt(mean * mean + std * std)


def magnitude_data(stats: dict[str, dict], n_layers: int) -> tuple[list[dict], dict[str, dict]]:
    """Per-layer absmax/RMS series per panel (only stages that were recorded), and the global stages."""
    panels = []
    for title, stages in MAGNITUDE_PANELS:
        series = {}
        for stage in stages:
            names = [f"layers.{i}.{stage}" for i in range(n_layers)]
            if not any(n in stats for n in names):
                continue
            series[stage] = {
                "absmax": [number(stats[n]["absmax"]) if n in stats else math.nan for n in names],
                "rms": [rms_of(stats[n]) if n in stats else math.nan for n in names],
            }
        if series:
            panels.append({"title": title, "series": series})
    globals_ = {n: {"absmax": number(stats[n]["absmax"]), "rms": rms_of(stats[n])} for n in GLOBAL_NAMES if n in stats}
    return panels, globals_


def magnitude_section(stats: dict[str, dict], n_layers: int, source: str) -> Section:
    from .plots import FP16_MAX, magnitude_figure

    sec = Section("magnitudes", "Per-layer magnitudes")
    panels, globals_ = magnitude_data(stats, n_layers)
    if not panels and not globals_:
        sec.intro = "This result recorded no per-stage statistics, so there is nothing to plot."
        return sec
    sec.intro = (f"Largest absolute value (solid) and root mean square (dashed) of each stage, per layer, "
                 f"on a log scale; the dotted red line is the fp16 limit {FP16_MAX:g}. Source: {source}. "
                 f"Masked scores are left out: above the diagonal they hold the dtype minimum.")
    fig = magnitude_figure(panels, list(range(n_layers)), globals_)
    sec.plots.append(_plot("magnitudes", "absmax and RMS per layer", "", fig))
    over = [(n, s) for n, s in stats.items() if s.get("nan") or s.get("inf")
            or (number(s.get("absmax")) > FP16_MAX and split_name(n)[1] not in NOT_PLOTTED)]
    rows = [[n, fmt(number(s.get("absmax"))), fmt(rms_of(s)), str(s.get("nan", 0)), str(s.get("inf", 0))]
            for n, s in over]
    if rows:
        sec.tables.append({"caption": "stages beyond the fp16 range or non-finite",
                           "columns": ["tap", "absmax", "rms", "nan", "inf"], "rows": rows,
                           "bad_rows": list(range(len(rows)))})
    sec.data = {"source": source, "layers": n_layers,
                "absmax": {n: number(s.get("absmax")) for n, s in stats.items()},
                "rms": {n: rms_of(s) for n, s in stats.items()}}
    sec.data_id = "magnitude-data"
    return sec


def attention_section(probs: dict[int, np.ndarray], pieces: list[str], heads: list[int]) -> Section:
    from .plots import attention_figure

    sec = Section("attention", "Attention maps")
    sec.intro = ("Softmax probabilities (attn.probs) of the selected layers and query heads: row = query token, "
                 "column = key token. A correct causal model is zero above the diagonal and every row sums to 1.")
    for layer in sorted(probs):
        p = probs[layer][heads]
        fig = attention_figure(p, pieces, layer=layer, heads=heads)
        row_sums = p.sum(axis=-1)
        upper = float(np.triu(p, k=1 + p.shape[2] - p.shape[1]).max()) if p.size else 0.0
        caption = (f"row sums {row_sums.min():.4f}..{row_sums.max():.4f}; largest probability above the diagonal "
                   f"{fmt(upper)}")
        sec.plots.append(_plot(f"attention_layer{layer}", f"layer {layer}", caption, fig))
    return sec


def top_k_section(entries: list[dict]) -> Section:
    from .plots import top_k_figure

    sec = Section("top-k", "Next-token candidates")
    if not entries:
        sec.intro = "This result has no next-token candidates."
        return sec
    sec.intro = "The most likely next tokens after the last prompt position."
    sec.tables.append({"caption": "top-k at the last position", "columns": ["rank", "id", "token", "logit", "prob"],
                       "rows": [[str(r), str(e["token_id"]), repr(e.get("token")) if e.get("token") is not None else "",
                                 fmt(number(e["logit"])), f"{number(e['prob']):.4f}"]
                                for r, e in enumerate(entries, 1)], "bad_rows": []})
    sec.plots.append(_plot("top_k", "next-token probabilities", "", top_k_figure(entries)))
    return sec


# ---------------------------------------------------------------------------
# Comparison data: stage × layer NMSE


def divergence_matrix(values: dict[str, float], n_layers: int, first_tap: str | None) -> dict:
    """The heat-map data: rows = layer stages in forward order, columns = layers, cells = the
    error of that tap (NaN = not compared); global taps apart; the first divergence located."""
    matrix = [[number(values.get(f"layers.{i}.{stage}")) for i in range(n_layers)] for stage in LAYER_STAGE_NAMES]
    globals_ = {n: number(values[n]) for n in GLOBAL_NAMES if n in values}
    first = None
    if first_tap:
        layer, stage = split_name(first_tap)
        first = {"tap": first_tap, "stage": stage, "layer": layer,
                 "row": LAYER_STAGE_NAMES.index(stage) if layer is not None else None}
    return {"stages": LAYER_STAGE_NAMES, "layers": list(range(n_layers)), "matrix": matrix,
            "globals": globals_, "first_divergence": first}


def _infer_layers(names, lm) -> int:
    if lm is not None:
        return lm.config.num_hidden_layers
    layers = [split_name(n)[0] for n in names if n.startswith("layers.")]
    return max(layers) + 1 if layers else 0


def heatmap_plot(data: dict, *, stem: str, title: str, label: str, mark_label: str, cmap: str = "viridis") -> Plot:
    from .plots import stage_layer_heatmap

    matrix = np.array(data["matrix"], dtype=np.float64)
    first = data.get("first_divergence")
    mark = (first["row"], first["layer"]) if first and first.get("row") is not None else None
    labels, extra = list(data["stages"]), data.get("globals") or {}
    if extra:  # the global taps as one extra row, each in a column of its own, left to right
        row = np.full((1, matrix.shape[1]), np.nan)
        for j, n in enumerate(extra):
            if j < row.shape[1]:
                row[0, j] = extra[n]
        matrix = np.vstack([matrix, row])
        labels.append("globals: " + ", ".join(extra))
    fig = stage_layer_heatmap(matrix, labels, data["layers"], title=title, colorbar_label=label, mark=mark,
                              mark_label=mark_label, cmap=cmap)
    caption = ("grey = not measured; values below 1e-16 are drawn at 1e-16" + (f"; red frame = {mark_label}: {first['tap']}" if first else "")
               + (f"; bottom row = {', '.join(extra)} in columns 0..{len(extra) - 1}" if extra else ""))
    return _plot(stem, title, caption, fig)


# ---------------------------------------------------------------------------
# Page


@dataclass
class Report:
    kind: str
    title: str
    header: dict
    sections: list[Section]
    status: str = ""
    status_ok: bool | None = None


def render_html(report: Report) -> str:
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(loader=PackageLoader("mlx_tinyllama", "templates"),
                      autoescape=select_autoescape(["html", "j2"], default_for_string=True, default=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    sections = [{"section": s, "data_json": json_safe(s.data) if s.data is not None else None}
                for s in report.sections]
    return env.get_template("report.html.j2").render(report=report, header=report.header, sections=sections)


def write_report(report: Report, html_path, plots_dir) -> None:
    if html_path is not None:
        Path(html_path).expanduser().write_text(render_html(report), encoding="utf-8")
    if plots_dir is not None:
        d = Path(plots_dir).expanduser()
        d.mkdir(exist_ok=True)
        for sec in report.sections:
            for p in sec.plots:
                (d / f"{report.kind}_{p.stem}.png").write_bytes(p.png)


def _observed_sections(result: dict, lm, attention_layers, attention_heads, *,
                       fallback_stats: dict | None, fallback_source: str) -> tuple[list[Section], Observation | None]:
    """Magnitudes (from a fresh forward pass when `lm` is given) and attention maps."""
    prompt = _prompt(result)
    ids = prompt.ids
    if lm is None or not ids:
        stats = fallback_stats or {}
        n = _infer_layers(stats, None)
        sec = magnitude_section(stats, n, fallback_source)
        att = Section("attention", "Attention maps",
                      intro="Attention maps need the model and the prompt's token ids; this report had "
                            + ("no token ids." if lm is not None else "no model."))
        return [sec, att], None
    n = lm.config.num_hidden_layers
    layers = _choose(attention_layers, sorted({0, n - 1}), n, "attention layer")
    heads = _choose(attention_heads, [h for h in DEFAULT_ATTENTION_HEADS if h < lm.config.num_attention_heads],
                    lm.config.num_attention_heads, "attention head")
    obs = observe(lm, ids, layers)
    source = f"a forward pass of every stage on this model ({lm.dtype}, policy {lm.ops.policy})"
    pieces = prompt.pieces or _pieces(lm, ids)
    return [magnitude_section(obs.stats, n, source), attention_section(obs.probs, pieces, heads)], obs


def _top_k_entries(result: dict, lm, obs: Observation | None, k: int = 10) -> list[dict]:
    if result.get("top_k"):
        return list(result["top_k"])
    if obs is None:
        return []
    from .runtime import top_k

    return top_k(obs.last_logits, k, _tokenizer(lm))


def _build(kind: str, title: str, result: dict, lm, html_path, plots_dir, middle, options) -> Report:
    """Header, magnitudes, the command's own sections (`middle`), attention maps, top-k."""
    check_file(html_path, "--report")
    check_dir(plots_dir, "--plots")
    header = page_header(result, lm)
    observed, obs = _observed_sections(result, lm, options.get("attention_layers"),
                                       options.get("attention_heads"),
                                       fallback_stats=options.get("fallback_stats"),
                                       fallback_source=options.get("fallback_source", "the result's taps"))
    own, status, ok = middle(obs)
    sections = [observed[0], *own, observed[1], top_k_section(_top_k_entries(result, lm, obs))]
    report = Report(kind, title, header, sections, status, ok)
    write_report(report, html_path, plots_dir)
    return report


# ---------------------------------------------------------------------------
# Entry points


def run_report(result: dict, lm, html_path=None, plots_dir=None, attention_layers=None,
               attention_heads=None) -> Report:
    """The `run` command's report: header, magnitudes, attention maps, top-k."""
    opts = {"attention_layers": attention_layers, "attention_heads": attention_heads,
            "fallback_stats": result.get("taps") or {}, "fallback_source": "the run's taps"}
    return _build("run", "Forward pass", result, lm, html_path, plots_dir, lambda obs: ([], "", None), opts)


def compare_report(result: dict, lm, html_path=None, plots_dir=None, attention_layers=None,
                   attention_heads=None) -> Report:
    """The comparison report: NMSE heat map stage × layer with the first divergence, and the table."""
    opts = {"attention_layers": attention_layers, "attention_heads": attention_heads}
    return _build("compare", "Comparison against a reference", result, lm, html_path, plots_dir,
                  lambda obs: comparison_sections(result, lm), opts)


def paths_report(result: dict, lm, html_path=None, plots_dir=None, attention_layers=None,
                 attention_heads=None) -> Report:
    """The paths report: prefill vs decode (and other paths) difference per position and stage."""
    opts = {"attention_layers": attention_layers, "attention_heads": attention_heads}
    return _build("paths", "Prefill vs decode paths", result, lm, html_path, plots_dir,
                  lambda obs: paths_sections(result, lm), opts)


def stability_report(result: dict, lm, html_path=None, plots_dir=None, attention_layers=None,
                     attention_heads=None) -> Report:
    """The stability report: headroom per stage and layer, first non-finite stage, fp16-vs-fp32 drift."""
    opts = {"attention_layers": attention_layers, "attention_heads": attention_heads,
            "fallback_stats": _stability_stats(result), "fallback_source": "the float32 reference run's absmax"}
    return _build("stability", "Numerical stability", result, lm, html_path, plots_dir,
                  lambda obs: stability_sections(result, lm), opts)


# ---------------------------------------------------------------------------
# Command-specific sections. Each returns (sections, status line, ok or None).


def _describe(tap: str | None) -> str:
    if not tap:
        return ""
    try:
        return stage_of(tap).what
    except KeyError:
        return ""


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
    n = _infer_layers([e["tap"] for e in entries], lm)
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
    sec.facts = [("status", status), ("first divergence", first or "none"), ("what it is", _describe(first))]
    if divergence:
        sec.facts.append(("where to look", divergence["hint"]))
    nonfinite = result["first_nonfinite"]
    if nonfinite:
        sec.facts.append(("first non-finite value", f"{nonfinite['tap']} {nonfinite['index']}"))
    if entries:
        sec.plots.append(heatmap_plot(data, stem="divergence", title=f"{metric} vs reference, stage × layer",
                                      label=f"{metric} (log)", mark_label="first divergence"))
    table = _entries_table(entries, first)
    secs = [sec, Section("comparison-table", "Comparison table", tables=[table] if table else [],
                         intro="" if entries else "This comparison has no entries.")]
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


# --- paths -------------------------------------------------------------------------


def paths_sections(result: dict, lm) -> tuple[list[Section], str, bool | None]:
    from .plots import drift_figure

    paths = result["paths"]
    first = result["first_divergence"]
    ok = result.get("agree")
    sec = Section("paths", "Prefill vs decode")
    sec.intro = ("Each cached path (decode = one token per step, chunk-k = k tokens per step) against the single "
                 "prefill, position by position. A correct KV cache gives the prefill's numbers at every position.")
    tol = (result.get("tolerance") or {}).get("nmse")
    sec.facts = [("first divergence", _path_divergence_text(first)), ("what it is", _describe(first["tap"] if first else None)),
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
        sec.plots.append(_plot("paths_logits", "logits difference per position", "gaps = exactly equal", fig))
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
    from .plots import stage_layer_heatmap

    first = data["first_divergence"]
    mark = (first["row"], first["position"]) if first and first.get("position") is not None else None
    fig = stage_layer_heatmap(np.array(data["matrix"], dtype=np.float64), data["stages"], data["positions"],
                              title=f"{data['path']} vs prefill: row NMSE per stage (max over layers) and position",
                              colorbar_label="row NMSE (log)", mark=mark, mark_label="first divergence",
                              column_label="token position")
    return _plot(f"{_slug(data['path'])}_stage_position", f"{data['path']} vs prefill per stage and position",
                 "grey = not measured; magenta = not comparable (NaN/Inf where the prefill has a number, or "
                 "another number of keys)" + (f"; red frame = first divergence {first['tap']} at position "
                                              f"{first['position']}" if first else ""), fig)


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
    from .plots import drift_figure

    secs, problems, drift = [], [], {}
    for name, run in _runs(result).items():
        taps = run.get("taps") or {}
        n = _infer_layers(taps, lm)
        first = run.get("first_nonfinite") or run.get("first_collapse")
        what = "first non-finite" if run.get("first_nonfinite") else "first collapse"
        if first:
            problems.append(f"{name}: {what} at {first}")
        sec = Section(f"stability-{_slug(name)}", f"Stability · {name}")
        sec.intro = ("Headroom = log2(65504 / absmax): how many doublings a stage's largest value has left before "
                     "the fp16 limit (≤ 0: beyond it). The first stage with NaN/Inf (or, failing that, the first "
                     "whose rows collapse to zero) is framed in red.")
        origin = run.get("origin") or {}
        sec.facts = [("first non-finite stage", run.get("first_nonfinite") or "none"),
                     ("first collapsed stage", run.get("first_collapse") or "none"),
                     ("what it is", _describe(first))]
        if origin.get("explanation"):
            sec.facts.append(("why", origin["explanation"]))
        headroom = {t: number(v.get("headroom")) for t, v in taps.items() if isinstance(v, dict) and "headroom" in v}
        if headroom:
            data = divergence_matrix(headroom, n, first)
            data.update(metric="headroom (log2 doublings to 65504)", run=name)
            sec.data, sec.data_id = data, f"headroom-data-{_slug(name)}"
            sec.plots.append(headroom_plot(data, stem=f"headroom_{_slug(name)}", mark_label=what,
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
        sec.plots.append(_plot("drift", "NMSE vs fp32 per layer (layer outputs)", "gaps = exactly equal or non-finite",
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
    from .plots import stage_layer_heatmap

    matrix = np.array(data["matrix"], dtype=np.float64)
    # inf headroom = no finite non-zero value (all NaN after an overflow, or all zero): grey, not "safe".
    matrix = np.where(np.isposinf(matrix), np.nan, matrix)
    first = data.get("first_divergence")
    mark = (first["row"], first["layer"]) if first and first.get("row") is not None else None
    fig = stage_layer_heatmap(np.clip(matrix, *HEADROOM_RANGE), data["stages"], data["layers"], title=title,
                              colorbar_label="headroom, doublings (clipped)", mark=mark, mark_label=mark_label,
                              log=False, cmap="RdYlGn")
    return _plot(stem, title, "red = little or no headroom; grey = not measured or no finite non-zero value"
                 + (f"; red frame = {mark_label}: {first['tap']}" if first else ""), fig)


HEADROOM_RANGE = (-4.0, 20.0)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", str(text)).strip("-") or "x"

"""The report's figures, drawn with matplotlib's Agg canvas.

Every function takes plain numpy/python data and returns a `Figure`; `png_bytes`
renders one. Figures are built with `matplotlib.figure.Figure` and an explicit
Agg canvas, never through pyplot, so drawing a report neither needs a display
nor changes the backend of a program that imports this package.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .dtypes import FP16_MAX
DPI = 110
# Token labels beyond this many positions are thinned out so they stay legible.
MAX_TOKEN_LABELS = 48
HEATMAP_FLOOR = 1e-16


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # Token pieces from any script: a missing glyph draws a box, which is fine here.
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _positive(values) -> np.ndarray:
    """Log axes cannot show 0 or non-finite values: make them gaps (NaN)."""
    arr = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(arr) & (arr > 0), arr, np.nan)


def magnitude_figure(panels: list[dict], layers: list[int], globals_: dict[str, dict]) -> Figure:
    """Per-layer absmax (solid) and RMS (dashed) per stage, one panel per stage kind.

    panels: [{"title": str, "series": {stage: {"absmax": [per layer], "rms": [per layer]}}}];
    globals_: {tap: {"absmax": v, "rms": v}} for the stages outside the layers.
    """
    n = len(panels) + (1 if globals_ else 0)
    cols = 2 if n > 1 else 1
    rows = math.ceil(n / cols)
    fig = new_figure(12, 3.4 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, panel in zip(axes, panels):
        _magnitude_panel(ax, panel, layers)
    if globals_:
        _globals_panel(axes[len(panels)], globals_)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig


def _fp16_line(ax) -> None:
    ax.axhline(FP16_MAX, color="crimson", linewidth=1.2, linestyle=":", label="fp16 max 65504")


def _magnitude_panel(ax, panel: dict, layers: list[int]) -> None:
    colors = iter(_palette(len(panel["series"])))
    for stage, s in panel["series"].items():
        color = next(colors)
        ax.plot(layers, _positive(s["absmax"]), color=color, marker="o", markersize=3, label=f"{stage} absmax")
        ax.plot(layers, _positive(s["rms"]), color=color, linestyle="--", linewidth=1, label=f"{stage} rms")
    _fp16_line(ax)
    ax.set_yscale("log")
    ax.set_title(panel["title"], fontsize=10)
    ax.set_xlabel("layer")
    ax.set_xticks(layers if len(layers) <= 24 else layers[:: max(1, len(layers) // 12)])
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=6, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)


def _globals_panel(ax, globals_: dict[str, dict]) -> None:
    names = list(globals_)
    x = np.arange(len(names))
    ax.bar(x - 0.2, _positive([globals_[n]["absmax"] for n in names]), width=0.4, label="absmax", color="#3b6ea8")
    ax.bar(x + 0.2, _positive([globals_[n]["rms"] for n in names]), width=0.4, label="rms", color="#9cc3e6")
    _fp16_line(ax)
    ax.set_yscale("log")
    ax.set_xticks(x, names)
    ax.set_title("stages outside the layers", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)


def _palette(n: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(max(n, 1))]


def stage_layer_heatmap(matrix: np.ndarray, stages: list[str], layers: list[int], *, title: str,
                        colorbar_label: str, mark: tuple[int, int] | None = None, mark_label: str = "",
                        log: bool = True, cmap: str = "viridis", column_label: str = "layer") -> Figure:
    """A stage × layer heat map (rows: stages in forward order). NaN cells are drawn grey
    ("not measured"); `mark` = (row, col) gets a red frame, e.g. the first divergence."""
    matrix = np.asarray(matrix, dtype=np.float64)
    fig = new_figure(max(6.0, 2.5 + 0.38 * len(layers)), max(3.0, 1.2 + 0.3 * len(stages)))
    ax = fig.subplots()
    shown = np.ma.masked_invalid(matrix)
    norm = None
    if log:
        positive = matrix[np.isfinite(matrix) & (matrix > 0)]
        ceil = positive.max() if positive.size else 1.0
        # Below 1e-16 everything is "equal to rounding": a deeper floor would spend the colour scale on noise.
        floor = max(positive.min(), HEATMAP_FLOOR) if positive.size else HEATMAP_FLOOR
        floor = min(floor, ceil)
        vmax = max(ceil, floor * 10)
        # Exact zeros (bit-identical stages) sit at the floor of the scale; +inf (an error that is
        # not a number: NaN against a value, a shape mismatch) above its top, in the "over" colour.
        clipped = np.where(np.isposinf(matrix), vmax * 10, np.clip(matrix, floor, None))
        shown = np.ma.masked_invalid(np.where(np.isfinite(matrix) | np.isposinf(matrix), clipped, matrix))
        norm = LogNorm(vmin=floor, vmax=vmax)
    colormap = _with_bad_color(cmap)
    image = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap=colormap, norm=norm)
    fig.colorbar(image, ax=ax, label=colorbar_label, shrink=0.9,
                 extend="max" if log and np.isposinf(matrix).any() else "neither")
    ax.set_yticks(range(len(stages)), stages, fontsize=8)
    step = 1 if len(layers) <= 24 else 2
    ax.set_xticks(range(0, len(layers), step), [str(v) for v in layers[::step]], fontsize=8)
    ax.set_xlabel(column_label)
    ax.set_title(title, fontsize=10)
    if mark is not None:
        r, c = mark
        ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
        ax.annotate(mark_label, xy=(c, r), xytext=(c + 0.7, r - 0.9), color="red", fontsize=8, fontweight="bold",
                    annotation_clip=False)
    return fig


def _with_bad_color(name: str):
    from matplotlib import colormaps

    return colormaps[name].with_extremes(bad="#d9d9d9", over="#e020c0")


def drift_figure(layers: list[int], series: dict[str, list[float]], *, title: str, ylabel: str) -> Figure:
    """One line per series over the layers, log scale (e.g. fp16-vs-fp32 NMSE per layer)."""
    fig = new_figure(8, 3.4)
    ax = fig.subplots()
    for (label, values), color in zip(series.items(), _palette(len(series))):
        ax.plot(layers, _positive(values), marker="o", markersize=3, color=color, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize=7, frameon=False)
    return fig


def attention_figure(probs: np.ndarray, pieces: list[str], *, layer: int, heads: list[int]) -> Figure:
    """Attention probabilities [len(heads), T, S] of one layer, one image per head,
    query tokens down the side and key tokens along the bottom."""
    n = len(heads)
    T, S = probs.shape[1], probs.shape[2]
    side = min(7.0, max(3.2, 0.16 * S + 1.6))
    fig = new_figure(side * n + 0.8, side)
    axes = fig.subplots(1, n, squeeze=False).ravel()
    image = None
    for ax, head, p in zip(axes, heads, probs):
        image = ax.imshow(p, cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="equal")
        ax.set_title(f"layer {layer} · head {head}", fontsize=10)
        key_labels = _token_labels(pieces, range(S))
        query_labels = _token_labels(pieces, range(S - T, S))  # queries are the last T positions
        _label_axis(ax.set_xticks, key_labels, rotation=90)
        _label_axis(ax.set_yticks, query_labels, rotation=0)
        ax.set_xlabel("key token")
        ax.set_ylabel("query token")
    fig.colorbar(image, ax=list(axes), label="probability", shrink=0.8)
    return fig


def _token_labels(pieces: list[str], positions) -> list[str]:
    """Labels `pos:piece` (pieces are indexed by absolute position; a missing piece shows the position only)."""
    return [f"{pos}:{_printable(pieces[pos]) if pos < len(pieces) else ''}" for pos in positions]


def _printable(piece: str) -> str:
    text = piece.replace("\n", "\\n").replace("\t", "\\t")
    return text if len(text) <= 12 else text[:11] + "…"


def _label_axis(set_ticks, labels: list[str], rotation: int) -> None:
    step = max(1, math.ceil(len(labels) / MAX_TOKEN_LABELS))
    ticks = list(range(0, len(labels), step))
    set_ticks(ticks, [labels[i] for i in ticks], fontsize=6, rotation=rotation)


def top_k_figure(entries: list[dict]) -> Figure:
    """Horizontal bars of the top-k next-token probabilities."""
    fig = new_figure(7, 0.3 * len(entries) + 1.2)
    ax = fig.subplots()
    labels = [f"{e['token_id']} {_printable(e.get('token') or '')!r}" for e in entries]
    probs = [e["prob"] for e in entries]
    y = np.arange(len(entries))
    ax.barh(y, probs, color="#3b6ea8")
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability (last position)")
    ax.grid(True, axis="x", alpha=0.3)
    return fig

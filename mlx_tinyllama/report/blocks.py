"""The page's building blocks: a plot (PNG bytes), a section, the stage × layer heat map
and its data, and the small helpers every section uses."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field

import numpy as np

from ..outputs import number
from ..taps import GLOBAL_HEAD, GLOBAL_TAIL, LAYER_STAGES, split_name, stage_of


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


def plot(stem: str, title: str, caption: str, fig) -> Plot:
    from ..plots import png_bytes

    return Plot(stem, title, caption, png_bytes(fig))


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


def infer_layers(names, lm) -> int:
    if lm is not None:
        return lm.config.num_hidden_layers
    layers = [split_name(n)[0] for n in names if n.startswith("layers.")]
    return max(layers) + 1 if layers else 0


def heatmap_plot(data: dict, *, stem: str, title: str, label: str, mark_label: str, cmap: str = "viridis") -> Plot:
    from ..plots import stage_layer_heatmap

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
    return plot(stem, title, caption, fig)


def describe(tap: str | None) -> str:
    if not tap:
        return ""
    try:
        return stage_of(tap).what
    except KeyError:
        return ""


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", str(text)).strip("-") or "x"

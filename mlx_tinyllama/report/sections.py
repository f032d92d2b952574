"""The sections every report has: the header, per-layer magnitudes, attention maps and
the next-token candidates."""

from __future__ import annotations

import datetime as _dt
import math

import numpy as np

from ..dtypes import FP16_MAX
from ..errors import UserError
from ..formatting import fmt
from ..outputs import number
from ..results import PromptRecord, ResultHeader
from .. import stages
from ..stages import split_name
from .blocks import GLOBAL_NAMES, Section, plot


def magnitude_panels() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Which layer stages go together in one plot: the registry's panels, read at each call."""
    return tuple((title, tuple(s.name for s in stages.LAYER_STAGES if s.panel == title)) for title in stages.PANELS)


def not_plotted() -> tuple[str, ...]:
    """Layer stages in no panel (the report names them)."""
    return tuple(s.name for s in stages.LAYER_STAGES if s.panel is None)


def mask_holders() -> tuple[str, ...]:
    """Masked scores hold the dtype minimum above the diagonal: their absmax is the mask, not data."""
    return tuple(s.name for s in stages.LAYER_STAGES if s.masked)


MAGNITUDE_PANELS, NOT_PLOTTED = magnitude_panels(), not_plotted()


# ---------------------------------------------------------------------------
# Header


def page_header(result: dict, lm) -> dict:
    """What the page's header shows: the result's header (results.ResultHeader), and the
    prompt's pieces from the model's tokenizer where the result has none."""
    head = ResultHeader.from_dict(result)
    model = head.model or {}
    prompt = head.prompt or PromptRecord([])  # stability and run always have one; compare of two files may not
    pieces = prompt.pieces or pieces_of(lm, prompt.ids)
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


def prompt_of(result: dict) -> PromptRecord:
    return ResultHeader.from_dict(result).prompt or PromptRecord([])


def pieces_of(lm, ids: list[int]) -> list[str]:
    tok = tokenizer_of(lm)
    return tok.pieces(ids) if tok is not None and ids else []


def tokenizer_of(lm):
    if lm is None:
        return None
    from ..runtime import tokenizer_for

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
    for title, members in magnitude_panels():
        series = {}
        for stage in members:
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
    from ..plots import magnitude_figure

    sec = Section("magnitudes", "Per-layer magnitudes")
    panels, globals_ = magnitude_data(stats, n_layers)
    if not panels and not globals_:
        sec.intro = "This result recorded no per-stage statistics, so there is nothing to plot."
        return sec
    sec.intro = (f"Largest absolute value (solid) and root mean square (dashed) of each stage, per layer, "
                 f"on a log scale; the dotted red line is the fp16 limit {FP16_MAX:g}. Source: {source}. "
                 f"Masked scores are left out: above the diagonal they hold the dtype minimum.")
    unplotted = sorted({split_name(n)[1] for n in stats if split_name(n)[0] is not None}
                       & (set(not_plotted()) - set(mask_holders())))
    if unplotted:
        sec.intro += " Recorded but in no panel: " + ", ".join(unplotted) + "."
    fig = magnitude_figure(panels, list(range(n_layers)), globals_)
    sec.plots.append(plot("magnitudes", "absmax and RMS per layer", "", fig))
    over = [(n, s) for n, s in stats.items() if s.get("nan") or s.get("inf")
            or (number(s.get("absmax")) > FP16_MAX and split_name(n)[1] not in mask_holders())]
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
    from ..plots import attention_figure

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
        sec.plots.append(plot(f"attention_layer{layer}", f"layer {layer}", caption, fig))
    return sec


def top_k_section(entries: list[dict]) -> Section:
    from ..plots import top_k_figure

    sec = Section("top-k", "Next-token candidates")
    if not entries:
        sec.intro = "This result has no next-token candidates."
        return sec
    sec.intro = "The most likely next tokens after the last prompt position."
    sec.tables.append({"caption": "top-k at the last position", "columns": ["rank", "id", "token", "logit", "prob"],
                       "rows": [[str(r), str(e["token_id"]), repr(e.get("token")) if e.get("token") is not None else "",
                                 fmt(number(e["logit"])), f"{number(e['prob']):.4f}"]
                                for r, e in enumerate(entries, 1)], "bad_rows": []})
    sec.plots.append(plot("top_k", "next-token probabilities", "", top_k_figure(entries)))
    return sec

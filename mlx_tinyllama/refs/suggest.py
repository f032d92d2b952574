"""A starting `--map` for another engine's dump: each of their tensors matched to the canonical
tap it equals, by shape and value, against this package's run of the same tokens.

On a correct engine most tensors equal one tap within its tolerance (under a layout that
`to_canonical` knows: heads split or merged, a batch axis, ggml's order). A tap that several of
their tensors equal, or a tensor that equals several taps, is left out of the map and called
ambiguous, with the candidates; elimination settles what it can (a tensor whose other candidates
went to tensors that match only them). A tensor within tolerance of no tap (a broken stage, or
everything after one) gets the closest free tap of its size when it is clearly the closest
("likely"), so the compare that follows can name the stage that diverges."""

from __future__ import annotations

import functools

import numpy as np

from ..errors import UserError
from ..stages import stage_of
from ..taps import split_name, tap_names
from .fused import Fused, split, width
from .layout import expected_shape, to_canonical

MASKED = -1e4  # at or below this a score is masked: -inf, the dtype's minimum, ONNX's -1e4 (fp16)
LIKELY_NMSE = 0.5  # a tensor this far from a tap still follows it (a fault, or an error inherited)
LIKELY_MARGIN = 4.0  # ... when the next closest tap is this much further
SAMPLE = 1 << 16  # a pair of big tensors is first compared on this many positions (scores at 2,048
NEAR = 4.0  # tokens hold 134M values); within NEAR x the tolerance there, on every position
QUICK_COLS = 512  # a fused run is first measured on 4 token rows of this many features per block


def read_raw_tensors(path) -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors/.npz dump (or a sharded dump's index) under its own name."""
    from pathlib import Path

    from ..dump import INDEX_SUFFIX, index_path, read_index
    from .loaders import read_tensor_file

    path = Path(path)
    if not path.exists() and index_path(path).is_file():
        path = index_path(path)
    if path.name.endswith(INDEX_SUFFIX):
        out = {}
        for shard in read_index(path)[0]:
            out.update(read_tensor_file(shard))
        return out
    return read_tensor_file(path)


def nmse(theirs: np.ndarray, ours: np.ndarray) -> float:
    """Normalized squared error over the positions neither side masks; inf when the masked (or NaN)
    positions differ: a masked score row and an unmasked one are different stages."""
    a, b = np.asarray(theirs, np.float64), np.asarray(ours, np.float64)
    ma, mb = ~(a > MASKED), ~(b > MASKED)  # NaN counts as masked on both sides
    if not np.array_equal(ma, mb) or not np.array_equal(np.isnan(a), np.isnan(b)):
        return float("inf")
    keep = ~ma
    if not keep.any():
        return 0.0
    d, scale = a[keep] - b[keep], float(np.sum(b[keep] ** 2))
    err = float(np.sum(d * d))
    if scale == 0.0:
        return 0.0 if err == 0.0 else float("inf")
    return err / scale


def suggest_map(theirs: dict[str, np.ndarray], ours: dict[str, np.ndarray], cfg: dict, n_tokens: int,
                their_dtype, our_dtype, tol, layout: str = "hf", given: dict | None = None,
                fused: bool = False) -> list[dict]:
    """One line per tensor of theirs: {name, tap (None: left out of the map), confidence: given |
    match | likely | ambiguous | none, ratio (error / tolerance at `tap`), candidates: [{tap, ratio}],
    note}, in the forward order of their taps (unmapped last). With `fused`, a tensor that equals
    no tap is also tried as several consecutive taps side by side (refs/fused.py); its line's
    `tap` is then the map entry (a list of taps, or {"taps", "layout"}) and `taps` lists them."""
    n_layers = int(cfg["num_hidden_layers"])
    order = tap_names(n_layers)
    given = dict(given or {})
    lines, fixed = {}, {}
    for name in theirs:
        tap = given.get(name, name if name in order else None)
        if isinstance(tap, Fused):
            lines[name] = {"name": name, "tap": tap.entry(), "taps": list(tap.taps), "confidence": "given",
                           "ratio": None, "candidates": [], "note": "in --map"}
            fixed.update({t: name for t in tap.taps})
        elif tap is not None:
            lines[name] = {"name": name, "tap": tap, "confidence": "given", "ratio": None, "candidates": [],
                           "note": "in --map" if name in given else "a canonical tap name"}
            fixed[tap] = name
    free = [t for t in order if t in ours and t not in fixed]
    sizes = {t: int(np.prod(expected_shape(t, cfg, n_tokens))) for t in free}
    errors: dict[str, dict[str, float]] = {}
    canon: dict[tuple[str, str], np.ndarray | None] = {}
    samples: dict[int, np.ndarray | None] = {}  # by size: the same positions in every pair compared
    for name, x in theirs.items():
        if name in lines:
            continue
        if not np.issubdtype(np.asarray(x).dtype, np.floating):
            lines[name] = _line(name, None, "none", note=f"not a float tensor ({np.asarray(x).dtype})")
            continue
        errors[name] = {}
        for tap in free:
            if sizes[tap] != x.size:
                continue
            stage = split_name(tap)[1] if tap.startswith("layers.") else tap
            if (name, stage) not in canon:  # the layout depends on the stage, not the layer
                canon[(name, stage)] = _canonical(tap, x, cfg, n_tokens, layout)
            y = canon[(name, stage)]
            if y is None:
                continue
            idx = samples.setdefault(y.size, _sample(y.size))
            e = nmse(y.reshape(-1)[idx], ours[tap].reshape(-1)[idx]) if idx is not None else nmse(y, ours[tap])
            if idx is not None and e <= NEAR * tol.get(tap, "nmse", their_dtype, our_dtype, n_layers):
                e = nmse(y, ours[tap])  # near tolerance: the whole tensor decides
            errors[name][tap] = e
        canon = {k: v for k, v in canon.items() if k[0] != name}
    ratio = {n: {t: e / tol.get(t, "nmse", their_dtype, our_dtype, n_layers) for t, e in errs.items()}
             for n, errs in errors.items()}
    close = {n: {t for t, r in rs.items() if r <= 1.0} for n, rs in ratio.items()}
    taken = _settle(close)
    for name, tap in taken.items():
        lines[name] = _line(name, tap, "match", ratio[name][tap], _others(ratio[name], tap),
                            note="within tolerance of this tap only")
    claimed = set(taken.values()) | set(fixed)
    rest = [n for n in errors if n not in lines]
    for name in rest:
        options = sorted(close[name] - claimed, key=lambda t: ratio[name][t])
        if options:  # within tolerance of several taps, or of one that another tensor equals too
            rivals = sorted(n for n in rest if n != name and close[n] & set(options))
            lines[name] = _line(name, None, "ambiguous", None, [{"tap": t, "ratio": ratio[name][t]} for t in options],
                                note="equals several taps within tolerance" if len(options) > 1 else
                                f"{', '.join(rivals)} equal(s) {options[0]} too")
    if fused:
        runs, flat = list(_fused_runs(cfg, n_layers)), {}
        for name in [n for n in rest if n not in lines]:
            line = _fused_line(name, theirs[name], ours, cfg, n_tokens, claimed, their_dtype, our_dtype, tol,
                               runs, flat)
            if line is not None:
                lines[name] = line
                if line["tap"] is not None:
                    claimed.update(line["taps"])
    while True:  # the clearest "likely" first, so that two tensors never take one tap
        best = None
        for name in (n for n in rest if n not in lines):
            near = sorted((e, t) for t, e in errors[name].items() if t not in claimed)
            if near and near[0][0] < LIKELY_NMSE and (len(near) == 1 or near[1][0] >= LIKELY_MARGIN * near[0][0]):
                if best is None or near[0][0] < best[0]:
                    best = (near[0][0], name, near[0][1])
        if best is None:
            break
        _, name, tap = best
        claimed.add(tap)
        lines[name] = _line(name, tap, "likely", ratio[name][tap], _others(ratio[name], tap),
                            note=f"closest free tap of its size but {ratio[name][tap]:.3g}x its tolerance: "
                                 "this stage (or one before it) is off; check the line")
    for name in (n for n in rest if n not in lines):
        near = sorted((e, t) for t, e in errors[name].items() if t not in claimed)
        if near:
            lines[name] = _line(name, None, "ambiguous", None, [{"tap": t, "ratio": ratio[name][t]}
                                                                for _, t in near[:4]],
                                note="within tolerance of no tap and not clearly closest to one")
        else:
            lines[name] = _line(name, None, "none", note="no free tap has its size in any known layout")
    pos = {t: k for k, t in enumerate(order)}
    first = lambda ln: ln["taps"][0] if ln.get("taps") else ln["tap"]  # noqa: E731 (a fused line: its first tap)
    return sorted(lines.values(), key=lambda ln: (pos.get(first(ln), len(pos)), ln["name"]))


def _feature_rows(x: np.ndarray) -> tuple[int, int] | None:
    """(token rows, features per row) of a tensor whose last axis (or last two) holds features."""
    shape = [d for d in np.shape(x)]
    while len(shape) > 2 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) == 2:
        return shape[0], shape[1]
    if len(shape) == 3:
        return shape[0], shape[1] * shape[2]
    return None


def _fused_runs(cfg: dict, n_layers: int):
    """Every run of 2 or 3 consecutive layer stages with one feature axis per token (q|k|v, k|v,
    gate|up, ...), per layer, with the packings that apply to it: (taps, layout)."""
    from ..stages import LAYER_STAGES

    stages = [s.name for s in LAYER_STAGES]
    keyed = {s.name for s in LAYER_STAGES if s.key_axis is not None}
    for i in range(n_layers):
        for n in (3, 2):
            for k in range(len(stages) - n + 1):
                run = stages[k:k + n]
                if keyed & set(run):
                    continue
                taps = tuple(f"layers.{i}.{s}" for s in run)
                widths = [width(t, cfg) for t in taps]
                yield taps, widths, "concat"
                if run == ["attn.q", "attn.k", "attn.v"]:
                    yield taps, widths, "grouped"
                if len(set(widths)) == 1:
                    yield taps, widths, "interleaved"


def _tokens_major(tap: str, x: np.ndarray) -> np.ndarray:
    """Our tap as [T, features] (heads merged head-major), the layout a fused block is in."""
    dims = stage_of(tap).dims
    x = np.moveaxis(np.asarray(x), dims.index("token"), 0)
    return x.reshape(x.shape[0], -1)


def _fused_line(name, x, ours, cfg, n_tokens, claimed, their_dtype, our_dtype, tol, runs=None,
                flat=None) -> dict | None:
    """A tensor tried as consecutive taps side by side: a `match` when exactly one packing puts
    every block within its tap's tolerance; `likely` when one is clearly the closest (every block
    under LIKELY_NMSE, the next packing LIKELY_MARGIN further); None when no run has its width.
    A run whose every block is over LIKELY_NMSE on four token rows (the first two, the last two;
    their first QUICK_COLS features) is judged on those only: most runs are other layers' taps."""
    rows = _feature_rows(x)
    if rows is None or rows[0] != n_tokens:
        return None
    n_layers = int(cfg["num_hidden_layers"])
    runs = runs if runs is not None else list(_fused_runs(cfg, n_layers))
    flat = flat if flat is not None else {}
    few = sorted({0, 1, n_tokens - 2, n_tokens - 1} & set(range(n_tokens)))
    tried = []  # (worst nmse, worst ratio, Fused, [ratios])
    for taps, widths, packing in runs:
        if sum(widths) != rows[1] or any(t in claimed or t not in ours for t in taps):
            continue
        f = Fused(name, taps, packing)
        try:
            parts = split(f, x, cfg, widths)
        except UserError:
            continue
        limits = [tol.get(t, "nmse", their_dtype, our_dtype, n_layers) for t in taps]
        quick = []
        for tap, part, _ in parts:
            if tap not in flat:
                flat[tap] = _tokens_major(tap, ours[tap])
            quick.append(nmse(part[few, :QUICK_COLS], flat[tap][few, :QUICK_COLS]) if part.shape == flat[tap].shape
                         else float("inf"))
        if min(quick) > LIKELY_NMSE:
            tried.append((max(quick), max(e / lim for e, lim in zip(quick, limits)), f,
                          [e / lim for e, lim in zip(quick, limits)]))
            continue
        errs, ratios = [], []
        for tap, part, _ in parts:
            y = _canonical(tap, part, cfg, n_tokens, "hf")
            limit = tol.get(tap, "nmse", their_dtype, our_dtype, n_layers)
            e = float("inf") if y is None else _nmse_sampled(y, ours[tap], NEAR * limit)
            errs.append(e)
            ratios.append(e / limit)
        tried.append((max(errs), max(ratios), f, ratios))
    if not tried:
        return None
    tried.sort(key=lambda c: c[0])
    within = [c for c in tried if c[1] <= 1.0]
    blocks = lambda c: ", ".join(f"{t} {fmt_ratio(r)}x" for t, r in zip(c[2].taps, c[3]))  # noqa: E731
    listed = lambda cs: [{"tap": list(c[2].taps), "layout": c[2].layout, "ratio": c[1]} for c in cs[:4]]  # noqa: E731
    if len(within) == 1:
        c = within[0]
        return _fused(name, c[2], "match", c[1], tried, f"fused: every block within its tap's tolerance ({blocks(c)})")
    if len(within) > 1:
        return _line(name, None, "ambiguous", None, listed(within),
                     note="fused: several runs of taps fit within tolerance")
    # Some blocks equal their taps and others do not (a fault inside one block of the matmul): the
    # run is told by the blocks that match, when no other run has any.
    partly = [c for c in tried if any(r <= 1.0 for r in c[3])]
    best = partly[0] if len(partly) == 1 else tried[0]
    if len(partly) == 1 or (not partly and best[0] < LIKELY_NMSE and
                            (len(tried) == 1 or tried[1][0] >= LIKELY_MARGIN * best[0])):
        return _fused(name, best[2], "likely", best[1], tried,
                      f"fused: {'the one run of its width with blocks that match' if partly else 'the closest run'}, "
                      f"but over tolerance ({blocks(best)}): the block over it (or a stage before) is off; check "
                      "the line")
    return _line(name, None, "none", None, listed(tried),
                 note="fused: no run of taps of its width is within tolerance or clearly the closest")


def _fused(name, f: Fused, confidence, ratio, tried, note) -> dict:
    others = [{"tap": list(c[2].taps), "layout": c[2].layout, "ratio": c[1]} for c in tried if c[2] != f][:1]
    line = _line(name, f.entry(), confidence, ratio, others, note)
    line["taps"], line["layout"] = list(f.taps), f.layout
    return line


def fmt_ratio(r: float) -> str:
    from ..formatting import fmt

    return fmt(r)


def _settle(close: dict[str, set[str]]) -> dict[str, str]:
    """Tensors whose one remaining candidate tap no other tensor claims; each assignment takes
    that tap from the others, which may leave them one (elimination), until nothing changes."""
    left = {n: set(ts) for n, ts in close.items() if ts}
    taken: dict[str, str] = {}
    while True:
        claims: dict[str, list[str]] = {}
        for n, ts in left.items():
            for t in ts:
                claims.setdefault(t, []).append(n)
        sure = {n: next(iter(ts)) for n, ts in left.items() if len(ts) == 1 and claims[next(iter(ts))] == [n]}
        if not sure:
            return taken
        taken.update(sure)
        done = set(sure.values())
        left = {n: ts - done for n, ts in left.items() if n not in sure}


def _nmse_sampled(y: np.ndarray, ref: np.ndarray, near: float) -> float:
    """nmse on SAMPLE positions of a big pair; on every position when that comes within `near`."""
    idx = _sample_cached(y.size)
    if idx is None:
        return nmse(y, ref)
    e = nmse(y.reshape(-1)[idx], ref.reshape(-1)[idx])
    return nmse(y, ref) if e <= near else e


@functools.lru_cache(maxsize=8)
def _sample_cached(size: int) -> np.ndarray | None:
    return _sample(size)


def _sample(size: int) -> np.ndarray | None:
    if size <= SAMPLE:
        return None
    return np.sort(np.random.default_rng(0).choice(size, SAMPLE, replace=False))


def _canonical(tap: str, x: np.ndarray, cfg: dict, n_tokens: int, layout: str):
    try:
        y, _, rows, _ = to_canonical(tap, np.asarray(x, np.float32), None, cfg, n_tokens, layout)
    except (ValueError, IndexError):
        return None
    return y if rows is None and tuple(y.shape) == tuple(expected_shape(tap, cfg, n_tokens)) else None


def _others(ratios: dict[str, float], tap: str) -> list[dict]:
    rest = sorted((r, t) for t, r in ratios.items() if t != tap)
    return [{"tap": t, "ratio": r} for r, t in rest[:1]]


def _line(name, tap, confidence, ratio=None, candidates=(), note="") -> dict:
    return {"name": name, "tap": tap, "confidence": confidence, "ratio": ratio, "candidates": list(candidates),
            "note": note}


def describe(line: dict) -> str:
    """One line of the printed suggestion: their name, the tap (or ?), the confidence and why."""
    from ..formatting import fmt

    if line.get("taps"):  # a fused tensor: the taps it holds, side by side
        taps = " | ".join(line["taps"]) + ("" if line.get("layout", "concat") == "concat" else f" ({line['layout']})")
        if line["confidence"] == "given":
            return f"{line['name']} -> {taps}  given ({line['note']})"
        return f"{line['name']} -> {taps}  {line['confidence']} ({fmt(line['ratio'])}x tolerance; {line['note']})"
    if line["confidence"] == "given":
        return f"{line['name']} -> {line['tap']}  given ({line['note']})"
    if line["tap"]:
        nxt = line["candidates"][0] if line["candidates"] else None
        return (f"{line['name']} -> {line['tap']}  {line['confidence']} ({fmt(line['ratio'])}x tolerance"
                + (f"; next closest {nxt['tap']} at {fmt(nxt['ratio'])}x" if nxt else "; no other tap of its size")
                + (f"; {line['note']}" if line["confidence"] == "likely" else "") + ")")
    def cand(c) -> str:
        if not isinstance(c["tap"], list):
            return c["tap"]
        return " | ".join(c["tap"]) + ("" if c.get("layout", "concat") == "concat" else f" {c['layout']}")

    cands = ", ".join(f"{cand(c)} ({fmt(c['ratio'])}x)" for c in line["candidates"])
    return f"{line['name']} -> ?  {line['confidence']}: {line['note']}" + (f": {cands}" if cands else "")

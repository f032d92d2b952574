"""Compare a run (or another engine's dump) with a reference, stage by stage, and
name the first stage that diverges, with its neighbours, the size of the error,
the first non-finite value and a plain-language hint.

The result is a plain dict (the body of the `compare --json` object, also what the
report draws; the commands put results.ResultHeader in front): {status:
"match"|"diverged", first_divergence: {tap, what, hint, qk_permutation, before,
after, error}|None, entries: [{tap, metric, value, tolerance, ok, index, key, source,
details}], stages: [{tap, ok, ratio, metric}], first_nonfinite: {...}|None, skipped,
not_compared, missing, candidate, references, tolerances}. docs/json.md has it all.
"""

from __future__ import annotations

import math

import numpy as np

from .divergence import (QK_STAGES, describe, feature_hint, feature_leads, fused_hint, hint, qk_hint, qk_permutation,
                         stage_key)
from .errors import UserError
from .errorshape import Pattern, printed_pattern, printed_reordering, reordering_words, stage_pattern, unprinted
from .ggml_kernels import kernel_of
from .refs.layout import to_canonical
from .refs.fused import split_fused
from .refs.loaders import load
from .refs.side import (SHORTCUT_LOGITS, SHORTCUT_NORM, SHORTCUT_TAPS, Item, Selector, Side, tap_order,
                        token_axis_of)
from .taps import tap_names
from .tolerances import PRINT_SAFETY, Basis, Tolerances, candidate_basis, scores_of
from .metrics import metrics, softmax_amplification, total_amplification

CONFIG_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "intermediate_size", "vocab_size", "head_dim")


# ---------------------------------------------------------------------------
# Compatibility: refuse a reference made for other ids or another model shape


def incompatibility(candidate: Side, reference: Side, cfg: dict | None) -> str | None:
    """Why these two sides cannot be compared (None when they can)."""
    if candidate.ids is not None and reference.ids is not None and list(candidate.ids) != list(reference.ids):
        from .tokendiff import compare_ids

        diff = compare_ids(reference.ids, candidate.ids)
        first = diff.differences[0].message if diff.differences else ""
        return (f"{reference.name} was made for different token ids: {len(reference.ids)} ids there, "
                f"{len(candidate.ids)} here ({first})")
    nc, nr = candidate.n_tokens, reference.n_tokens
    if nc is not None and nr is not None and nc != nr:
        extra = f" ({reference.ids_note})" if reference.ids_note else ""
        return f"{reference.name} was made for {nr} tokens, this run has {nc}{extra}"
    for other in (reference.config, candidate.config):
        if other and cfg:
            diffs = [f"{k}={other[k]} there vs {cfg[k]} here" for k in CONFIG_KEYS
                     if other.get(k) is not None and cfg.get(k) is not None and int(other[k]) != int(cfg[k])]
            if diffs:
                who = reference.name if other is reference.config else candidate.name
                return f"{who} is for a different model shape: " + ", ".join(diffs)
    return _other_weights(candidate, reference)


def _other_weights(candidate: Side, reference: Side) -> str | None:
    """A full-tensor reference records the sha256 of its weights: name a different checkpoint up
    front, rather than report a 'divergence' at the embedding."""
    wanted, path = reference.provenance.get("weights_sha256"), candidate.provenance.get("weights_path")
    if not wanted or not path:
        return None
    from .reference.hf import weights_digest

    have = weights_digest(path)
    if have == wanted:
        return None
    return (f"{reference.name} was computed on other weights (sha256 {wanted[:12]}…) than "
            f"{candidate.provenance.get('model')} (sha256 {have[:12]}…): regenerate it with scripts/make_reference.py")


# ---------------------------------------------------------------------------
# Entries


def _entry(tap, metric, value, tolerance, index="full", key="", source="", details=None, note="") -> dict:
    ok = bool(value <= tolerance) if not (isinstance(value, float) and math.isnan(value)) else False
    return {"tap": tap, "metric": metric, "value": float(value), "tolerance": float(tolerance), "ok": ok,
            "index": index, "key": key, "source": source, "details": details or {}, "note": note}


class _Ctx:
    def __init__(self, candidate, reference, tol: Tolerances, cfg: dict, n_tokens: int, basis: Basis):
        self.c, self.r, self.cfg, self.T = candidate, reference, cfg, n_tokens
        self.basis = basis.with_reference(reference.dtype or "float32", False)
        self.tol = tol.pinned(self.basis)  # the same tolerance whoever asks (verdict, replay)
        self.L = int(cfg["num_hidden_layers"])
        self._canon: dict = {}
        self.layout: dict = {}  # (side id, tap) -> the notes of the layout brought to canonical
        self._amplification: dict = {}  # tap -> softmax_amplification of the reference's scores

    def tolerance(self, tap, metric):
        return self.tol.amplified(tap, metric, self.amplification(tap), n_layers=self.L)

    def amplification(self, tap) -> float:
        """How much of the scores' tolerance a stage that reads them through exp() may carry, from the
        REFERENCE's scores (a fault cannot widen its own tolerance); 0 for every other stage, and
        when the reference holds no full scores (tolerances.py: Stages that read the scores)."""
        source = scores_of(tap)
        if source is None:
            return 0.0
        if source not in self._amplification:  # once per layer's scores: probs, context and out share them
            try:
                rf, rows = self.full(self.r, source)
            except ValueError:
                rf, rows = None, None
            self._amplification[source] = 0.0 if rf is None or rows is not None else total_amplification(
                softmax_amplification(rf, token_axis_of(source), self.mask_dtype(source)))
        return self._amplification[source]

    def mask_dtype(self, tap):
        """The dtype whose softmax decides what "masked" means (metrics.masked_positions)."""
        return self.basis.dtype_of(tap)

    def full(self, side: Side, tap: str):
        """Side's tensor of tap in canonical layout (np.float64) and the token rows it holds (None: all),
        or (None, None); raises ValueError on a shape that fits no layout."""
        if tap not in side.tensors:
            return None, None
        k = (id(side), tap)
        if k not in self._canon:
            x, _, rows, notes = to_canonical(tap, side.tensors[tap], None, self.cfg, self.T, side.layout)
            self._canon[k] = np.asarray(x, np.float64), rows
            self.layout[k] = ([side.origins[tap]] if tap in side.origins else []) + notes
        return self._canon[k]


def compare_sides(candidate: Side, reference: Side, tol: Tolerances, cfg: dict, n_tokens: int,
                  basis: Basis | None = None) -> dict:
    """Entries for every reference number that the candidate can be compared with, in forward order."""
    ctx = _Ctx(candidate, reference, tol, cfg, n_tokens, basis or judging_basis(candidate))
    entries, missing = [], []
    for tap in tap_order(ctx.L):
        ref_items = [i for i in reference.items if i.tap == tap]
        cand_items = [i for i in candidate.items if i.tap == tap]
        if tap not in reference.tensors and not ref_items:
            continue
        try:
            (cf, c_rows), (rf, r_rows) = ctx.full(candidate, tap), ctx.full(reference, tap)
            if r_rows is not None:
                raise ValueError(f"{reference.name}: {tap} holds only {len(r_rows)} of {n_tokens} token rows")
        except ValueError as e:
            entries.append(_entry(tap, "shape", math.inf, 0, note=str(e), source=reference.name))
            continue
        got = []
        if rf is not None and cf is not None and c_rows is not None:  # their last row(s) only
            got += _full_vs_full(ctx, tap, cf, _rows(rf, c_rows, token_axis_of(tap)), _rows_index(c_rows, n_tokens))
            cf = None  # their items, if any, are compared against our full tensor below
        elif rf is not None and cf is not None:
            got += _full_vs_full(ctx, tap, cf, rf)
            for e in got:  # the layout their tensor came in, named (e.g. heads flattened, K after the GQA repeat)
                if ctx.layout.get((id(candidate), tap)):
                    e["details"]["layout"] = ctx.layout[(id(candidate), tap)]
                    e["note"] = "; ".join(ctx.layout[(id(candidate), tap)])
        elif c_rows is not None:
            cf = None
        for item in ref_items:
            match = next((c for c in cand_items if c.selector == item.selector), None)
            if cf is not None:
                got += _item_entries(ctx, tap, item.selector, cf, None, None, item.value, item)
            elif match is not None:
                got += _item_entries(ctx, tap, item.selector, None, match.value, None, item.value, item)
        if rf is not None and cf is None:
            whole = next((i for i in cand_items if i.selector.kind == "sum" and i.source_shape is not None), None)
            for item in cand_items:
                got += _item_entries(ctx, tap, item.selector, None, item.value, rf, None, item, whole)
        if not got:
            missing.append(tap)
        for e in got:
            e["source"] = reference.name
        entries += got
    return {"entries": entries, "missing": missing}


def _rows_index(rows: list[int], n_tokens: int) -> str:
    """The index of a comparison of some token rows: "last" (the last row only) or "rows[a:b]"."""
    return "last" if rows == [n_tokens - 1] else f"rows[{rows[0]}:{rows[-1] + 1}]"


def _full_vs_full(ctx: _Ctx, tap, a, b, index: str = "full") -> list[dict]:
    masked = tap.endswith("attn.scores_masked")
    m = metrics(a, b, masked=masked, mask_dtype=ctx.mask_dtype(tap))
    details = {k: m[k] for k in ("max_abs", "max_rel", "cosine", "rel_rms", "compared")}
    details["first_nonfinite"] = list(m["first_nonfinite_a"]) if m["first_nonfinite_a"] else None
    tol = ctx.tolerance(tap, "nmse")
    if not m["nmse"] <= tol and stage_key(tap) in QK_STAGES:
        permuted = qk_permutation(a, b, tol)
        if permuted:
            details["qk_permutation"] = permuted
    note = "" if index == "full" else ("last row only" if index == "last" else f"{index} only")
    out = [_entry(tap, "nmse", m["nmse"], tol, index, details=details, note=note)]
    if masked:
        out.append(_entry(tap, "mask_mismatch", m["mask_mismatch"], ctx.tolerance(tap, "mask_mismatch"), index))
    if m["nonfinite"]:
        out.append(_entry(tap, "nonfinite", m["nonfinite"], ctx.tolerance(tap, "nonfinite"), index, details=details))
    if index == "full" and not all(e["ok"] for e in out) and "qk_permutation" not in details \
            and tap not in SHORTCUT_TAPS:
        shape = stage_pattern(tap, a, b, tol, ctx.cfg, ctx.mask_dtype(tap))  # the error's shape: rows, heads, order
        if shape is not None:
            for e in out:
                e["details"]["pattern"] = shape.as_dict()
    return out


def _item_entries(ctx: _Ctx, tap, sel: Selector, cand_full, cand_value, ref_full, ref_value, item: Item,
                  cand_sum: Item | None = None) -> list[dict]:
    """Compare one selected part. Exactly one of (cand_full, cand_value) and one of (ref_full, ref_value) is set.
    `cand_sum`: the candidate's printed sum of the same tensor, which can place a boundary its printed rows miss."""
    axis = token_axis_of(tap)
    full = cand_full if cand_full is not None else ref_full
    index, key = sel.key, item.key
    if sel.kind == "topk":
        return _topk_entries(ctx, tap, sel, cand_full, cand_value, ref_full, ref_value, index, key)
    if sel.kind == "full":  # a sparse dump (llama.cpp log) against a full tensor
        values = cand_value if cand_value is not None else ref_value
        try:
            x, known, rows, notes = to_canonical(tap, values, item.known, ctx.cfg, ctx.T,
                                                   (ctx.c if cand_value is not None else ctx.r).layout)
        except ValueError as e:
            return [_entry(tap, "shape", math.inf, 0, index, key, note=str(e))]
        other = full if rows is None else _rows(full, rows, axis)
        a, b = (x, other) if cand_value is not None else (other, x)
        m = metrics(a, b, known=known, masked=tap.endswith("attn.scores_masked"), mask_dtype=ctx.mask_dtype(tap))
        scale = _rms(other)
        value = m["max_abs"] / scale if scale > 0 else m["max_abs"]
        printed = PRINT_SAFETY * item.resolution
        tol = ctx.tolerance(tap, "rel_rms") + printed / scale if scale > 0 else printed
        details = {"max_abs": m["max_abs"], "compared": m["compared"], "scale_rms": scale, "layout": notes,
                   "first_nonfinite": list(m["first_nonfinite_a"]) if m["first_nonfinite_a"] else None}
        out = [_entry(tap, "rel_rms", value if m["compared"] else (math.inf if m["nonfinite"] else 0.0), tol, index,
                      key, details=details, note="; ".join(notes))]
        if not out[0]["ok"] and cand_value is not None and rows is None and tap not in SHORTCUT_TAPS:
            whole = None
            if cand_sum is not None and np.shape(cand_sum.value) == () and cand_sum.source_shape is not None \
                    and int(np.prod(cand_sum.source_shape)) == np.size(b):  # a sum of every value compared here
                whole = (float(cand_sum.value), cand_sum.resolution)
            heads = (int(ctx.cfg["num_attention_heads"]), int(ctx.cfg["num_key_value_heads"])) \
                if "num_attention_heads" in ctx.cfg and "num_key_value_heads" in ctx.cfg else None
            shape = printed_pattern(tap, a, b, known, ctx.tolerance(tap, "rel_rms"), item.resolution, whole, heads)
            if shape is not None:  # what the printed rows say of the error's shape
                details["pattern"] = shape.as_dict()
            reordered = printed_reordering(tap, a, b, known, ctx.tolerance(tap, "rel_rms"), item.resolution, heads)
            if reordered is not None:  # the reference's values at other positions? (the sum decides: _divergence)
                details["printed_reordering"] = reordered
        if m["nonfinite"]:
            out.append(_entry(tap, "nonfinite", m["nonfinite"], ctx.tolerance(tap, "nonfinite"), index, key,
                              details=details))
        return out
    masked = tap.endswith("attn.scores_masked")
    if masked and sel.kind in ("sum", "row_sum"):
        return []  # a sum of masked scores is the mask value (the dtype's minimum) times a count: not comparable
    if sel.kind == "sum" and item.source_shape is not None:  # their tensor may hold some token rows only
        try:
            _, _, rows, _ = to_canonical(tap, np.zeros(item.source_shape), None, ctx.cfg, ctx.T,
                                           (ctx.c if cand_value is not None else ctx.r).layout)
        except ValueError as e:
            return [_entry(tap, "shape", math.inf, 0, index, key, note=str(e))]
        if rows is not None:
            full = _rows(full, rows, axis)
            cand_full = full if cand_full is not None else None
            ref_full = full if ref_full is not None else None
    a = sel.extract(cand_full, axis) if cand_full is not None else np.asarray(cand_value, np.float64)
    b = sel.extract(ref_full, axis) if ref_full is not None else np.asarray(ref_value, np.float64)
    accumulation, ordered = 0.0, False
    if sel.kind == "sum" and item.accumulation == "float32-sequential" and item.source_shape is not None:
        # their sum is a float32 running sum in their memory order: add ours up the same way
        ours, accumulation = _running_sum_f32(ctx, tap, full, item.source_shape,
                                              (ctx.c if cand_value is not None else ctx.r).layout)
        a, b = (a, ours) if cand_full is None else (ours, b)
        ordered = full is not None and np.size(full) > 0
    if np.shape(a) != np.shape(b):
        return [_entry(tap, "shape", math.inf, 0, index, key, note=f"{np.shape(a)} vs {np.shape(b)}")]
    if masked:
        return _masked_row_entries(ctx, tap, sel, a, b, full, axis, item)
    err = float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
    nonfinite = int(np.sum(~np.isfinite(np.asarray(a, np.float64)) & np.isfinite(np.asarray(b, np.float64))))
    if ordered:
        # A sum in a known order (tolerances.py, sum_err): the per-value errors the tolerance allows
        # add up like a random walk, sqrt(n) of them, not like sum|x|; the two running sums' own
        # roundings (`accumulation`) and the printed digits come on top, in absolute terms.
        metric, scale_is = "sum_err", "sqrt(n)*rms(x)"
        scale = math.sqrt(np.size(full)) * _rms(full)
    else:
        metric = "sum_rel" if sel.kind in ("sum", "row_sum") else "rel_rms"
        scale_is = "sum|x|" if metric == "sum_rel" else "rms of the row"
        scale = sel.scale(full, axis) if full is not None else float(np.max(np.abs(b))) if np.size(b) else 0.0
    value = math.inf if nonfinite or not math.isfinite(err) else (err / scale if scale > 0 else (0.0 if err == 0 else math.inf))
    tol = ctx.tolerance(tap, metric) + ((PRINT_SAFETY * item.resolution + accumulation) / scale if scale > 0 else 0.0)
    details = {"candidate": np.asarray(a).tolist(), "reference": np.asarray(b).tolist(), "max_abs": err,
               "scale": scale, "scale_is": scale_is}
    if ordered:  # the tolerance in the sum's units, and what sum|x| would have allowed (docs/llamacpp.md)
        sum_abs = float(np.sum(np.abs(np.asarray(full, np.float64))))
        details.update(n=int(np.size(full)), accumulation=accumulation, tolerance_abs=tol * scale,
                       tolerance_abs_by_sum_abs=ctx.tolerance(tap, "sum_rel") * sum_abs
                       + PRINT_SAFETY * item.resolution + accumulation)
    return [_entry(tap, metric, value, tol, index, key, details=details, note=item.note)]


def _masked_row_entries(ctx, tap, sel, a, b, full, axis, item) -> list[dict]:
    """Row samples of masked scores: the mask positions must agree; the rest is compared like any row."""
    from .metrics import masked_positions

    m = metrics(a, b, masked=True, mask_dtype=ctx.mask_dtype(tap))
    row = sel.row_of(full, axis) if full is not None else np.asarray(b, np.float64)
    scale = _rms(row[~masked_positions(row, ctx.mask_dtype(tap))])
    value = 0.0 if m["compared"] == 0 else (m["max_abs"] / scale if scale > 0 else math.inf)
    if m["nonfinite"]:
        value = math.inf
    details = {"candidate": np.asarray(a).tolist(), "reference": np.asarray(b).tolist(), "scale": scale}
    return [_entry(tap, "mask_mismatch", m["mask_mismatch"], ctx.tolerance(tap, "mask_mismatch"), sel.key, item.key,
                   details=details),
            _entry(tap, "rel_rms", value, ctx.tolerance(tap, "rel_rms"), sel.key, item.key, details=details)]


def _running_sum_f32(ctx, tap, full, source_shape, layout) -> tuple[float, float]:
    """(float32 running sum of `full` in the memory order of their tensor of `source_shape`, the
    spread two such sums may have). The order: their flat indices, brought to the canonical layout
    by the same transform as their values, then sorted. Two running sums whose inputs differ in
    the last bits round differently at each step: each rounding is uniform within half an ulp of
    that step's partial sum (variance ulp^2/12), two sides, n steps: a random walk of variance
    sum_k ulp(p_k)^2/6, taken at 4 sigma. (The worst case, sum_k ulp(p_k), assumes every rounding
    falls the same way; roundings of sums that differ in their last bits do not.)"""
    index = np.arange(int(np.prod(source_shape)), dtype=np.float64).reshape(source_shape)
    canon, _, rows, _ = to_canonical(tap, index, None, ctx.cfg, ctx.T, layout)
    values = full if rows is None or np.shape(full) == np.shape(canon) else _rows(full, rows, token_axis_of(tap))
    order = np.argsort(np.asarray(canon).ravel(), kind="stable")
    partial = np.cumsum(np.asarray(values, np.float32).ravel()[order], dtype=np.float32)
    if partial.size == 0:
        return 0.0, 0.0
    ulps = np.spacing(np.abs(partial)).astype(np.float64)
    spread = 4.0 * math.sqrt(float(np.sum(ulps * ulps)) / 6.0)
    return float(partial[-1]), spread


def _rows(x: np.ndarray, rows: list[int], axis: int) -> np.ndarray:
    return np.take(x, rows, axis=axis)


def _rms(x) -> float:
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    return float(np.sqrt(np.mean(x * x))) if x.size else 0.0


def _topk_entries(ctx, tap, sel, cand_full, cand_value, ref_full, ref_value, index, key) -> list[dict]:
    axis = token_axis_of(tap)
    c_row = sel.row_of(cand_full, axis).astype(np.float64) if cand_full is not None else None
    r_row = sel.row_of(ref_full, axis).astype(np.float64) if ref_full is not None else None
    c_list = cand_value if cand_value is not None else sel.extract(cand_full, axis)
    r_list = ref_value if ref_value is not None else sel.extract(ref_full, axis)
    row = c_row if c_row is not None else r_row
    scale = _rms(row) if row is not None else float(np.std([e["logit"] for e in r_list]) or 1.0)
    margin = ctx.tolerance(tap, "logit_err") * scale  # logits closer than this are ties

    def cand_logit(i):
        if c_row is not None:
            return float(c_row[i])
        return next((e["logit"] for e in c_list if e["token_id"] == i), None)

    def ref_logit(i):
        if r_row is not None:
            return float(r_row[i])
        return next((e["logit"] for e in r_list if e["token_id"] == i), None)

    pairs = [(e["token_id"], cand_logit(e["token_id"]), e["logit"]) for e in r_list]
    diffs = [abs(c - r) for _, c, r in pairs if c is not None]
    bad = [i for i, c, r in pairs if c is not None and not (math.isfinite(c) and math.isfinite(r))]
    err = math.inf if bad else (max(diffs) if diffs else 0.0)
    out = [_entry(tap, "logit_err", err / scale if scale > 0 else err, ctx.tolerance(tap, "logit_err"), index, key,
                  details={"max_abs": err, "scale_rms": scale, "compared_ids": len(diffs)})]
    c_top, r_top = c_list[0]["token_id"], r_list[0]["token_id"]
    tie = False
    if c_top != r_top:
        a, b = cand_logit(c_top), cand_logit(r_top)
        ra, rb = ref_logit(c_top), ref_logit(r_top)
        tie = (a is not None and b is not None and abs(a - b) <= margin) or \
              (ra is not None and rb is not None and abs(ra - rb) <= margin)
    out.append(_entry(tap, "top1", 0 if c_top == r_top or tie else 1, ctx.tolerance(tap, "top1"), index, key,
                      details={"candidate": c_top, "reference": r_top, "tie": tie}))
    c_ids = {e["token_id"] for e in c_list}
    boundary = r_list[-1]["logit"]
    lost = [e["token_id"] for e in r_list if e["token_id"] not in c_ids and e["logit"] > boundary + margin]
    out.append(_entry(tap, "topk_missing", len(lost), ctx.tolerance(tap, "topk_missing"), index, key,
                      details={"missing_ids": lost, "candidate_ids": [e["token_id"] for e in c_list],
                               "reference_ids": [e["token_id"] for e in r_list]}))
    return out


# ---------------------------------------------------------------------------
# Putting it together


def judging_basis(candidate: Side, forced: str | None = None) -> Basis:
    """The dtype each candidate tensor is judged at, and why (tolerances.Basis has the rule)."""
    taps = [t for t in candidate.taps() if t not in SHORTCUT_TAPS]
    layers = [int(t.split(".")[1]) for t in taps if t.startswith("layers.")]
    what = {"llama.cpp-log": "the log", "stats-json": "the stats JSON", "run": "this package's run"}.get(
        candidate.kind, "the dump")
    return candidate_basis(tap_names(max(layers, default=-1) + 1), candidate.tensor_dtypes, candidate.dtype,
                           forced, what)


def dump_token_rows(candidate: Side, cfg: dict) -> int | None:
    """How many token rows a dump's tensors hold, read off their shapes (the most any tap holds: a
    last-row-only tap holds 1), or None when no tensor tells (stats, sums, 1-D rows)."""
    rows = []
    for tap, x in candidate.tensors.items():
        if tap in SHORTCUT_TAPS or np.ndim(x) < 2:
            continue
        for T in {x.shape[-2], x.shape[0]} if np.ndim(x) == 2 else {x.shape[-2]}:
            try:  # the count at which this tensor fits its tap's layout (a padded KV length aside)
                _, _, held, _ = to_canonical(tap, x, None, cfg, T, candidate.layout)
            except ValueError:
                continue
            if held is None:
                rows.append(T)
                break
    return max(rows) if rows else None


def _token_count_mismatch(candidate: Side, cfg: dict, n_tokens: int) -> str | None:
    """A dump of another prompt length (no ids recorded to say so): bad input, named with both counts."""
    if candidate.ids is not None or candidate.kind not in ("dump", "stats-json"):
        return None
    held = dump_token_rows(candidate, cfg)
    if held is None or held == n_tokens or held == 1:  # 1 row everywhere: a last-row-only dump
        return None
    return (f"{candidate.name} holds {held} token rows (read off its tensors' shapes; it records no token ids) "
            f"but the reference has {n_tokens} tokens: give the ids your engine ran with --token-ids "
            f"(or write them into the dump's 'tokens' metadata, as kit/ does)")


def compare(candidate: Side, references: list[Side], tol: Tolerances, cfg: dict, n_tokens: int,
            basis: Basis | None = None) -> dict:
    """Compare the candidate with every compatible reference; the result dict (see module doc).
    `basis`: the dtype each candidate tensor is judged at (default: judging_basis(candidate))."""
    basis = basis or judging_basis(candidate)
    split_fused(candidate, cfg)  # their fused q|k|v or gate|up, judged as the taps they hold
    mismatch = _token_count_mismatch(candidate, cfg, n_tokens)
    if mismatch:
        raise UserError(mismatch)
    entries, missing, skipped, used = [], [], [], []
    for ref in references:
        reason = incompatibility(candidate, ref, cfg)
        if reason:
            skipped.append({"source": ref.name, "reason": reason})
            continue
        part = compare_sides(candidate, ref, tol, cfg, n_tokens, basis)
        entries += part["entries"]
        missing += [{"source": ref.name, "tap": t} for t in part["missing"]]
        used.append(ref)
    if not used:
        raise UserError("nothing to compare: " + "; ".join(s["reason"] for s in skipped))
    if not entries:
        raise UserError(f"no stage of {', '.join(r.name for r in used)} could be compared with {candidate.name}: "
                        "no tap names in common (give --map for another engine's names)")
    order = {t: k for k, t in enumerate(tap_order(int(cfg["num_hidden_layers"])))}
    entries.sort(key=lambda e: order.get(e["tap"], len(order)))
    stages = _stages(entries)
    first = next((s["tap"] for s in stages if not s["ok"]), None)
    not_compared = [dict(n, source=r.name) for r in used for n in r.not_comparable]
    not_compared += [dict(n, source=candidate.name) for n in candidate.not_comparable]
    return {
        "status": "match" if first is None else "diverged",
        "first_divergence": _divergence(first, stages, entries, int(cfg["num_hidden_layers"]),
                                        _engine_info(candidate, used), cfg) if first else None,
        "first_nonfinite": _first_nonfinite(candidate, order),
        "entries": entries,
        "stages": stages,
        # an undeclared dtype read off the stored tensors is still what the candidate is (not "?")
        "candidate": dict(candidate.header(), **({"dtype": basis.dtype} if basis.source == "storage" and
                                                  not candidate.dtype else {})),
        "references": [r.header() for r in used],
        "skipped": skipped,
        "not_compared": not_compared,
        "missing": missing,
        "tolerances": tol.describe(),
        "tolerance_basis": basis.with_reference(used[0].dtype or "float32", False).as_dict(),
        "partial_rows": {e["tap"]: e["note"] for e in entries if e["metric"] == "nmse" and e["index"] != "full"},
    }


def compared_ids(candidate: Side, references: list[Side]) -> list[int] | None:
    """The compared token ids, from whichever side records them (the result's header needs them)."""
    for side in (candidate, *references):
        if side.ids:
            return [int(i) for i in side.ids]
    return None


def _ratio(e: dict) -> float:
    v, t = e["value"], e["tolerance"]
    if math.isnan(v):
        return math.inf
    if t == 0:
        return 0.0 if v == 0 else math.inf
    return v / t


def _stages(entries: list[dict]) -> list[dict]:
    out: dict[str, dict] = {}
    for e in entries:
        s = out.setdefault(e["tap"], {"tap": e["tap"], "ok": True, "ratio": 0.0, "metric": e["metric"], "worst": e})
        s["ok"] = s["ok"] and e["ok"]
        r = _ratio(e)
        if r > s["ratio"] or s["worst"] is e:
            s.update(ratio=r, metric=e["metric"], worst=e)
    return [{"tap": s["tap"], "ok": s["ok"], "ratio": s["ratio"], "metric": s["metric"],
             "value": s["worst"]["value"], "tolerance": s["worst"]["tolerance"]} for s in out.values()]


def _engine_info(candidate: Side, references: list[Side]) -> dict | None:
    """What a llama.cpp log said about its engine (fused ops, visible taps), from whichever side is one."""
    return next((s.provenance["llama.cpp"] for s in (candidate, *references) if "llama.cpp" in s.provenance), None)


def _divergence(first: str, stages: list[dict], entries: list[dict], n_layers: int, engine: dict | None = None,
                cfg: dict | None = None) -> dict:
    k = next(i for i, s in enumerate(stages) if s["tap"] == first)
    before = stages[k - 1] if k > 0 else None
    after = stages[k + 1] if k + 1 < len(stages) else None
    bad = [e for e in entries if e["tap"] == first and not e["ok"]]
    worst = max(bad, key=_ratio)
    perm = next((e["details"]["qk_permutation"] for e in bad if e["details"].get("qk_permutation")), None)
    printed, reorder_words, reordered = _printed_reordering(first, bad, entries)
    if printed and reordered and printed["kind"] == "qk_permutation":
        perm = {"from_printed_values": True, "fixed_by": printed["fits"][0], "evidence": printed}
    text = qk_hint(first, perm) if perm else hint(first, before, n_layers, {s["tap"] for s in stages[:k]})
    shape = next((e["details"]["pattern"] for e in bad if e["details"].get("pattern")), None)
    printed_ok = [e for e in entries if e["tap"] == first and e["ok"] and e["details"].get("layout") is not None]
    if shape is None and printed_ok and all(e["metric"] in ("sum_rel", "sum_err") for e in bad):
        shape = unprinted(first).as_dict()  # a sum sees what the printed corners hide
    kernel = kernel_of(first, engine, cfg) if engine and cfg else None  # which of llama.cpp's kernels ran it
    if shape is not None and kernel:  # the pattern's next step names the code to read
        shape = dict(shape, next_step=f"{shape['next_step']}; {kernel}")
    elif kernel:
        text = f"{text}; {kernel}"
    feature = None if perm else feature_hint(first, cfg, {s["tap"] for s in stages[:k]})
    if feature:  # what this model adds at the stage: first to check, unless the error's shape says otherwise
        leads = not reordered and feature_leads(first, shape and shape["name"])
        text = f"{feature}; {text}" if leads else f"{text}; {feature}"
    if reordered:  # the right values in another order: that, not the shape of the rows, names the bug
        text = reorder_words + ": " + text
    elif shape is not None:  # the error's shape leads: it names the kind of bug, the stage hint says where
        text = Pattern(**shape).sentence() + "; " + text
    if reorder_words and not reordered:
        text += "; " + reorder_words
    fused = fused_hint(first, engine) if engine else None
    if fused:
        text += "; " + fused
    split = sorted({part for e in bad for part in (e.get("note") or "").split("; ") if " (fused " in part})
    if split:  # their engine computed it in one matmul with its neighbours: the fault is in this block of it
        text += f"; in their dump this is {split[0]}: look at that block of the fused matmul"
    notes = sorted({part for e in bad for part in (e.get("note") or "").split("; ") if part.startswith("llama.cpp ")})
    if notes:
        text += "; " + "; ".join(notes)
    if printed:
        printed = dict(printed, words=reorder_words, reordered=reordered)
    return {"tap": first, "what": describe(first), "hint": text, "qk_permutation": perm, "pattern": shape,
            "printed_reordering": printed,
            "before": before, "after": after,
            "error": {"metric": worst["metric"], "value": worst["value"], "tolerance": worst["tolerance"],
                      "ratio": _ratio(worst), "index": worst["index"], "details": worst["details"]}}


def _printed_reordering(tap: str, bad: list[dict], entries: list[dict]) -> tuple[dict | None, str, bool]:
    """The Q/K-permutation or head-order reading of a log's printed values at the first divergence
    (errorshape.printed_reordering), judged with the printed sum of the same tensor: a reordering keeps
    the sum, so it is said only when that sum's entry passes. (finding, its words, whether it is one)."""
    found = next(((e, e["details"]["printed_reordering"]) for e in bad if e["details"].get("printed_reordering")),
                 None)
    if found is None:
        return None, "", False
    e, printed = found
    sums = [s for s in entries if s["tap"] == tap and s["metric"] in ("sum_err", "sum_rel")
            and s.get("key") == f"{e.get('key')} sum"]
    words, reordered = reordering_words(printed, all(s["ok"] for s in sums) if sums else None)
    return printed, words, reordered


def _first_nonfinite(candidate: Side, order: dict) -> dict | None:
    for tap in sorted(candidate.tensors, key=lambda t: order.get(t, len(order))):
        x = np.asarray(candidate.tensors[tap])
        bad = ~np.isfinite(x)
        if tap.endswith("attn.scores_masked"):
            bad &= ~np.isneginf(x)  # -inf above the diagonal is a mask value, not an overflow
        if bad.any():
            idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), x.shape))
            return {"tap": tap, "index": list(idx), "value": str(x[idx]), "count": int(bad.sum())}
    return None


# ---------------------------------------------------------------------------
# This package's own run as a Side


def run_side(lm, ids: list[int], shortcut: bool = False, name: str | None = None) -> Side:
    """Every tap of one prefill of `ids` as full float32 tensors (+ the 1-layer shortcut if asked)."""
    import mlx.core as mx

    from .runtime import forward

    taps, _ = forward(lm, ids, ["*"], mode="full")
    tensors = {n: np.array(v.astype(mx.float32)) for n, v in taps.tensors.items()}
    if shortcut:
        out0 = taps.tensors["layers.0.out"][None]
        model = lm.model
        norm = lm.ops.rms_norm(out0, model.model.norm.weight, lm.config.rms_norm_eps)
        head = model.model.embed_tokens.as_linear if lm.config.tie_word_embeddings else model.lm_head
        logits = head(norm)
        tensors[SHORTCUT_NORM] = np.array(norm[0].astype(mx.float32))
        tensors[SHORTCUT_LOGITS] = np.array(logits[0].astype(mx.float32))
    return Side(name=name or f"this package ({lm.source.spec}, {lm.dtype})", kind="run", dtype=lm.dtype,
                  ids=list(ids), n_tokens=len(ids), config=lm.config.as_dict(), tensors=tensors,
                  provenance={"model": lm.source.spec, "policy": lm.ops.policy, "kernels": lm.ops.kernels,
                              "weights_path": str(lm.source.path) if lm.source.format == "hf" else None})


def needs_shortcut(references: list[Side]) -> bool:
    return any(i.tap in SHORTCUT_TAPS for r in references for i in r.items)


def compare_run(lm, ids: list[int], reference_path: str, tol: Tolerances) -> dict:
    """This package's run of `ids` against the reference file(s) at `reference_path`: the result dict."""
    from .localize.coverage import coverage

    references = load(reference_path)
    candidate = run_side(lm, ids, shortcut=needs_shortcut(references))
    result = compare(candidate, references, tol, lm.config.as_dict(), len(ids))
    result["coverage"] = coverage(result, candidate, references, lm.config.num_hidden_layers)
    return result


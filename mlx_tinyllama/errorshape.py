"""The shape of an error: how a diverging tensor differs from the reference, said in words a
kernel developer acts on (issue 22).

A first divergence names a stage; the shape of its error names the bug. Rows that match up to
row 32 and are zero after it are a matmul whose M loop stops at a tile boundary, not a wrong
weight; every row but the last wrong is a causal mask one key off (the last query has no next
key to peek at); the right values in another order are a permutation, not an arithmetic fault.
`explain` looks for these shapes, most specific first, on any tensor whose token axis (and, for
head-major stages, head axis) the caller names, and returns the first that holds with the
evidence behind it. It never decides the verdict: the tolerance does that. It only says what the
error looks like and where to look next.

The same shapes work on llama.cpp's printed corners (first and last rows of each axis, and the
sum) through `explain_rows`, which takes the row positions the corners hold, and on one kernel's
output in `vectors check` (vectors/patterns.py maps a kernel vector's axes to token rows, heads and
columns, and adds what only a kernel vector can show: the output of a known mistake recomputed,
`explain_alternative`, and the error's growth with the reduction length, `accumulation`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

# A row (or head, or column) "matches" when its own NMSE is within this many times the stage's
# NMSE tolerance: the tolerance is for the whole tensor, and a single row's error scatters more.
ROW_SLACK = 16.0
# A reordering moves values by their own size: its NMSE is of order 1, far above rounding.
REORDERED_NMSE = 1e-2
# The smallest tile we call a tile: below 4, "rows from 2 on are wrong" is a position bug, not tiling.
MIN_TILE = 4


@dataclass
class Pattern:
    name: str  # rows_zero_from, rows_stale_from, rows_wrong_from, last_partial_tile, all_rows_but_last, ...
    words: str  # what the error looks like: "token rows 0-31 match, rows 32-38 are zero"
    cause: str  # the kinds of bug that make this shape
    next_step: str  # where to look, how to reproduce
    evidence: dict = field(default_factory=dict)

    def sentence(self) -> str:
        return f"{self.words}: {self.cause}; {self.next_step}"

    def as_dict(self) -> dict:
        return {"name": self.name, "words": self.words, "cause": self.cause, "next_step": self.next_step,
                "evidence": self.evidence}


def _nmse(a: np.ndarray, b: np.ndarray) -> float:
    power = float(np.sum(b * b))
    err = float(np.sum((a - b) ** 2))
    return err / power if power > 0 else (0.0 if err == 0 else math.inf)


def _unit_ok(a2: np.ndarray, b2: np.ndarray, budget: float) -> np.ndarray:
    """Per row of two 2-D arrays: within ROW_SLACK x budget of the row's power. A row whose
    reference power is tiny is judged against the mean row power (no 0/0 verdicts)."""
    power = np.sum(b2 * b2, axis=1)
    floor = max(float(np.mean(power)), 1e-300) * 1e-6
    err = np.sum((a2 - b2) ** 2, axis=1)
    ok = err <= ROW_SLACK * budget * np.maximum(power, floor)
    return ok & np.isfinite(a2).all(axis=1)


def _span(idx) -> str:
    """[0, 1, 2, 5, 6] -> '0-2, 5-6'."""
    idx = sorted({int(i) for i in idx})
    parts, start = [], None
    for k, i in enumerate(idx):
        if start is None:
            start = i
        if k + 1 == len(idx) or idx[k + 1] != i + 1:
            parts.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ", ".join(parts)


def tile_of(r: int) -> int:
    """The largest power of two that divides r (r > 0)."""
    return r & -r


def _rows_kind(a2: np.ndarray, b2: np.ndarray, rows: np.ndarray, positions: np.ndarray, budget: float) -> tuple[str, str]:
    """What the wrong rows hold: ('zero', ...), ('stale', 'copies of rows ...'), ('nonfinite', ...),
    or ('wrong', ...)."""
    sub = a2[rows]
    if not np.isfinite(sub).all():
        return "nonfinite", "NaN/Inf"
    if not sub.any(axis=1).any() or not np.abs(sub).max() > 0:
        return "zero", "zero"
    # Stale: each wrong row equals another row of the output or the reference row of another
    # position (a tile buffer not reloaded keeps the previous tile's rows).
    sources = []
    for r in rows:
        hit = None
        for s in range(a2.shape[0]):
            if s == r:
                continue
            if np.array_equal(a2[r], a2[s]) and not np.array_equal(b2[r], b2[s]):
                hit = s
                break
            if _nmse(a2[r:r + 1], b2[s:s + 1]) <= ROW_SLACK * budget and not _nmse(b2[r:r + 1], b2[s:s + 1]) <= ROW_SLACK * budget:
                hit = s
                break
        if hit is None:
            return "wrong", "wrong (non-zero) values"
        sources.append(int(positions[hit]))
    return "stale", "copies of rows " + _span(sources)


def explain_rows(a2: np.ndarray, b2: np.ndarray, positions: list[int], n_rows: int, budget: float, kernel: str,
                 case: str | None = None, ok: np.ndarray | None = None) -> Pattern | None:
    """The token-row shapes, on the rows at `positions` of a tensor with `n_rows` token rows
    (all rows for a full tensor; llama.cpp's printed first and last rows for a log).
    a2, b2: [len(positions), -1] candidate and reference rows; `ok`: which rows are right, when
    the caller judges rows its own way (printed values have a print resolution)."""
    positions = np.asarray(positions)
    ok = _unit_ok(a2, b2, budget) if ok is None else np.asarray(ok, bool)
    if ok.all() or len(ok) < 2:
        return None
    bad = ~ok
    full = len(positions) == n_rows
    repro = (f"; reproduce it one kernel at a time: `trace vectors write vec`, then run your kernel on "
             f"`--cases '{case}.*'` and `trace vectors check`" if case else "")
    first_bad = int(np.argmax(bad))
    which = "token row" if full else "printed token row"
    if n_rows > 2 and first_bad == 1 and positions[0] == 0 and bad[1:].all():
        return Pattern("all_rows_but_first", f"{which} 0 matches, every later {which} differs",
                       "position 0 is where RoPE rotates by nothing: a rotary fault (theta, the sin sign / "
                       "rotation direction, rotate-half vs interleaved pairs, the position index) or a cache "
                       "read that is right only for the first position",
                       f"check RoPE's angle and direction for position 1 in the {kernel}", {"rows": n_rows})
    if first_bad > 0 and bad[first_bad:].all():
        R = int(positions[first_bad])
        last_ok = int(positions[first_bad - 1])
        kind, held = _rows_kind(a2, b2, np.arange(first_bad, len(ok)), positions, budget)
        tail = f"row {R} is" if R == n_rows - 1 else f"rows {R}-{n_rows - 1} are"
        where = (f"token rows 0-{R - 1} match, {tail} {held}" if full else
                 f"the printed token rows up to {last_ok} match, the printed rows from {R} on are {held}"
                 f" (the boundary lies between rows {last_ok + 1} and {R})")
        tile = tile_of(R) if full else 0
        evidence = {"first_wrong_row": R, "rows": n_rows, "held": kind, "rows_compared": [int(p) for p in positions]}
        if full and tile >= MIN_TILE:
            evidence["tile"] = tile
            partial = n_rows - R < tile and n_rows % tile
            cause = (f"the {kernel} computes only the first {R} rows: a tile or batch loop bound at {R} "
                     f"(a multiple of {tile})")
            if partial:
                cause = (f"the last partial tile (rows {R}-{n_rows - 1}: {n_rows} is not a multiple of {tile}) "
                         f"is {'never computed' if kind == 'zero' else 'not loaded (stale)' if kind == 'stale' else 'computed wrong'}: "
                         f"a remainder tile skipped or a tile-loading bound in the {kernel}")
            if kind == "stale":
                cause += "; the wrong rows repeat earlier rows: a tile buffer that is not reloaded"
            step = f"check the M (row) loop and its remainder of the {kernel} at M = {R + 1}{repro}"
            name = f"rows_{kind}_from" if not partial else "last_partial_tile"
            return Pattern(name, where, cause, step, evidence)
        if not full and R - last_ok > 1:
            boundary = 1 << (R.bit_length() - 1)  # the largest power of two in the unseen gap, a likely tile
            boundary = boundary if boundary > last_ok else R
            cause = (f"the {kernel} stops producing right rows somewhere in rows {last_ok + 1}-{R} (a tile or batch "
                     f"loop bound such as {boundary}, or the last partial tile)"
                     + (" and leaves them zero" if kind == "zero" else "") +
                     "; a position-dependent fault from that position is the other candidate")
            evidence["likely_tile"] = boundary
            return Pattern(f"rows_{kind}_from", where, cause,
                           f"dump the full tensor (not only the printed corners) to place the boundary, and check the "
                           f"M (row) loop of the {kernel}{repro}", evidence)
        cause = ("every row from there on is wrong: a position-dependent fault from that position (the KV cache, "
                 "RoPE positions, a batch split) or a row loop bound")
        step = f"check what changes at token position {R} in the {kernel}{repro}"
        if kind == "zero" and full:  # never written: a block of rows the loop skips, whatever its size
            cause = (f"the {kernel} never writes rows {R}-{n_rows - 1} (the last {n_rows - R}): a last partial "
                     f"tile or remainder block that is skipped, or a row loop bound at {R}")
            step = f"check the M (row) loop and its remainder blocks of the {kernel} at M = {R + 1}{repro}"
        return Pattern(f"rows_{kind}_from", where, cause, step, evidence)
    # Right before a block boundary, mostly wrong after it (not every row: a row whose result does
    # not depend on the second block, e.g. its maximum in the first key block, still comes out right).
    B = 1 << (first_bad.bit_length() - 1) if first_bad else 0
    if full and B >= MIN_TILE and bad[B:].mean() >= 0.5:
        n_bad = int(bad[B:].sum())
        return Pattern("rows_mostly_wrong_from",
                       f"token rows 0-{first_bad - 1} match, and {n_bad} of the {n_rows - B} rows from {B} on differ "
                       f"(the first at row {first_bad})",
                       f"a block boundary at {B}: rows past it take a path the first block does not; in attention, "
                       f"a key block of {B} (e.g. an online softmax that does not rescale its running sum and "
                       f"output when a later block raises the row maximum); in a matmul, a second M tile",
                       f"check what the {kernel} does from its second block (row or key {B}) on",
                       {"first_wrong_row": first_bad, "block": B, "wrong_rows_after": n_bad, "rows": n_rows})
    if n_rows > 2 and ok[-1] and positions[-1] == n_rows - 1 and bad[:-1].all():
        return Pattern("all_rows_but_last", f"every {which} but the last ({n_rows - 1}) differs",
                       "queries see keys after their own position: the causal mask is off by one or missing (the "
                       "last query has no later key to peek at, so it alone comes out right)",
                       f"check the mask's bound (key j is visible to query i only if j <= i) in the {kernel}",
                       {"rows": n_rows})
    if bad[0] and ok[1:].all() and n_rows > 2:
        return Pattern("first_row_only", "only token row 0 differs",
                       "something special-cases the first position: a BOS row, positions starting at 1, or the "
                       "first tile's initialisation",
                       f"check how the {kernel} treats position 0", {"rows": n_rows})
    if full and bad.sum() >= 2:
        for p in range(2, max(3, n_rows // 2 + 1)):
            for k in range(p):
                want = (positions % p) == k
                if np.array_equal(bad, want):
                    return Pattern("periodic_rows", f"token rows {k}, {k + p}, {k + 2 * p}, ... (every {p}th) differ",
                                   f"a strided read: a row stride or a loop step of {p} in the {kernel}",
                                   f"check the row stride the {kernel} uses{repro}",
                                   {"period": p, "offset": k, "rows": n_rows})
    return None


def explain_heads(a: np.ndarray, b: np.ndarray, head_axis: int, budget: float, n_kv_heads: int | None,
                  kernel: str) -> Pattern | None:
    """Errors in some heads only; with the KV head count, which query heads read which KV head."""
    A = np.moveaxis(a, head_axis, 0).reshape(a.shape[head_axis], -1)
    B = np.moveaxis(b, head_axis, 0).reshape(b.shape[head_axis], -1)
    ok = _unit_ok(A, B, budget)
    if ok.all() or not ok.any():
        heads_all_bad = not ok.any()
    else:
        heads_all_bad = False
    H = A.shape[0]
    mapping = {}
    for h in np.flatnonzero(~ok):  # which reference head each wrong head holds
        for g in range(H):
            if g != h and _nmse(A[h], B[g]) <= ROW_SLACK * budget:
                mapping[int(h)] = g
                break
    if heads_all_bad and len(mapping) < H // 2:
        return None
    bad = [int(h) for h in np.flatnonzero(~ok)]
    if not bad:
        return None
    words = f"heads {_span(bad)} of {H} differ" + (f", heads {_span(np.flatnonzero(ok))} match" if ok.any() else "")
    ev = {"wrong_heads": bad, "heads": H}
    if mapping:
        ev["holds_head"] = mapping
        pairs = ", ".join(f"{h}->{g}" for h, g in list(mapping.items())[:6])
        words += f"; wrong heads hold other heads' values ({pairs})"
    cause = f"a head index fault in the {kernel}"
    if n_kv_heads and H % n_kv_heads == 0 and H != n_kv_heads:
        rep = H // n_kv_heads
        groups = sorted({h // rep for h in bad})
        ev["kv_groups"] = groups
        cause = (f"the GQA broadcast: query head h must read KV head h // {rep} ({rep} query heads per KV head); "
                 f"heads of KV group(s) {_span(groups)} read another KV head (e.g. h % {n_kv_heads} instead of "
                 f"h // {rep})")
    return Pattern("heads", words, cause, f"check the head -> KV-head index in the {kernel}", ev)


def explain_columns(a2: np.ndarray, b2: np.ndarray, budget: float, kernel: str) -> Pattern | None:
    """Columns (the last axis) right up to C and wrong after: an N edge or a K tail. Garbage after
    C may equal the right value in a few columns by chance (a column of one row, a value that is
    0 on both sides): 90 % of the columns from C on wrong, the last among them, is enough."""
    ok = _unit_ok(a2.T, b2.T, budget)
    if ok.all() or not ok.any():
        return None
    C = int(np.argmax(~ok))
    after = ~ok[C:]
    if C == 0 or not (after.all() or (after.mean() >= 0.9 and after[-1])):
        return None
    n = len(ok)
    zero = not np.abs(a2[:, C:]).max() > 0
    tile = tile_of(C)
    held = "zero" if zero else "wrong"
    words = (f"columns 0-{C - 1} match, columns {C}-{n - 1} are {held}" if after.all() else
             f"columns 0-{C - 1} match, {int(after.sum())} of the {n - C} columns from {C} on are {held}")
    return Pattern("columns_from", words,
                   f"the {kernel} stops at column {C}" + (f" (a multiple of {tile}): an N tile or vector-width "
                                                          f"bound; a remainder block skipped" if tile >= MIN_TILE else ""),
                   f"check the N (column) loop and its remainder of the {kernel}", {"first_wrong_column": C,
                                                                                     "columns": n})


def explain_stride(holds: list, ok, positions, n_rows: int, kernel: str, full: bool) -> Pattern | None:
    """Token rows read at a wrong row stride: row r holds the reference's row r*q (q != 1) wherever
    r*q is a whole row, and no row where it is not (such a read straddles two rows). A stride in the
    wrong element size is the common slip (an f16 copy read with the f32 row length: q = 1/2). Row 0
    reads from the start whatever the stride, so it comes out right.
    `holds[j]`: the reference rows (of all `n_rows`) that the row at `positions[j]` matches; `ok[j]`:
    whether it matches its own."""
    from fractions import Fraction

    ok = np.asarray(ok, bool)
    positions = [int(p) for p in positions]
    if ok.all():
        return None
    ratios = {Fraction(int(s), r) for j, r in enumerate(positions) if not ok[j] and r > 0
              for s in holds[j] if 0 < s != r}
    for q in sorted(ratios, key=lambda f: (f.denominator, f.numerator)):  # the simplest ratio first
        held, straddling, fits = {}, [], True
        for j, r in enumerate(positions):
            src = r * q
            if src.denominator == 1 and src < n_rows:
                if int(src) not in holds[j]:
                    fits = False
                    break
                if not ok[j]:
                    held[r] = int(src)
            elif src.denominator != 1:
                if ok[j]:  # a straddling read that comes out right: not this stride
                    fits = False
                    break
                straddling.append(r)
        if not fits or not held or not (straddling or len(held) >= 2):
            continue
        which = "token row" if full else "printed token row"
        shown = list(held.items())[:6]
        words = (f"{which} 0 matches, rows {', '.join(str(r) for r, _ in shown)} hold the reference's rows "
                 f"{', '.join(str(s) for _, s in shown)} (row r holds row r*{q})"
                 + (f", rows {_span(straddling)} hold no row (they straddle two)" if straddling else ""))
        return Pattern("row_stride", words,
                       f"a strided read: token row r is read at row r*{q}, so the row stride (leading dimension) the "
                       f"{kernel} reads its input with is {q} of the true one (e.g. a row length counted in the wrong "
                       f"element size: an f16 copy read with the f32 row length gives 1/2)",
                       f"check the row stride (leading dimension) of the {kernel}'s input, and the element size of "
                       f"the buffer it reads", {"stride_ratio": str(q), "row_holds": held, "straddling_rows": straddling,
                                               "rows": n_rows})
    return None


def _offset(words: str, kernel: str, evidence: dict) -> Pattern:
    return Pattern("offset", words, "an additive term the same for every token: a bias dropped, added twice, another "
                   "projection's bias added in its place, or one added where none belongs",
                   f"check the bias add after the {kernel}: which bias vector it adds, and that it is broadcast "
                   "over the tokens", evidence)


def explain_offset(a2: np.ndarray, b2: np.ndarray, tol: float, kernel: str) -> Pattern | None:
    """Every token row off by the same vector: removing the mean error over the token rows leaves
    an error within `tol` (NMSE), where the error as it stands is not. a2, b2: [tokens, -1]."""
    if a2.shape[0] < 3 or not _nmse(a2, b2) > tol:
        return None
    offset = np.mean(a2 - b2, axis=0)
    rest = _nmse(a2 - offset, b2)
    if not rest <= tol:
        return None
    return _offset(f"every token row is off by the same vector (removing it leaves NMSE {rest:.3g}, from "
                   f"{_nmse(a2, b2):.3g})", kernel,
                   {"offset_rms": float(np.sqrt(np.mean(offset * offset))), "nmse_after_offset": rest})


def explain_values(a: np.ndarray, b: np.ndarray, budget: float, token_axis: int, kernel: str) -> Pattern | None:
    """Right values in the wrong place, or the right values times a constant."""
    tol = ROW_SLACK * budget
    if not _nmse(a, b) > tol:  # near the reference as it stands: no reordering or factor to find
        return None
    rows_a = np.moveaxis(a, token_axis, 0).reshape(a.shape[token_axis], -1)
    rows_b = np.moveaxis(b, token_axis, 0).reshape(b.shape[token_axis], -1)
    if _nmse(a, b) < REORDERED_NMSE:  # sorting is 1-Lipschitz: a small error sorts smaller, no permutation
        return _scaled(a, b, tol, kernel)
    if _nmse(np.sort(rows_a, axis=1), np.sort(rows_b, axis=1)) <= tol:
        return Pattern("reordered", "the sum matches, the values do not: every token row holds the reference's "
                                    "values in another order",
                       "a permutation, not arithmetic: a transposed or strided read, a head or pair order "
                       "(e.g. Q/K rows without the GGUF permutation), or an interleaved layout",
                       f"check the index order (strides, head split, pair layout) the {kernel} reads and writes",
                       {"sorted_rows_nmse": _nmse(np.sort(rows_a, axis=1), np.sort(rows_b, axis=1))})
    perm = transposition(a, b, tol)
    if perm is not None:
        return transposed(perm, kernel)
    moved = _moved_rows(rows_a, rows_b, tol)
    if moved:
        pairs = ", ".join(f"{r}<-{s}" for r, s in list(moved.items())[:6])
        return Pattern("rows_moved", f"the token rows hold the reference's rows at other positions ({pairs})",
                       "a permutation across positions: rows written to the wrong position, a position index "
                       "off, or a strided read",
                       f"check where the {kernel} writes each token row", {"row_holds": moved})
    return _scaled(a, b, tol, kernel)


def _moved_rows(rows_a: np.ndarray, rows_b: np.ndarray, tol: float) -> dict[int, int] | None:
    """{row: the reference row it holds} when every wrong row is another position's reference row
    and no two rows hold the same one (a permutation, not stale copies)."""
    ok = _unit_ok(rows_a, rows_b, tol / ROW_SLACK)
    if ok.all():
        return None
    moved = {}
    for r in np.flatnonzero(~ok):
        hit = next((s for s in range(rows_b.shape[0]) if s != r and _nmse(rows_a[r], rows_b[s]) <= tol), None)
        if hit is None or ok[hit]:  # a row right in place and again elsewhere: a stale copy, not a move
            return None
        moved[int(r)] = int(hit)
    return moved if len(set(moved.values())) == len(moved) else None


def _scaled(a: np.ndarray, b: np.ndarray, tol: float, kernel: str) -> Pattern | None:
    bb = float(np.sum(b * b))
    if bb > 0:
        c = float(np.sum(a * b)) / bb
        if c != 0 and abs(c - 1) > 1e-3 and _nmse(a, c * b) <= tol:
            return Pattern("scaled", f"the values are the reference's times {c:.6g}",
                           "a wrong constant factor (a scale such as 1/sqrt(head_dim) vs 1/head_dim, a norm weight, "
                           "a missing or doubled multiply)", f"check the constants the {kernel} applies",
                           {"factor": c})
    return None


def transposition(a: np.ndarray, b: np.ndarray, tol: float) -> list[int] | None:
    """The axis order of b (not the identity, up to 4 axes) whose transposition a matches within
    `tol` (an NMSE), if any. The shapes may differ: a [T, H, D] result of an [H, T, D] reference."""
    if a.size != b.size or not 2 <= b.ndim <= 4 or not np.isfinite(a).all():
        return None
    for perm in itertools.permutations(range(b.ndim)):
        if perm != tuple(range(b.ndim)) and b.transpose(perm).shape == a.shape and _nmse(a, b.transpose(perm)) <= tol:
            return list(perm)
    return None


def transposed(axes: list[int], kernel: str) -> Pattern:
    return Pattern("transposed", f"the values are the reference's with axes {axes}", "a transposed read or write",
                   f"check the layout the {kernel} assumes", {"axes": axes})


def explain_alternative(candidate, reference, budget: float, alternatives) -> Pattern | None:
    """The first of `alternatives` ((Pattern, output) pairs: what a known mistake computes, e.g.
    RoPE one position late, scores without the mask) that the candidate equals, within the row
    slack. An alternative equal to the reference itself proves nothing and is passed over."""
    a = np.asarray(candidate, np.float64)
    b = np.asarray(reference, np.float64)
    if not np.isfinite(a).all():
        return None
    tol = ROW_SLACK * budget
    for pattern, output in alternatives:
        alt = np.asarray(output, np.float64)
        if alt.shape == a.shape and np.isfinite(alt).all() and _nmse(a, alt) <= tol and not _nmse(alt, b) <= tol:
            return pattern
    return None


def explain_all_zero(a: np.ndarray, b: np.ndarray, token_axis: int, kernel: str) -> Pattern | None:
    """Every value zero where the reference is not: the output was never written (a loop that runs
    zero times: M below one tile, rounded down to no tiles). The row boundary is 0."""
    if np.abs(a).max(initial=0.0) > 0 or not np.isfinite(a).all() or not b.any():
        return None
    T = a.shape[token_axis] if a.ndim else 1
    return Pattern("rows_zero_from", f"every token row ({T} of {T}) is zero",
                   f"the {kernel} never writes its output: a row or tile loop that runs zero times (fewer rows than "
                   f"one tile, rounded down to no tiles), or the output written elsewhere",
                   f"check the M (row) loop bound and its remainder of the {kernel} at M = {T}",
                   {"first_wrong_row": 0, "rows": T, "held": "zero"})


def explain_nonfinite(a: np.ndarray, b: np.ndarray, token_axis: int, head_axis: int | None,
                      kernel: str) -> Pattern | None:
    """NaN/Inf where the reference is finite, and where they sit (token rows, heads)."""
    bad = ~np.isfinite(a) & np.isfinite(b)
    if not bad.any():
        return None
    first = [int(i) for i in np.unravel_index(int(np.argmax(bad)), a.shape)]
    where = []
    if head_axis is not None:
        heads = np.flatnonzero(np.moveaxis(bad, head_axis, 0).reshape(a.shape[head_axis], -1).any(axis=1))
        where.append(f"heads {_span(heads)} of {a.shape[head_axis]}")
    rows = np.flatnonzero(np.moveaxis(bad, token_axis, 0).reshape(a.shape[token_axis], -1).any(axis=1))
    where.append(f"token rows {_span(rows)} of {a.shape[token_axis]}")
    return Pattern("overflow_nonfinite", f"{int(bad.sum())} NaN/Inf values where the reference is finite "
                                         f"(in {', '.join(where)}; the first at {first})",
                   "an overflow or an invalid operation: exp() without subtracting the row maximum, x² in fp16 "
                   "(RMSNorm above |x| = 256), an fp16 accumulator past 65504, 0/0",
                   f"check the ranges the {kernel} computes in (the largest input, the dtype of each intermediate)",
                   {"nonfinite": int(bad.sum()), "first_at": first, "rows": [int(r) for r in rows]})


def explain_stale_rows(a2: np.ndarray, b2: np.ndarray, budget: float, kernel: str) -> Pattern | None:
    """Wrong rows anywhere (not a tail) that each hold another row's values: a row index that does
    not advance, or a buffer read before it is rewritten."""
    ok = _unit_ok(a2, b2, budget)
    if ok.all() or not ok.any():
        return None
    bad = np.flatnonzero(~ok)
    kind, held = _rows_kind(a2, b2, bad, np.arange(a2.shape[0]), budget)
    if kind != "stale":
        return None
    return Pattern("rows_stale", f"token rows {_span(bad)} of {a2.shape[0]} differ and are {held}",
                   "a row index that does not advance (a row computed once and written again) or a buffer read "
                   "before it is rewritten",
                   f"check how the {kernel} steps its row index and when it reloads its buffers",
                   {"wrong_rows": [int(r) for r in bad], "rows": int(a2.shape[0]), "held": "stale"})


def explain_flushed(a: np.ndarray, b: np.ndarray, kernel: str) -> Pattern | None:
    """Most of the error where the output is 0 and the reference is small but not 0 (a zero block
    of rows or columns is caught before this): small values flushed to zero."""
    flushed = (a == 0) & (b != 0)
    err = (a - b) ** 2
    if not flushed.any() or not err[flushed].sum() >= 0.5 * err.sum():
        return None
    if not float(np.abs(b[flushed]).max()) < math.sqrt(float(np.mean(b * b))):  # large values zeroed: not underflow
        return None
    return Pattern("underflow_zero", f"{int(flushed.sum())} values are 0 where the reference is not "
                                     f"(the largest {float(np.abs(b[flushed]).max()):.3g})",
                   "small values flushed to zero: a flush-to-zero mode, or an intermediate dtype too narrow for them",
                   f"check the intermediate dtypes and the denormal mode of the {kernel}",
                   {"flushed": int(flushed.sum())})


def read_at(tap: str, pattern: Pattern | None) -> Pattern | None:
    """A pattern found on a tensor that is not a tap (a kernel vector) read as at the stage `tap`
    whose kernel computed it: what the stage is changes what a shape points to (row 0 right where
    attention combines keys)."""
    return _over_keys(tap, pattern)


def growth_exponent(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(nmse) against log(n) over (reduction length, NMSE) points
    (None: one n only)."""
    pts = [(math.log(n), math.log(e)) for n, e in points if n > 1 and e > 0 and math.isfinite(e)]
    if len({x for x, _ in pts}) < 2:
        return None
    xs, ys = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    return float(np.polyfit(xs, ys, 1)[0])


def accumulation(pattern: Pattern | None, points: list[tuple[int, float]], kernel: str) -> Pattern | None:
    """A small dense error (`dense_small`) read over several reduction lengths of one kernel (the
    (n, NMSE) of each of its cases): growing at least like sqrt(n) in amplitude (NMSE ~ n^p,
    p >= 0.5) is accumulation precision; otherwise it stays `dense_small`, saying why."""
    if pattern is None or pattern.name != "dense_small":
        return pattern
    p = growth_exponent(points)
    if p is not None and p >= 0.5:
        return Pattern("accumulation_precision",
                       f"{pattern.words}; the NMSE grows like n^{p:.2f} with the reduction length",
                       "an accumulator narrower than float32 (fp16/bf16 partial sums): its rounding error adds up "
                       "over the reduction", f"accumulate the {kernel}'s sums in float32",
                       dict(pattern.evidence, growth_exponent=p))
    pattern.words += (" (one reduction length only)" if p is None else
                      f" (NMSE ~ n^{p:.2f}: not growing with the reduction length)")
    pattern.evidence["growth_exponent"] = p
    return pattern


def explain(candidate, reference, *, token_axis: int, budget: float, kernel: str = "kernel",
            head_axis: int | None = None, n_kv_heads: int | None = None, case: str | None = None) -> Pattern | None:
    """The shape of the error of `candidate` against `reference` (same shape), or None when no
    shape holds. `budget`: the stage's NMSE tolerance; `kernel`: what computes the stage, as the
    hint names it ("q_proj matmul"); `case`: a `vectors` case that reproduces it, if any."""
    a = np.asarray(candidate, np.float64)
    b = np.asarray(reference, np.float64)
    if a.shape != b.shape or a.size == 0 or not np.isfinite(b).all():
        return None
    if np.isfinite(a).all() and _nmse(a, b) <= budget:  # within the stage's tolerance: nothing to explain
        return None
    zero = explain_all_zero(a, b, token_axis, kernel)
    if zero is not None:
        return zero
    T = a.shape[token_axis]
    a2 = np.moveaxis(a, token_axis, 0).reshape(T, -1)
    b2 = np.moveaxis(b, token_axis, 0).reshape(T, -1)
    if head_axis is not None and np.isfinite(a).all():
        # Some heads right and others wrong says more than the values' order: which heads, and which
        # head each wrong one holds (a GQA broadcast reading another KV head is also a reordering).
        ok = _unit_ok(np.moveaxis(a, head_axis, 0).reshape(a.shape[head_axis], -1),
                      np.moveaxis(b, head_axis, 0).reshape(b.shape[head_axis], -1), budget)
        if ok.any() and not ok.all():
            heads = explain_heads(a, b, head_axis, budget, n_kv_heads, kernel)
            if heads is not None:
                return heads
    if np.isfinite(a).all():
        # values flushed to zero where the reference is small can repeat on every row, which also
        # reads as one offset vector: the zeros are the more specific shape
        offset = explain_flushed(a, b, kernel) or explain_offset(a2, b2, ROW_SLACK * budget, kernel)
        if offset is not None:
            return offset
        values = explain_values(a, b, budget, token_axis, kernel)
        if values is not None:
            return values
    # A stride before the row shapes: its rows after row 0 are wrong too, but hold other rows' values.
    if np.isfinite(a2).all() and T * T * a2.shape[1] <= 5e7:  # every row against every reference row
        power = np.sum(b2 * b2, axis=1)
        floor = max(float(np.mean(power)), 1e-300) * 1e-6
        holds = [np.flatnonzero(np.sum((b2 - a2[j]) ** 2, axis=1) <= ROW_SLACK * budget * np.maximum(power, floor))
                 for j in range(T)]
        stride = explain_stride(holds, _unit_ok(a2, b2, budget), range(T), T, kernel, full=True)
        if stride is not None:
            return stride
    rows = explain_rows(a2, b2, list(range(T)), T, budget, kernel, case)
    if rows is not None:
        return rows
    nonfinite = explain_nonfinite(a, b, token_axis, head_axis, kernel)  # not a tail of rows: say where they are
    if nonfinite is not None:
        return nonfinite
    if head_axis is not None:
        heads = explain_heads(a, b, head_axis, budget, n_kv_heads, kernel)
        if heads is not None:
            return heads
    if a.ndim >= 2:
        cols = explain_columns(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), budget, kernel)
        if cols is not None:
            return cols
    found = explain_stale_rows(a2, b2, budget, kernel) or explain_flushed(a, b, kernel)
    if found is not None:
        return found
    nmse = _nmse(a, b)
    if np.isfinite(a).all() and nmse < 1e-2:
        return Pattern("dense_small", f"a small error everywhere (NMSE {nmse:.3g}), no row, head or column stands out",
                       "a precision difference: accumulation in fp16, a missing upcast before a reduction, or "
                       "another rounding order",
                       f"check the accumulation type of the {kernel}; `vectors check` tells accumulation precision "
                       "from a wrong value by how the error grows with the reduction length", {"nmse": nmse})
    return None


def _over_keys(tap: str, pattern: Pattern | None) -> Pattern | None:
    """Row 0 right and every later row wrong, where attention combines keys (probs, context): query
    0 sees one key only, so whatever goes wrong in combining several keys cannot show there. With
    its inputs (Q, K after RoPE) compared and matching before, that points inside the softmax.
    Likewise the first printed rows right and the last wrong, with the boundary unseen: causal query
    row r sees keys 0..r, so the early rows are those that see fewer keys than one key block of a
    tiled kernel; a row loop bound is the matmul reading, not the first one here."""
    from .stages import all_stages

    # a tap ("layers.3.attn.probs") or a layer stage's own name ("attn.probs": a vectors case)
    stage = next((s for s in all_stages() if tap == s.name or tap.endswith("." + s.name)), None)
    if pattern is None or stage is None or not stage.combines_keys:
        return pattern
    if pattern.name in ("rows_wrong_from", "rows_stale_from") and "likely_tile" in pattern.evidence:
        ev = pattern.evidence
        last_ok = max(r for r in ev["rows_compared"] if r < ev["first_wrong_row"])
        pattern.cause = (f"query row r sees keys 0-r, so the right rows (up to {last_ok}) are those that see the fewest "
                         f"keys: a fault that shows once a query sees more keys than the kernel's first key block "
                         f"(a tiled attention kernel's KV tile, e.g. 64 keys), such as an online softmax that does "
                         f"not rescale its running output and sum when a later key block raises the row's maximum, "
                         f"or a key-block loop bound; a query-tile boundary or a position-dependent fault from row "
                         f"{last_ok + 1} on are the other candidates")
        pattern.next_step = ("check how the attention kernel carries its running maximum, sum and output from one key "
                             "block to the next (the rescale by exp(old max - new max) whenever the maximum rises) "
                             "and its key-block loop; dump the full tensor to place the first wrong row (a multiple of "
                             "the key block)")
        return pattern
    if pattern.name != "all_rows_but_first":
        return pattern
    pattern.cause = ("query row 0 sees one key only (itself), so a fault in combining several keys cannot show there: "
                     "the softmax over keys and its accumulation, e.g. an online softmax that does not rescale its "
                     "running output and sum when a later key raises the running maximum; or the scores themselves, "
                     "e.g. a Q·K dot product that drops part of head_dim (a SIMD remainder loop): wrong scores still "
                     "give row 0 its one key's V; a RoPE fault inside a fused kernel is the other candidate")
    pattern.next_step = ("check how the attention kernel combines keys: the running maximum, and the rescale of the "
                         "output and the sum by exp(old max - new max) whenever it rises; then its Q·K dot product "
                         "over all of head_dim, remainder included")
    return pattern


def _offsets(shape: tuple[int, ...]) -> np.ndarray:
    """query position - key position for a [..., T, K] attention tensor whose T query rows are the
    last T of its K key positions (a prefill: T = K; a decode step: T = 1; a chunk in between)."""
    T, K = shape[-2], shape[-1]
    return (K - T + np.arange(T))[:, None] - np.arange(K)[None, :]


def _span_d(ds) -> str:
    ds = sorted(set(int(d) for d in ds))
    return f"{ds[0]}" if len(ds) == 1 else f"{ds[0]}-{ds[-1]}"


def _window(hidden: np.ndarray, d: np.ndarray) -> int | None:
    """The smallest W such that every key W or more positions back is hidden (a sliding window of
    W), or None: a bound read from the whole band, so one low-weight key hidden by effect does not
    move it."""
    back = sorted(set(int(x) for x in d[d > 0].ravel()))
    W = None
    for w in reversed(back):
        if not hidden[d == w].all():
            break
        W = w
    return W


def explain_mask(hidden_a: np.ndarray, hidden_b: np.ndarray, kernel: str) -> Pattern | None:
    """Which keys the candidate's mask hides or shows where the reference's does not, said by the
    distance back from the query (d = query position - key position): d < 0 are future keys (the
    causal bound), d >= W the keys a sliding window of W hides. A mask bug is a wrong bound, so
    the wrong pairs fill a band of d; the row shape alone ("rows 8-11 wrong") would read like a
    tile bound. Future keys shown up to N past every query is the causal bound off by N (or
    missing). None when the masks agree or the wrong pairs fill no band."""
    if hidden_a.shape != hidden_b.shape or hidden_a.ndim < 2:
        return None
    # A mask bound is the same for every head. "Hidden" here is by effect (the verdict's rule), so a
    # key whose score is merely very low is hidden in one head and not another: a pair counts as
    # masked only where every head hides it, and a pair hidden in some heads only is no bound.
    ha = hidden_a.reshape(-1, *hidden_a.shape[-2:]).all(axis=0)
    hb = hidden_b.reshape(-1, *hidden_b.shape[-2:]).all(axis=0)
    if np.array_equal(ha, hb):
        return None
    d = _offsets(ha.shape)
    shown = hb & ~ha  # the candidate shows a key the reference hides
    hid = ha & ~hb  # the candidate hides a key the reference shows
    # ...and a bound shows or hides its pairs in (nearly) every head: pairs wrong in some heads
    # only are a per-head fault, left to the head shapes.
    heads_a = hidden_a.reshape(-1, *hidden_a.shape[-2:])
    heads_b = hidden_b.reshape(-1, *hidden_b.shape[-2:])
    if (hb & ~heads_a.any(axis=0)).sum() < 0.5 * shown.sum() or (ha & ~heads_b.any(axis=0)).sum() < 0.5 * hid.sum():
        return None
    window_ref, window_cand = _window(hb, d), _window(ha, d)
    evidence = {"wrong_pairs": int((shown | hid).sum()), "shown": int(shown.sum()), "hidden": int(hid.sum()),
                "reference_window": window_ref, "candidate_window": window_cand}
    first_pos = ha.shape[1] - ha.shape[0]  # the position of query row 0
    step_w = (f"check the window bound of the mask (key j is visible to query i only if i - W < j <= i) in the "
              f"{kernel}, and the same bound where a decode step picks its cached keys (a ring buffer of W slots)")
    if shown.any() and not hid.any() and (d[shown] >= 0).all() and window_ref is not None:
        rows = first_pos + np.flatnonzero(shown.any(axis=1))
        if window_cand is None:
            return Pattern("mask_window_missing",
                           f"queries at positions {_span(rows)} see keys {window_ref} or more positions back "
                           f"({int(shown.sum())} query-key pairs) that the reference's sliding window of "
                           f"{window_ref} hides; every other pair is masked alike",
                           f"the sliding window is not applied: only the causal bound is (a window size lost "
                           f"from the config or the GGUF, or a mask built without it)", step_w, evidence)
        return Pattern("mask_window_off",
                       f"queries at positions {_span(rows)} see keys {_span_d(d[shown])} positions back, which the "
                       f"reference's sliding window of {window_ref} hides",
                       f"the sliding window is {window_cand} instead of {window_ref}: its bound is off by "
                       f"{window_cand - window_ref} (< vs <=, or W vs W-1)", step_w, evidence)
    if hid.any() and not shown.any() and (d[hid] >= 0).all():
        rows = first_pos + np.flatnonzero(hid.any(axis=1))
        if (d[hid] == 0).all():
            return Pattern("mask_hides_diagonal",
                           f"queries at positions {_span(rows)} do not see their own key (distance 0)",
                           "the causal bound is strict: key j visible only if j < i instead of j <= i",
                           f"check the causal bound of the mask in the {kernel}", evidence)
        if window_cand is not None and (window_ref is None or window_cand < window_ref):
            what = (f"a sliding window of {window_cand} the model does not have (its config has no window)"
                    if window_ref is None else
                    f"a sliding window of {window_cand} instead of {window_ref}: its bound is off by "
                    f"{window_ref - window_cand}")
            return Pattern("mask_window_off" if window_ref is not None else "mask_window_extra",
                           f"queries at positions {_span(rows)} do not see keys {_span_d(d[hid])} positions back, which the "
                           f"reference shows", f"the mask applies {what}", step_w, evidence)
    if shown.any() and not hid.any() and (d[shown] < 0).all():  # future keys: the causal bound
        ahead = int(-d[shown].min())
        if np.array_equal(shown, hb & (d < 0) & (d >= -ahead)):  # every key up to `ahead` past, none further
            rows = np.flatnonzero(shown.any(axis=1))
            extra = shown.sum(axis=1)
            missing = not (hb & (d < 0) & ~shown).any()
            T = ha.shape[0]
            words = (f"every token row but the last ({first_pos + T - 1}) differs"
                     if np.array_equal(rows, np.arange(T - 1)) else
                     f"queries at positions {_span(first_pos + rows)} see keys after their own position")
            cause = ("every query sees every key: the causal mask is missing" if missing else
                     f"each query sees {ahead} key(s) past its own position: the causal mask is off by {ahead}")
            evidence["extra_visible_keys"] = [int(e) for e in extra]
            return Pattern("all_rows_but_last", words, cause + " (the last query has no later key to peek at)",
                           f"check the mask's bound (key j is visible to query i only if j <= i) in the {kernel}",
                           evidence)
    return None  # no single bound: the row shapes say what they can


def stage_pattern(tap: str, candidate, reference, budget: float, cfg: dict, mask_dtype=None) -> Pattern | None:
    """`explain` with the stage's own facts from the tap table: its token axis, its head axis
    (head-major taps, and the merged heads of `attn.context`), the KV head count where query heads
    read shared KV heads, what computes it and its `vectors` case family."""
    from .metrics import masked_positions
    from .stages import stage_of

    stage = stage_of(tap)
    a = np.asarray(candidate, np.float64)
    b = np.asarray(reference, np.float64)
    if stage.masked and a.shape == b.shape:
        # A mask value's size means nothing (-inf, the dtype minimum, -1e4 all mask): compare what
        # each side leaves visible, and a key masked on one side only as a wrong value.
        # masked = no weight after the softmax in the candidate's dtype: the verdict's own rule
        hidden_a, hidden_b = masked_positions(a, mask_dtype), masked_positions(b, mask_dtype)
        mask_shape = explain_mask(hidden_a, hidden_b, stage.kernel or stage.what)
        if mask_shape is not None:
            return mask_shape
        a = np.where(hidden_a, 0.0, a)
        b = np.where(hidden_b, 0.0, b)
        a = np.where(hidden_a != hidden_b, a + np.where(hidden_b, 1.0, -1.0) * (np.abs(b).max() + 1.0), a)
        return explain(a, b, token_axis=stage.token_axis, budget=budget, kernel=stage.kernel or stage.what)
    head_axis = 0 if stage.head_major else None
    merged = "head*dim" in stage.dims
    if merged and a.shape == b.shape and a.ndim == 2:
        heads = int(cfg["num_attention_heads"])
        a, b = a.reshape(a.shape[0], heads, -1), b.reshape(b.shape[0], heads, -1)
        head_axis = 1
    # Query heads that read shared KV heads (after the GQA repeat): a wrong head -> KV-head index
    # shows per KV group.
    gqa = stage.dims[0] == "head" and (stage.key_axis is not None or stage.op == "repeat_kv") or merged
    return _over_keys(tap, explain(a, b, token_axis=stage.token_axis, budget=budget,
                                   kernel=stage.kernel or stage.what, head_axis=head_axis,
                                   n_kv_heads=int(cfg["num_key_value_heads"]) if gqa else None,
                                   case=stage.vectors if stage.vectors.startswith("matmul.") else None))


def printed_pattern(tap: str, candidate, reference, known, tolerance: float, resolution: float,
                    printed_sum: tuple[float, float] | None = None,
                    heads: tuple[int, int] | None = None) -> Pattern | None:
    """The token-row shapes on what an engine printed (llama.cpp's first and last rows along each
    axis): a row is right when its printed values are within the entry's own bound (`tolerance`
    times the reference row's rms, plus the print `resolution`). Only the printed rows are
    seen, so a boundary is placed between the last right and the first wrong printed row, unless
    `printed_sum` (the engine's printed sum of the whole tensor, its print resolution) places it:
    see `place_by_sum`. `heads`: (query heads, KV heads), to read merged heads ([T, H*D]) per head."""
    pattern = _over_keys(tap, _printed_pattern(tap, candidate, reference, known, tolerance, resolution, heads))
    if pattern is not None and printed_sum is not None:
        return place_by_sum(tap, pattern, reference, printed_sum[0], tolerance, printed_sum[1])
    return pattern


def place_by_sum(tap: str, pattern: Pattern, reference, candidate_sum: float, tolerance: float,
                 resolution: float) -> Pattern:
    """Rows zero from an unseen boundary add nothing to the sum: when the printed sum equals the
    reference's sum over rows 0..R-1 for exactly one R in the unseen gap (within that partial sum's
    own rounding and the print resolution), the boundary is R, not just somewhere in the gap.
    Only for zero rows: stale or wrong rows add unknown amounts, so their sum places nothing."""
    from .stages import stage_of

    ev = pattern.evidence
    if pattern.name != "rows_zero_from" or "likely_tile" not in ev or not math.isfinite(candidate_sum):
        return pattern
    stage = stage_of(tap)
    b = np.moveaxis(np.asarray(reference, np.float64), stage.token_axis, 0)
    if not np.isfinite(b).all():
        return pattern
    b2 = b.reshape(b.shape[0], -1)
    printed = ev["rows_compared"]
    last_ok, first_bad = max(r for r in printed if r < ev["first_wrong_row"]), ev["first_wrong_row"]
    prefix = np.concatenate([[0.0], np.cumsum(b2.sum(axis=1))])
    absmax = np.maximum.accumulate(np.abs(b2).max(axis=1))  # the largest |x| of rows 0..R-1, for every R
    fits = []
    for R in range(last_ok + 1, first_bad + 1):
        ok, _ = sum_check(candidate_sum, float(prefix[R]), R * b2.shape[1], float(absmax[R - 1]), tolerance)
        if ok or abs(candidate_sum - prefix[R]) <= 2 * resolution:
            fits.append(R)
    if len(fits) != 1:  # none, or neighbours whose rows sum to about nothing: the sum cannot tell
        ev["sum_places"] = fits
        return pattern
    R, n_rows = fits[0], b2.shape[0]
    # What a full dump of that tensor would show (rows 0..R-1 right, the rest zero), said the same way.
    ok = np.arange(n_rows) < R
    full = explain_rows(np.where(ok[:, None], b2, 0.0), b2, list(range(n_rows)), n_rows, 0.0,
                        stage.kernel or stage.what, stage.vectors if stage.vectors.startswith("matmul.") else None,
                        ok=ok)
    if full is None:
        return pattern
    full.words += (f" (by the printed sum: the printed rows up to {last_ok} match, those from {first_bad} on are "
                   f"zero, and the printed sum is the reference's sum over rows 0-{R - 1} alone)")
    full.evidence.update(boundary_from_sum=R, printed_rows=printed)
    return full


def _printed_pattern(tap: str, candidate, reference, known, tolerance: float, resolution: float,
                     heads: tuple[int, int] | None = None) -> Pattern | None:
    from .stages import stage_of

    stage = stage_of(tap)
    n_kv = None
    if "H*D" in stage.shape and heads and np.ndim(candidate) == 2 and np.shape(candidate)[1] % heads[0] == 0:
        # merged heads [T, H*D]: read per head ([H, T, D]), as a head-major stage, with the KV group size
        n_kv = heads[1]
        split = [np.moveaxis(np.asarray(x).reshape(np.shape(x)[0], heads[0], -1), 1, 0)
                 for x in (candidate, reference, known)]
        candidate, reference, known = split
        stage_shape, token_axis = "[H, T, D]", 1
    else:
        stage_shape, token_axis = stage.shape, stage.token_axis
    a = np.moveaxis(np.asarray(candidate, np.float64), token_axis, 0)
    b = np.moveaxis(np.asarray(reference, np.float64), token_axis, 0)
    k = np.moveaxis(np.asarray(known, bool), token_axis, 0)
    if a.shape != b.shape or a.shape != k.shape:
        return None
    rows = [t for t in range(a.shape[0]) if k[t].any()]
    counts = {int(k[t].sum()) for t in rows}
    if len(rows) < 3 or len(counts) != 1:
        return None
    a2 = np.stack([a[t][k[t]] for t in rows])
    b2 = np.stack([b[t][k[t]] for t in rows])
    scale = np.sqrt(np.mean(b * b, axis=tuple(range(1, b.ndim))))[rows] if b.ndim > 1 else np.abs(b[rows])
    ok = np.isfinite(a2).all(axis=1) & (np.abs(a2 - b2).max(axis=1) <= tolerance * scale + 4 * resolution)
    if np.isfinite(a2).all() and not ok.all():  # which reference rows each printed row holds, at its printed positions
        flat = b.reshape(b.shape[0], -1)
        bound = tolerance * np.sqrt(np.mean(flat * flat, axis=1)) + 4 * resolution  # per reference row
        holds = [np.flatnonzero(np.abs(flat[:, k[r].ravel()] - a[r].ravel()[k[r].ravel()]).max(axis=1) <= bound)
                 for r in rows]
        stride = explain_stride(holds, ok, rows, a.shape[0], stage.kernel or stage.what, full=False)
        if stride is not None:
            stride.evidence["printed_rows"] = rows
            return stride
    pattern = explain_rows(a2, b2, rows, a.shape[0], 0.0, stage.kernel or stage.what, ok=ok)
    if pattern is not None:
        pattern.evidence["printed_rows"] = rows
        return _stale_in_full(pattern, a, b, k, rows, ok, tolerance, resolution, stage.kernel or stage.what)
    if stage_shape.startswith(("[H,", "[KV,")):  # head-major: which printed heads are right
        ha, hb, hk = (np.asarray(x) for x in (candidate, reference, known))
        heads = [h for h in range(ha.shape[0]) if hk[h].any()]
        hscale = np.sqrt(np.mean(np.asarray(hb, np.float64) ** 2))
        right = [bool(np.isfinite(ha[h][hk[h]]).all() and np.abs(ha[h][hk[h]] - hb[h][hk[h]]).max()
                      <= tolerance * hscale + 4 * resolution) for h in heads]
        if any(right) and not all(right):
            wrong = [h for h, r in zip(heads, right) if not r]
            cause = (f"a head index fault in the {stage.kernel or stage.what} (for query heads after the "
                     "projection: the head -> KV-head mapping of the GQA broadcast)")
            ev = {"wrong_heads": wrong, "printed_heads": heads}
            H = ha.shape[0]
            if n_kv and H % n_kv == 0 and H != n_kv:  # which KV group each printed head reads
                rep = H // n_kv
                ev["kv_groups"] = sorted({h // rep for h in wrong})
                cause = (f"the GQA broadcast: query head h must read KV head h // {rep} ({rep} query heads per KV "
                         f"head); printed heads {_span(wrong)} (KV group(s) {_span(ev['kv_groups'])}) read another "
                         f"KV head")
                modulo = [h for h in heads if h % n_kv != h // rep]  # where the common slip h % n_kv shows
                if modulo == wrong:
                    ev["reads"] = f"h % {n_kv}"
                    cause += (f": exactly the printed heads where h % {n_kv} differs from h // {rep}, so the kernel "
                              f"reads KV head h % {n_kv}")
                else:
                    cause += f" (e.g. h % {n_kv} instead of h // {rep}, or a wrong KV head stride)"
            return Pattern("heads", f"printed heads {_span(wrong)} differ, printed heads "
                                    f"{_span([h for h, r in zip(heads, right) if r])} match",
                           cause, f"check the head -> KV-head index in the {stage.kernel or stage.what}; dump the "
                                  f"full tensor to see every head", ev)
    if not ok.all() and np.isfinite(a2).all():
        # every printed row off by the same values at the same printed positions: an offset (after the
        # heads, as in `explain`: some heads right says more)
        offset = np.mean(a2 - b2, axis=0)
        if (np.abs(a2 - offset - b2).max(axis=1) <= tolerance * scale + 4 * resolution).all():
            return _offset(f"every printed token row ({_span(rows)}) is off by the same values", stage.kernel or
                           stage.what, {"printed_rows": rows, "offset_max": float(np.abs(offset).max())})
    return None


def _stale_in_full(pattern: Pattern, a, b, k, rows: list[int], ok, tolerance: float, resolution: float,
                   kernel: str) -> Pattern:
    """Printed rows after a boundary that are wrong may still be right values of other rows: the
    reference is whole, so each wrong printed row is looked up among every reference row (at the
    printed positions). All found: stale rows (a tile buffer not reloaded), with the offset when
    one offset fits all."""
    if pattern.name != "rows_wrong_from":
        return pattern
    ok = np.asarray(ok, bool)
    first = int(np.argmax(~ok))
    flat = b.reshape(b.shape[0], -1)
    bound = tolerance * np.sqrt(np.mean(flat * flat, axis=1)) + 4 * resolution  # per reference row
    held = {}
    for j in range(first, len(rows)):
        r = rows[j]
        at = k[r].ravel()
        want = flat[:, at]  # every reference row at the printed positions, at once
        holds = np.abs(want - a[r].ravel()[at]).max(axis=1) <= bound
        itself = np.abs(want - flat[r, at]).max(axis=1) <= bound  # rows equal to row r itself prove nothing
        hits = np.flatnonzero(holds & ~itself)
        if not hits.size:
            return pattern
        held[r] = int(hits[0])
    offsets = {r - s for r, s in held.items()}
    pattern.name = "rows_stale_from"
    pattern.evidence.update(held="stale", holds_rows=held)
    pattern.words = pattern.words.replace("wrong (non-zero) values", "copies of rows " + _span(held.values()))
    pattern.cause += "; the wrong rows hold other rows' right values: a tile buffer that is not reloaded"
    if len(offsets) == 1:
        d = offsets.pop()
        pattern.evidence["offset"] = d
        pattern.cause += f" (each holds the row {d} before it: a tile of {d} rows" + \
            (f", so the boundary is likely {d * (rows[first] // d)})" if d > 0 and rows[first] >= d else ")")
    return pattern


def printed_reordering(tap: str, candidate, reference, known, tolerance: float, resolution: float,
                       heads: tuple[int, int] | None = None) -> dict | None:
    """Are the printed values of a diverging stage the reference's values at other positions? On a full
    dump, compare says so from every value (divergence.qk_permutation, the transforms' head orders);
    a log prints only the first and last 3 along each axis, so this asks it of those alone:

    - Q/K stages: each printed value equals the reference at the position llama.cpp's per-head row
      permutation (or its inverse) sends it to (a converter that forgot the permutation, or did it twice);
    - head-major stages (and merged heads [T, H*D], read per head): each wrong printed head equals, at
      its printed positions, exactly one other reference head (heads written in another order).

    Returns {"kind": "qk_permutation"|"head_order", "decided": bool, ...evidence}, or None when the
    stage is none of these. `decided` is False when the printed values allow more than one reading (two
    maps fit, a wrong head equals several reference heads) or none fits at all ("fits": []). Whether the
    printed sum agrees (a reordering keeps the sum) is the caller's: it holds the sum's own entry."""
    from .stages import stage_of

    stage = stage_of(tap)
    a, b, k = (np.asarray(x) for x in (candidate, reference, known))
    if a.shape != b.shape or a.shape != k.shape or not k.any():
        return None
    a, b, k = a.astype(np.float64), b.astype(np.float64), k.astype(bool)
    scale = float(np.sqrt(np.mean(b[np.isfinite(b)] ** 2))) if np.isfinite(b).any() else 0.0
    bound = tolerance * scale + 4 * resolution

    def fits(x, y) -> bool:
        return bool(np.isfinite(x).all() and np.abs(x - y).max() <= bound)

    # the projections a GGUF stores permuted, before RoPE (after it the values are no permutation)
    if stage.gguf_permuted and stage.op == "heads" and a.ndim == 3 and a.shape[-1] % 2 == 0:
        from .gguf import permute_qk, unpermute_qk

        H, _, D = a.shape
        rows = np.flatnonzero(k.transpose(0, 2, 1).reshape(H * D, -1).any(axis=1))  # printed (head, dim) rows
        found = []
        for name, fn in (("gguf.unpermute_qk", unpermute_qk), ("gguf.permute_qk", permute_qk)):
            m = fn(np.arange(H * D), H)  # what fn puts at row i: row m[i]; the candidate's row m[i] is ours at i
            src = np.argsort(m)[rows]
            at = k.transpose(0, 2, 1).reshape(H * D, -1)
            ca, rb = a.transpose(0, 2, 1).reshape(H * D, -1), b.transpose(0, 2, 1).reshape(H * D, -1)
            if all(fits(ca[r][at[r]], rb[s][at[r]]) for r, s in zip(rows, src)):
                found.append(name)
        return {"kind": "qk_permutation", "decided": len(found) == 1, "fits": found,
                "printed_rows": [int(r) for r in rows]}
    if "H*D" in stage.shape and heads and a.ndim == 2 and a.shape[1] % heads[0] == 0:
        a, b, k = (np.moveaxis(x.reshape(x.shape[0], heads[0], -1), 1, 0) for x in (a, b, k))
    elif not stage.shape.startswith(("[H,", "[KV,")) or a.ndim != 3:
        return None
    printed = [h for h in range(a.shape[0]) if k[h].any()]
    holds, ambiguous, none = {}, [], []
    for h in printed:
        if fits(a[h][k[h]], b[h][k[h]]):
            continue
        others = [g for g in range(b.shape[0]) if g != h and fits(a[h][k[h]], b[g][k[h]])]
        if len(others) == 1:
            holds[h] = others[0]
        elif others:
            ambiguous.append(h)
        else:
            none.append(h)
    if not holds and not ambiguous and not none:
        return None  # every printed head is right: the error is elsewhere
    return {"kind": "head_order", "decided": not ambiguous, "holds": holds, "ambiguous": ambiguous,
            "no_reference_head": none, "printed_heads": printed}


def reordering_words(diagnosis: dict, sum_ok: bool | None) -> tuple[str, bool]:
    """(the sentence, whether it names a reordering) for `printed_reordering`'s finding and whether
    the printed sum agrees (None: no sum printed). A reordering keeps the sum: a moved sum rules it out."""
    undecided = "not decidable from the printed values"
    if diagnosis["kind"] == "qk_permutation":
        fits = diagnosis["fits"]
        if not fits:
            return "", False  # the printed values are not a within-head permutation of ours: said by nothing
        if len(fits) > 1 or sum_ok is None:
            return (f"Q/K row permutation within heads: {undecided} (the printed rows fit "
                    f"{' and '.join(fits)}{'' if sum_ok is not None else ', and no sum is printed'})"), False
        if not sum_ok:
            return (f"Q/K row permutation within heads: {undecided}: the printed values are the reference's at "
                    f"the positions {fits[0]} moves them to, but the printed sum differs (a reordering keeps it)"), False
        return "the printed values are the reference's at permuted positions and the printed sum matches", True
    holds, ambiguous, none = diagnosis["holds"], diagnosis["ambiguous"], diagnosis["no_reference_head"]
    if none and not holds:
        return "", False  # wrong heads that hold no reference head: not a head order fault
    said = ", ".join(f"printed head {h} holds the reference's head {g}" for h, g in sorted(holds.items()))
    if ambiguous or none or sum_ok is None or not sum_ok:
        why = [f"heads {_span(ambiguous)} equal several reference heads at the printed positions"] if ambiguous else []
        why += [f"heads {_span(none)} hold no reference head"] if none else []
        why += ["no sum is printed"] if sum_ok is None else ["the printed sum differs (a reordering keeps it)"] \
            if not sum_ok else []
        return f"head order: {undecided} ({'; '.join(([said] if said else []) + why)})", False
    return f"the heads are in another order: {said}, and the printed sum matches", True


def unprinted(tap: str) -> Pattern:
    """The printed values of a tensor match and its printed sum does not: the error lies where the
    log prints nothing (llama.cpp prints the first and last 3 rows along each axis). A row-wise
    fault can hide there when the printed rows happen to be right anyway: rows that repeat other
    rows of the same token ids (a chat template repeats its markers) before any position enters."""
    from .stages import stage_of

    stage = stage_of(tap)
    kernel = stage.kernel or stage.what
    return Pattern("unprinted", "the printed values match, the printed sum does not: the error lies in the values "
                                "the log does not print (the rows or columns between its first and last 3)",
                   f"a fault confined to middle rows or columns of the {kernel}, or rows computed from the wrong "
                   "input rows that hold the same values at the printed positions (the same token ids before "
                   "positions enter: e.g. a row index that wraps)",
                   "dump the full tensor to see which rows differ", {})


def sum_check(candidate_sum: float, reference_sum: float, n: int, absmax: float, unit: float) -> tuple[bool, float]:
    """Is a printed sum consistent with the reference's? The tolerance is the sum's own rounding:
    n values, each off by at most `unit` relative to the largest magnitude, summed with
    float32 pairwise error: sqrt(n) x absmax x unit, not sum|x| (a moved sum hides under sum|x|
    when the values cancel). Returns (ok, tolerance)."""
    tol = 4.0 * math.sqrt(max(n, 1)) * max(absmax, 1e-30) * unit
    return abs(candidate_sum - reference_sum) <= tol, tol

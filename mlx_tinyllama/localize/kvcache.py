"""The engine's own KV cache, rebuilt from its step dumps, and which cached key each column of a
step's scores holds.

A decode step's attention reads the keys and values of earlier positions, which its own dump
does not hold; the earlier steps' dumps do (each dumps its `attn.k_rope` and `attn.v` rows). So
the cache a step should have read is the concatenation, in position order, of every step's rows
up to and including its own (a prefill chunk is a step of T rows). Replaying a step's scores
and context from that cache says whether the step's attention read what the engine itself had
written (replay.py); `key_columns` then says which way a read went wrong: a key of another
position, a slot never written (zeros), one past the current position, or the oldest dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

CACHED = ("attn.k_rope", "attn.v")  # what the cache holds per layer: the rotated keys and the values


@dataclass
class StepCache:
    """K/V of every position up to the end of one step: tap -> [KV, S, D], and tap -> why not."""

    position: int  # the step's first token position
    n_keys: int  # S = position + the step's tokens
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)


class CacheBuilder:
    """Feed the steps in position order (`add`); each call returns that step's StepCache."""

    def __init__(self, n_layers: int):
        self.names = [f"layers.{i}.{s}" for i in range(n_layers) for s in CACHED]
        self.rows: dict[str, list[np.ndarray]] = {n: [] for n in self.names}
        self.broken: dict[str, str] = {}  # tap -> why the cache of that tap cannot be had any more
        self.at = 0  # the next position a step must start at for the cache to stay whole

    def add(self, position: int, n_tokens: int, tensors: dict[str, np.ndarray]) -> StepCache:
        if position > self.at:
            gap = f"{self.at}" if position - self.at == 1 else f"{self.at}-{position - 1}"
            why = (f"no step dump holds position{'s' if position - self.at > 1 else ''} {gap}, whose cached "
                   "keys and values later steps read")
            for n in self.names:
                self.broken.setdefault(n, why)
        for n in self.names:
            x = tensors.get(n)
            if x is None:
                self.broken.setdefault(n, f"{n} is not in the step dump of position {position}")
            elif x.ndim != 3 or x.shape[1] != n_tokens:
                self.broken.setdefault(n, f"{n} at position {position} has shape {list(x.shape)}, not "
                                          f"[KV, {n_tokens}, D]")
            elif n not in self.broken:
                self.rows[n].append(x)
        self.at = position + n_tokens
        out = StepCache(position, position + n_tokens)
        for n in self.names:
            if n in self.broken:
                out.missing[n] = self.broken[n]
            else:
                out.tensors[n] = np.concatenate(self.rows[n], axis=1)
        return out


# ---------------------------------------------------------------------------
# Which cached key each column of a step's scores holds


ZEROS = "zeros"


def key_columns(theirs: np.ndarray, q: np.ndarray, keys: np.ndarray, kv_map: np.ndarray,
                tolerance: float) -> list[int | str | None]:
    """Per column of their scores [H, T, S']: the cached position p whose Q·K_p it holds (its error,
    a mean square scaled by the scores' own, within `tolerance`, the stage's NMSE tolerance), ZEROS
    for a column of zeros (a slot never written), None for no cached key. `keys` [KV, S, D], query
    head h reads KV head kv_map[h]."""
    ours = np.einsum("htd,hsd->hts", q.astype(np.float64), keys.astype(np.float64)[kv_map])
    a = theirs.astype(np.float64).reshape(-1, theirs.shape[-1])  # [H*T, S']
    b = ours.reshape(-1, ours.shape[-1])  # [H*T, S]
    scale = float(np.mean(b * b)) or 1.0
    # mean over (head, row) of (their column j - our column s)², for every pair at once (one matmul)
    err = ((a * a).mean(0)[:, None] + (b * b).mean(0)[None, :] - 2.0 * (a.T @ b) / a.shape[0]) / scale
    out: list[int | str | None] = []
    for j in range(a.shape[1]):
        if not np.any(a[:, j]):
            out.append(ZEROS)
            continue
        best = int(np.argmin(err[j]))
        out.append(best if err[j, best] <= tolerance else None)
    return out


def _span(items: list[int]) -> str:
    """[3, 4, 5, 7] -> "3-5, 7"."""
    out, run = [], []
    for i in items:
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(f"{run[0]}" if len(run) == 1 else f"{run[0]}-{run[-1]}")
        run = [i]
    if run:
        out.append(f"{run[0]}" if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ", ".join(out)


def _plural(n: int, word: str) -> str:
    return f"{'one' if n == 1 else n} {word}{'' if n == 1 else 's'}"


def visible_keys(position: int, n_tokens: int, window: int) -> list[int]:
    """The positions the step's last query row may attend: every earlier one, or the last `window`."""
    last = position + n_tokens - 1
    return list(range(max(0, last - window + 1) if window else 0, last + 1))


def placed(cols: list[int | str | None]) -> bool:
    """Whether the columns were told by where they sit in the cache (some hold a cached key or zeros),
    rather than matching no cached key at all (a wrong KV head: the diagnosis tells that)."""
    return any(c is not None for c in cols)


def explain(cols: list[int | str | None], position: int, n_tokens: int, window: int) -> tuple[bool, str]:
    """(consistent, words): whether the columns are the keys the step should read in position order
    (all of them, or a sliding window's last `window`), and what they hold when they are not."""
    S, last = position + n_tokens, position + n_tokens - 1
    if cols == list(range(S)):
        return True, f"the {S} columns hold the keys of positions 0-{last}, as its own cache does"
    shown = visible_keys(position, n_tokens, window)
    if window and cols == shown:
        return True, (f"the {len(cols)} columns hold the keys of positions {_span(shown)}: the sliding window "
                      f"of {window} keys, as its own cache does")
    if window and n_tokens == 1 and cols == list(range(cols[0] if cols and isinstance(cols[0], int) else -1,
                                                       last + 1)) and cols[0] < shown[0]:
        # a ring larger than the window: the older keys are the mask's to hide (scores_masked is replayed)
        return True, (f"the {len(cols)} columns hold the keys of positions {_span(cols)}: the sliding window of "
                      f"{window} and {_plural(shown[0] - cols[0], 'older key')} for the mask to hide")
    at = f"step {position}'s scores" if n_tokens == 1 else f"the scores of the step at {position}-{last}"
    held = [j for j, c in enumerate(cols) if isinstance(c, int)]
    pos = [cols[j] for j in held]
    zeros = [j for j, c in enumerate(cols) if c == ZEROS]
    unknown = [j for j, c in enumerate(cols) if c is None]
    facts = []
    if zeros:
        facts.append(f"column{'s' if len(zeros) > 1 else ''} {_span(zeros)} {'are' if len(zeros) > 1 else 'is'} "
                     "zeros (a slot never written)")
    if unknown:
        facts.append(f"column{'s' if len(unknown) > 1 else ''} {_span(unknown)} match{'' if len(unknown) > 1 else 'es'}"
                     " no cached key")
    unread = [p for p in (shown if window else range(S)) if p not in pos]
    if unread:
        own = " (this step's own key)" if unread == [last] else ""
        facts.append(f"position{'s' if len(unread) > 1 else ''} {_span(unread)}{own} "
                     f"{'are' if len(unread) > 1 else 'is'} never read")
    tail = ("; ".join(facts) + ": ") if facts else ""
    if len(cols) == S:
        bad = [j for j in range(S) if cols[j] != j]
        moved = [j for j in bad if isinstance(cols[j], int)]
        if bad == [S - 1] and not moved:
            return False, (f"{at} do not hold this step's own key (position {last}) in the last column, which "
                           f"{'is zeros' if cols[-1] == ZEROS else 'matches no cached key'}, although its own "
                           "cache holds it: the new K/V row was written to another slot (one late, or at another "
                           "offset) or after attending")
        shifts = {j - cols[j] for j in moved}
        if moved and len(shifts) == 1 and (d := shifts.pop()) > 0:
            j = moved[0]
            many = len(moved) > 1
            return False, (f"{at} used the key of position {cols[j]} in column {j} where its own cache holds "
                           f"position {j} (column{'s' if many else ''} {_span(moved)} hold{'' if many else 's'} "
                           f"position{'s' if many else ''} {_span([cols[m] for m in moved])})"
                           f"; {tail}the KV cache is written {_plural(d, 'position')} late (or read {d} early) "
                           f"from position {bad[0]} on")
    # every key (or, with a window, the window's), then more: keys read past the current position
    expect = next((e for e in (list(range(S)), shown) if len(cols) > len(e) and cols[:len(e)] == e), None)
    if expect is not None:
        extra, n = len(cols) - len(expect), len(expect)
        return False, (f"{at} read {_plural(extra, 'key')} past the current position {last}: {tail}{len(cols)} "
                       f"columns where {_plural(n, 'key')} exist{'s' if n == 1 else ''} (a cache length off by "
                       f"{extra}, or its capacity or padding read as keys; if the mask hides them, dump only the "
                       f"first {n})")
    if pos and len(pos) == len(cols) < len(shown) and pos == shown[:len(pos)]:
        return False, (f"{at} hold only the first {len(pos)} keys (positions {_span(pos)}): {tail}the cache "
                       f"stopped growing at {_plural(len(pos), 'slot')} (a fixed capacity), or the new keys were not "
                       "appended before attending")
    if pos and pos == list(range(pos[0], last + 1)) and len(pos) == len(cols):
        if pos[0] > shown[0]:
            dropped = list(range(shown[0], pos[0]))
            limit = f"the model's window is {window} keys" if window else "the model has no sliding window"
            return False, (f"{at} hold only the last {len(pos)} keys (positions {_span(pos)}): "
                           f"position{'s' if len(dropped) > 1 else ''} {_span(dropped)} "
                           f"{'were' if len(dropped) > 1 else 'was'} dropped: a ring buffer or window of "
                           f"{len(pos)} slots where {limit}")
    if not pos:
        return False, (f"{at}: no column is Q·K of a cached key through the GQA mapping (query head h reads KV "
                       f"head h // n_rep): {tail}the keys are read from another place or through another KV head")
    where = ", ".join(f"column {j}: position {cols[j]}" for j in held)
    return False, f"{at} hold keys out of place ({where}); {tail}".rstrip(": ;")

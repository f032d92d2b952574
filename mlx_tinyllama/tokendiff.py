"""Align two token id sequences and say, in plain words, how they differ.

`expected` is ours (the reference tokenization), `actual` the other engine's ids;
positions in messages are positions in `actual` unless the tokens are missing there.
Recognised causes, beyond generic extra/missing/replaced tokens:
- an extra (or missing) BOS at position 0;
- a special token such as `</s>` written in the text but encoded as text pieces
  (`</`, `s`, `>`) instead of its id, and the reverse;
- the SentencePiece prefix space `▁` (29871) after a special token missing or extra.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SPIECE_SPACE = "▁"


@dataclass
class Difference:
    kind: str  # extra_bos, missing_bos, special_as_text, text_as_special, missing_prefix_space,
    #            extra_prefix_space, insert, delete, substitute
    message: str
    expected_span: tuple[int, int]  # [start, stop) in expected
    actual_span: tuple[int, int]  # [start, stop) in actual
    expected_ids: list[int] = field(default_factory=list)
    actual_ids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind, "message": self.message,
            "expected": {"start": self.expected_span[0], "stop": self.expected_span[1], "ids": self.expected_ids},
            "actual": {"start": self.actual_span[0], "stop": self.actual_span[1], "ids": self.actual_ids},
        }


@dataclass
class Alignment:
    expected: list[int]
    actual: list[int]
    ops: list[tuple[str, int | None, int | None]]  # (equal|substitute|insert|delete, i, j)
    differences: list[Difference]

    @property
    def identical(self) -> bool:
        return not self.differences

    @property
    def distance(self) -> int:
        return sum(op[0] != "equal" for op in self.ops)

    def summary(self) -> str:
        if self.identical:
            return f"identical: {len(self.expected)} ids"
        return (f"{len(self.actual)} ids vs {len(self.expected)} expected, edit distance {self.distance}, "
                f"{len(self.differences)} difference(s)")

    def to_dict(self) -> dict:
        return {
            "identical": self.identical, "expected_length": len(self.expected),
            "actual_length": len(self.actual), "distance": self.distance,
            "differences": [d.to_dict() for d in self.differences],
            "ops": [list(op) for op in self.ops],
        }


# --- alignment -------------------------------------------------------------------


def align(expected, actual) -> list[tuple[str, int | None, int | None]]:
    """Edit-distance (Levenshtein) alignment as a list of (tag, i, j) operations."""
    a, b = list(expected), list(actual)
    head = 0  # the common prefix and suffix need no DP (keeps long prompts fast)
    while head < min(len(a), len(b)) and a[head] == b[head]:
        head += 1
    tail = 0
    while tail < min(len(a), len(b)) - head and a[-1 - tail] == b[-1 - tail]:
        tail += 1
    middle = _levenshtein_ops(a[head:len(a) - tail], b[head:len(b) - tail])
    ops = [("equal", k, k) for k in range(head)]
    ops += [(t, None if i is None else i + head, None if j is None else j + head) for t, i, j in middle]
    ops += [("equal", len(a) - tail + k, len(b) - tail + k) for k in range(tail)]
    return ops


MAX_DP_CELLS = 4_000_000  # beyond this the exact edit distance would take minutes and GBs


def _levenshtein_ops(a: list[int], b: list[int]):
    n, m = len(a), len(b)
    if n * m > MAX_DP_CELLS:
        return _one_hunk_ops(a, b)
    cost = [list(range(m + 1))] + [[i] + [0] * m for i in range(1, n + 1)]
    for i in range(1, n + 1):
        row, prev, ai = cost[i], cost[i - 1], a[i - 1]
        for j in range(1, m + 1):
            row[j] = min(prev[j - 1] + (ai != b[j - 1]), prev[j] + 1, row[j - 1] + 1)
    ops, i, j = [], n, m
    while i or j:  # walk back; prefer the diagonal so replaced runs stay together
        if i and j and cost[i][j] == cost[i - 1][j - 1] + (a[i - 1] != b[j - 1]):
            ops.append(("equal" if a[i - 1] == b[j - 1] else "substitute", i - 1, j - 1))
            i, j = i - 1, j - 1
        elif i and cost[i][j] == cost[i - 1][j] + 1:
            ops.append(("delete", i - 1, None))
            i -= 1
        else:
            ops.append(("insert", None, j - 1))
            j -= 1
    return ops[::-1]


def _one_hunk_ops(a: list[int], b: list[int]):
    """The whole differing middle as one replaced run: linear, where the exact edit distance would take
    minutes and GBs. The first difference (where the middle starts) is still exact."""
    k = min(len(a), len(b))
    return ([("equal" if a[d] == b[d] else "substitute", d, d) for d in range(k)] + [("delete", i, None) for i in range(k, len(a))]
            + [("insert", None, j) for j in range(k, len(b))])


def _hunks(ops, n_expected: int, n_actual: int):
    """Runs of non-equal ops as (i1, i2, j1, j2) spans."""
    hunks, start = [], None
    i_next = j_next = 0  # where the next op would be in each sequence
    for tag, i, j in ops + [("equal", n_expected, n_actual)]:
        if tag == "equal":
            if start is not None:
                hunks.append((start[0], i, start[1], j))
                start = None
        elif start is None:
            start = (i_next, j_next)
        i_next = i + 1 if i is not None else i_next
        j_next = j + 1 if j is not None else j_next
    return hunks


# --- naming the differences --------------------------------------------------------


def compare_ids(expected, actual, tokenizer=None) -> Alignment:
    """Align `actual` (another engine's ids) against `expected` and name each difference.
    `tokenizer` (optional, anything with `piece`, `bos_id`, `special_ids`) supplies pieces."""
    expected, actual = [int(i) for i in expected], [int(i) for i in actual]
    ops = align(expected, actual)
    namer = _Namer(tokenizer if tokenizer is not None else _packaged_tokenizer())
    diffs = [namer.name(expected, actual, *h) for h in _hunks(ops, len(expected), len(actual))]
    return Alignment(expected, actual, ops, diffs)


def _packaged_tokenizer():
    """TinyLlama's (Llama 2's) tokenizer shipped with the package: pieces when none is given."""
    from pathlib import Path

    from .tokenizer import Tokenizer

    return Tokenizer.from_file(Path(__file__).parent / "data" / "tokenizer.model")


class _Namer:
    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.bos = getattr(tokenizer, "bos_id", 1) if tokenizer is not None else 1
        specials = getattr(tokenizer, "special_ids", None) if tokenizer is not None else None
        self.specials = {i: p for p, i in (specials or {"<unk>": 0, "<s>": 1, "</s>": 2}).items()}

    def piece(self, i: int) -> str | None:
        if i in self.specials:
            return self.specials[i]
        try:
            return self.tok.piece(i) if self.tok is not None else None
        except Exception:  # an id outside the vocabulary: show the id alone
            return None

    def show(self, ids, limit: int = 8) -> str:
        """Ids with their pieces; long runs keep their first and last few."""
        one = lambda i: f"{i} `{p}`" if (p := self.piece(i)) is not None else str(i)  # noqa: E731
        if len(ids) <= limit:
            return ", ".join(one(i) for i in ids)
        half = limit // 2
        return ", ".join([one(i) for i in ids[:half]] + [f"... ({len(ids) - limit} more)"] + [one(i) for i in ids[-half:]])

    def name(self, expected, actual, i1, i2, j1, j2) -> Difference:
        exp, act = expected[i1:i2], actual[j1:j2]
        make = lambda kind, msg: Difference(kind, msg, (i1, i2), (j1, j2), exp, act)  # noqa: E731
        for check in (self._bos, self._special_text, self._prefix_space):
            found = check(expected, exp, act, i1, j1)
            if found:
                return make(*found)
        if not exp:
            return make("insert", f"extra {_count(act)} {_at(j1, j2)}: {self.show(act)}")
        if not act:
            return make("delete", f"missing {_count(exp)} {self.show(exp)} "
                                  f"(expected {_at(i1, i2)}; before position {j1})")
        return make("substitute", f"{_at(j1, j2)}: {self.show(act)} instead of {self.show(exp)}")

    def _bos(self, expected, exp, act, i1, j1):
        if not exp and act == [self.bos]:
            return "extra_bos", f"extra BOS (id {self.bos}) at position {j1}"
        if exp == [self.bos] and not act:
            return "missing_bos", f"missing BOS (id {self.bos}) at position {i1}"
        return None

    def _special_text(self, expected, exp, act, i1, j1):
        """A special token on one side whose literal text is spelled out by pieces on the other."""
        for ours, theirs, kind in ((exp, act, "special_as_text"), (act, exp, "text_as_special")):
            names = [self.specials[i] for i in ours if i in self.specials]
            text_pieces = [self.piece(i) for i in theirs if i not in self.specials]
            if not names or None in text_pieces:
                continue
            joined = "".join(text_pieces)
            spelled = [s for s in dict.fromkeys(names) if s in joined]
            if not spelled:
                continue
            shown = ", ".join(f"`{p}`" for p in text_pieces)
            ids = ", ".join(str(self._id_of(s)) for s in spelled)
            what = " and ".join(f"`{s}`" for s in spelled)
            token = "token" if len(spelled) == 1 else "tokens"
            if kind == "special_as_text":
                return kind, f"{what} was encoded as text ({shown}) instead of the special {token} {ids} {_at(j1, j1 + len(act))}"
            return kind, (f"{what} was read as the special {token} {ids} instead of text ({shown}) "
                          f"{_at(j1, j1 + len(act))}")
        return None

    def _prefix_space(self, expected, exp, act, i1, j1):
        """`▁` after a special token: each text segment's SentencePiece dummy prefix."""
        after = self.specials.get(expected[i1 - 1]) if i1 > 0 else None
        if after is None:
            return None
        if len(exp) == 1 and not act and self.piece(exp[0]) == SPIECE_SPACE:
            return "missing_prefix_space", (
                f"missing prefix space `{SPIECE_SPACE}` (id {exp[0]}) after `{after}` at position {j1}: the text "
                f"after a special token was not given SentencePiece's dummy prefix (a non-legacy tokenizer)")
        if len(act) == 1 and not exp and self.piece(act[0]) == SPIECE_SPACE:
            return "extra_prefix_space", f"extra prefix space `{SPIECE_SPACE}` (id {act[0]}) after `{after}` at position {j1}"
        return None

    def _id_of(self, piece: str) -> int:
        return next(i for i, p in self.specials.items() if p == piece)


def _count(ids) -> str:
    return "token" if len(ids) == 1 else f"{len(ids)} tokens"


def _at(start: int, stop: int) -> str:
    return f"at position {start}" if stop - start <= 1 else f"at positions {start}-{stop - 1}"

"""One set of numbers to compare, in one shape: a `Side` holds full tensors under
canonical tap names and/or `Item`s, each a canonical tap plus a `Selector` saying which
part of that tap the number is."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ..errors import UserError
from ..taps import split_name, stage_of, tap_names


# Taps of the seed's 1-layer shortcut (candle_1layer_reference.json): the final norm and
# the lm_head applied directly to layer 0's output. Only a run that does the same
# shortcut can be compared with them (compare.py computes it from the layers.0.out tap).
SHORTCUT_NORM = "shortcut.final_norm(layers.0.out)"
SHORTCUT_LOGITS = "shortcut.logits(layers.0.out)"
SHORTCUT_TAPS = (SHORTCUT_NORM, SHORTCUT_LOGITS)


# ---------------------------------------------------------------------------
# Selectors and items


@dataclass(frozen=True)
class Selector:
    """Which part of a tap a reference number is.

    kind: full | row | sum | row_sum | topk. `row` is a token position (0, -1, ...);
    a row of a head-major tap ([H, T, ...]) is head 0's row, as taps.Taps' first/last.
    """

    kind: str
    row: int | None = None
    cols: tuple[int, int] | None = None  # None: the whole row
    k: int | None = None

    @property
    def key(self) -> str:
        r = {0: "row0", -1: "last"}.get(self.row, f"row{self.row}")
        if self.kind == "row":
            return f"{r}[{self.cols[0]}:{self.cols[1]}]" if self.cols else f"{r}[:]"
        if self.kind == "row_sum":
            return f"{r}.sum"
        if self.kind == "topk":
            return f"top{self.k}({r})"
        return self.kind

    @classmethod
    def parse(cls, text: str) -> "Selector":
        m = re.fullmatch(r"(row(-?\d+)|last)(\[(\d*):(\d*)\]|\.sum)|top(\d+)\((row(-?\d+)|last)\)|full|sum", text)
        if not m:
            raise UserError(f"bad index {text!r}: expected full, sum, row0[0:3], last[0:3], last.sum, top10(last)")
        if text in ("full", "sum"):
            return cls(text)
        if m.group(6):
            return cls("topk", row=-1 if m.group(7) == "last" else int(m.group(8)), k=int(m.group(6)))
        row = -1 if m.group(1) == "last" else int(m.group(2))
        if m.group(3) == ".sum":
            return cls("row_sum", row=row)
        cols = (int(m.group(4)), int(m.group(5))) if m.group(4) else None
        return cls("row", row=row, cols=cols)

    def row_of(self, x: np.ndarray, token_axis: int) -> np.ndarray:
        if x.ndim == 1:
            return x
        return (x[self.row] if token_axis == 0 else x[0, self.row]).reshape(-1)

    def extract(self, x: np.ndarray, token_axis: int):
        """The part of full tensor x (canonical layout) this selector names."""
        if self.kind == "full":
            return x
        if self.kind == "sum":
            return np.float64(np.sum(x[np.isfinite(x)], dtype=np.float64))
        row = self.row_of(x, token_axis).astype(np.float64)
        if self.kind == "row":
            return row[self.cols[0]:self.cols[1]] if self.cols else row
        if self.kind == "row_sum":
            return np.float64(np.sum(row[np.isfinite(row)]))
        order = np.argsort(-np.nan_to_num(row, nan=-np.inf), kind="stable")[: self.k]
        return [{"token_id": int(i), "logit": float(row[i])} for i in order]

    def scale(self, x: np.ndarray, token_axis: int) -> float:
        """The size an error of this item is measured against: RMS (values) or L1 (sums)."""
        part = x if self.kind in ("full", "sum") else self.row_of(x, token_axis)
        part = np.asarray(part, np.float64)
        part = part[np.isfinite(part)]
        if part.size == 0:
            return float("nan")
        if self.kind in ("sum", "row_sum"):
            return float(np.sum(np.abs(part)))
        return float(np.sqrt(np.mean(part * part)))


@dataclass
class Item:
    tap: str
    selector: Selector
    value: object  # np.ndarray, float, or a top-k list of {token_id, logit}
    key: str = ""  # where it came from in its file
    known: np.ndarray | None = None  # sparse full tensors: which positions hold values
    resolution: float = 0.0  # absolute precision of the printed values
    note: str = ""
    token_rows: list[int] | None = None  # only these token positions (e.g. llama.cpp's last layer)
    source_shape: tuple | None = None  # sums of another engine's tensor: its shape, to find the rows it covers
    accumulation: str = ""  # how their sum was accumulated: "" exact, "float32-sequential" (ggml's running sum)


@dataclass
class Side:
    name: str
    kind: str  # full-tensors | seed-json | run | dump | stats-json | llama.cpp-log
    dtype: str | None = None  # the precision it declares (metadata, a stats JSON's dtype); None = not declared
    tensor_dtypes: dict[str, str] = field(default_factory=dict)  # tap -> the dtype its tensor was stored in
    ids: list[int] | None = None
    n_tokens: int | None = None
    config: dict | None = None  # (partial) model shape
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    items: list[Item] = field(default_factory=list)
    not_comparable: list[dict] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    layout: str = "hf"  # hf | gguf (Q/K rows permuted per head)
    ids_note: str = ""
    # Fused tensors (refs/fused.py): (Fused, their array), the array None once split into `tensors`;
    # `origins` says where each split tap came from (a layout note of its comparison).
    fused: list = field(default_factory=list)
    origins: dict[str, str] = field(default_factory=dict)

    def taps(self) -> set[str]:
        return set(self.tensors) | {i.tap for i in self.items} | {t for f, _ in self.fused for t in f.taps}

    def header(self) -> dict:
        out = {"name": self.name, "kind": self.kind, "dtype": self.dtype, "n_tokens": self.n_tokens,
               "provenance": self.provenance, "layout": self.layout}
        if self.fused:
            out["fused"] = [{"name": f.name, "taps": list(f.taps), "layout": f.layout} for f, _ in self.fused]
        return out


def tap_order(n_layers: int) -> list[str]:
    return tap_names(n_layers) + list(SHORTCUT_TAPS)


def token_axis_of(tap: str) -> int:
    return 0 if tap in SHORTCUT_TAPS else stage_of(tap).token_axis


def is_known_tap(tap: str) -> bool:
    if tap in SHORTCUT_TAPS:
        return True
    try:
        layer, _ = split_name(tap)
        stage_of(tap)
    except (KeyError, ValueError):
        return False
    return layer is None or layer >= 0

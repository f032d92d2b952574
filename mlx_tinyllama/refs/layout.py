"""Layouts made canonical: batch dim, ggml's reversed dims, heads split or merged,
GGUF's per-head Q/K row permutation, padded KV length, only the last token's rows."""

from __future__ import annotations

import numpy as np

from ..stages import LAYER_STAGES, stage_of
from .side import SHORTCUT_NORM, SHORTCUT_TAPS, token_axis_of


# ---------------------------------------------------------------------------
# Layouts


def expected_shape(tap: str, cfg: dict, n_tokens: int) -> tuple[int, ...]:
    """The canonical shape of a tap for a prefill of n_tokens (S = T)."""
    if tap in SHORTCUT_TAPS:
        return (n_tokens, cfg["hidden_size"] if tap == SHORTCUT_NORM else cfg["vocab_size"])
    return stage_of(tap).sizes(cfg, n_tokens)


def unpermute_gguf(x: np.ndarray) -> np.ndarray:
    """GGUF stores Q/K rows of each head as interleaved pairs (gguf[2i+h] = hf[h*D/2+i]); undo it
    on the last axis (one head's D values): gguf.unpermute_qk, the weights' own, with one head."""
    from ..gguf import unpermute_qk  # lazy: gguf.py imports MLX

    return np.moveaxis(unpermute_qk(np.moveaxis(x, -1, 0), 1), 0, -1)


QK_TAPS = tuple(s.name for s in LAYER_STAGES if s.gguf_permuted)  # a GGUF permutes their rows per head


def to_canonical(tap: str, x: np.ndarray, known: np.ndarray | None, cfg: dict, n_tokens: int,
                 layout: str = "hf"):
    """Bring another engine's tensor to the canonical layout of `tap`.

    Returns (x, known, token_rows, notes); token_rows is None (all T rows) or the token
    positions x holds (llama.cpp keeps only the last token's rows in the last layer).
    Raises ValueError with a plain message when no known layout fits.
    """
    want = expected_shape(tap, cfg, n_tokens)
    notes = []
    arrays = [x] if known is None else [x, known]

    def apply(fn):
        return [fn(a) for a in arrays]

    while arrays[0].shape and arrays[0].shape[0] == 1 and (
            arrays[0].ndim > len(want) or (arrays[0].ndim == 3 and want[0] != 1)):  # batch dimension
        arrays = apply(lambda a: a[0])
    # ggml drops a 1-token dimension (its outermost): [hidden] for [T, hidden], [H, D] or [H*D] for [H, T, D]
    one = arrays[0].shape
    if (len(want) == 2 and one == want[1:]) or (len(want) == 3 and one in ((want[0], want[2]), (want[0] * want[2],))):
        arrays = apply(lambda a: a[None])
    shape = arrays[0].shape
    st = stage_of(tap) if tap not in SHORTCUT_TAPS else None
    tok_axis = token_axis_of(tap)
    if len(want) == 3:
        H, T, D = want
        if shape == (shape[0], H * D) and len(shape) == 2:
            arrays = apply(lambda a: a.reshape(a.shape[0], H, D).transpose(1, 0, 2))
            notes.append("split [T, heads*D] into heads")
        elif len(shape) == 3 and shape[1:] == (H, D) and shape != want:
            arrays = apply(lambda a: a.transpose(1, 0, 2))
            notes.append("[T, heads, D] (ggml order) -> [heads, T, D]")
    if st is not None and "head*dim" in st.dims and len(shape) == 3:
        arrays = apply(lambda a: a.transpose(1, 0, 2).reshape(a.shape[1], -1))
        notes.append("merged heads [heads, T, D] -> [T, heads*D]")
    shape = arrays[0].shape
    if len(shape) == len(want) and shape != want and tuple(reversed(shape)) == want and len(shape) == 2:
        arrays = apply(lambda a: a.T)
        notes.append("transposed")
        shape = arrays[0].shape
    if st is not None and st.key_axis == 2 and len(shape) == 3 and shape[:2] == want[:2] and shape[2] > want[2]:
        arrays = apply(lambda a: a[..., : want[2]])
        notes.append(f"KV length padded to {shape[2]}: first {want[2]} key positions kept")
        shape = arrays[0].shape
    token_rows = None
    if len(shape) == len(want) and shape != want:
        t_len = shape[tok_axis]
        other_ok = all(s == w for d, (s, w) in enumerate(zip(shape, want)) if d != tok_axis)
        if other_ok and t_len < want[tok_axis]:
            token_rows = list(range(want[tok_axis] - t_len, want[tok_axis]))
            notes.append(f"holds the last {t_len} token(s) only")
        else:
            raise ValueError(f"shape {list(x.shape)} does not fit {tap} {list(want)} in any known layout")
    elif shape != want:
        raise ValueError(f"shape {list(x.shape)} does not fit {tap} {list(want)} in any known layout")
    if layout == "gguf" and st is not None and st.gguf_permuted:
        arrays = apply(unpermute_gguf)
        notes.append("GGUF per-head Q/K row permutation undone")
    return arrays[0], (arrays[1] if known is not None else None), token_rows, notes

"""Layouts made canonical, read from each stage's dims (stages.py): a batch axis, any order of
the axes (ggml's reversed ne order included), heads split or merged, K/V after the GQA repeat,
GGUF's per-head Q/K row permutation, padded KV length, only the last token's rows."""

from __future__ import annotations

import itertools

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


def _token_subset(shape: tuple, want: tuple, tok_axis: int) -> bool:
    """Only some token rows (llama.cpp's last layer): every other axis as wanted."""
    return len(shape) == len(want) and shape[tok_axis] < want[tok_axis] and all(
        s == w for d, (s, w) in enumerate(zip(shape, want)) if d != tok_axis)


def _names(dims: tuple[str, ...], order) -> str:
    return "[" + ", ".join(dims[i] for i in order) + "]"


def _layout_of(st, x: np.ndarray, want: tuple, cfg: dict):
    """(fn, note) that brings x (another engine's layout of stage `st`) to `want`, read from the
    stage's dims: GQA-expanded K/V, flattened heads of any head-major stage, or any order of its
    axes (ggml's reversed `ne` order included). None when none fits. Raises ValueError for an
    expansion whose heads are no repeat."""
    shape, dims = x.shape, st.dims
    if dims[0] == "kv_head":  # K/V after the GQA repeat: [H, ...] for a [KV, ...] tap
        kv, heads = want[0], cfg["num_attention_heads"]
        if heads != kv and heads % kv == 0 and shape == (heads,) + want[1:]:
            return _gqa_reduce(x, kv, heads // kv, want)
    if st.head_major and len(shape) == 2 and shape == (want[1], int(np.prod(want)) // want[1]):
        rest = want[2:]  # [T, heads*rest] -> [heads, T, rest]
        return (lambda a: np.moveaxis(a.reshape((a.shape[0], want[0]) + rest), 0, 1),
                f"split [T, {dims[0]}*{'*'.join(dims[2:])}] into {_names(dims, range(len(dims)))}")
    if len(shape) == len(want) and sorted(shape) == sorted(want):
        n = len(want)
        fits = [p for p in itertools.permutations(range(n)) if tuple(want[i] for i in p) == shape]
        rev = tuple(reversed(range(n)))
        fits.sort(key=lambda p: p != rev)  # equal sizes leave a choice: ggml's reversed order first
        if fits:
            p = fits[0]
            note = f"axes {_names(dims, p)} -> {_names(dims, range(n))}"
            if p == rev and n > 2:
                note += " (ggml's ne order read as the shape)"
            return (lambda a: a.transpose(np.argsort(p))), note
    return None


def _gqa_reduce(x: np.ndarray, kv: int, n_rep: int, want: tuple):
    """[H, ...] K or V after the GQA repeat -> [KV, ...], after checking each group's heads are one
    KV head's copies: repeat-interleaved (head h = KV head h // n_rep) or tiled (h % KV)."""
    rest = want[1:]
    interleaved = x.reshape((kv, n_rep) + rest)
    if all(np.array_equal(interleaved[:, r], interleaved[:, 0], equal_nan=True) for r in range(1, n_rep)):
        return (lambda a: a.reshape((kv, n_rep) + rest)[:, 0],
                f"GQA-expanded K/V: {kv * n_rep} heads, each KV head repeated {n_rep} times (head h = KV head "
                f"h // {n_rep}), reduced to its {kv} KV heads")
    tiled = x.reshape((n_rep, kv) + rest)
    if all(np.array_equal(tiled[r], tiled[0], equal_nan=True) for r in range(1, n_rep)):
        return (lambda a: a.reshape((n_rep, kv) + rest)[0],
                f"GQA-expanded K/V, tiled: {kv * n_rep} heads, head h = KV head h % {kv} (query head h must read "
                f"h // {n_rep}: check the mapping), reduced to its {kv} KV heads")
    raise ValueError(f"shape {list(x.shape)} has {kv * n_rep} heads where the tap has {kv} KV heads, but the "
                     f"heads of a group differ: not a GQA-expanded K/V (repeat) of {kv} KV heads")


# The Q/K row orders a dump may declare (--layout, or kit's `qk_layout` metadata). Meta's original
# checkpoints (and llama2.c, which exports them) hold Q/K in interleaved pairs per head, the order
# llama.cpp's converter restores in a GGUF; Hugging Face's conversion reordered them to rotate-half.
QK_LAYOUTS = ("hf", "gguf", "meta")
INTERLEAVED_QK = {"gguf": "GGUF per-head Q/K row permutation",
                  "meta": "Meta's interleaved-pair Q/K order (llama2.c, original checkpoints)"}


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
        if arrays[0].ndim >= len(want) and "leading batch axis of 1 dropped" not in notes:
            notes.append("leading batch axis of 1 dropped")
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
    if st is not None and shape != want and not _token_subset(shape, want, tok_axis):
        fix = _layout_of(st, arrays[0], want, cfg)
        if fix is not None:
            fn, note = fix
            arrays = apply(fn)
            notes.append(note)
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
    if layout in INTERLEAVED_QK and st is not None and st.gguf_permuted:
        arrays = apply(unpermute_gguf)
        notes.append(f"{INTERLEAVED_QK[layout]} undone")
    return arrays[0], (arrays[1] if known is not None else None), token_rows, notes

"""Layouts from the registry's dims, at every stage: each layout applied to a head-major or 2-D tap
of the independent NumPy engine (tests/numpy_engine.py) is named. Shape-level layouts (another
axis order with another shape, a batch axis, flattened heads, GQA-expanded K/V) are undone by
refs/layout.to_canonical with a note and then match; same-shape mistakes (a buffer written in
another axis order, group-major heads, already-scaled scores, the KV-head mapping) diverge at
their stage and diagnosis names them. Stages beyond the ones the project's fault set uses are
included on purpose; the clean dump is named nothing."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest

from conftest import SEED_IDS
from mlx_tinyllama import refs as R
from mlx_tinyllama import sources
from mlx_tinyllama.compare import compare, run_side
from mlx_tinyllama.localize import localize
from mlx_tinyllama.refs.layout import to_canonical
from mlx_tinyllama.stages import stage_of
from mlx_tinyllama.tolerances import Tolerances
from numpy_engine import Engine

T = len(SEED_IDS)
HEAD_MAJOR = ["attn.q", "attn.k", "attn.v", "attn.q_rope", "attn.k_rope", "attn.scores", "attn.probs"]
TWO_D = ["attn_norm", "attn.context", "attn.out", "mlp.gate", "mlp.prod", "out"]


@pytest.fixture(scope="module")
def setup(tiny_dir, tmp_path_factory):
    lm = sources.load("synthetic:tiny", "float32")
    ref = run_side(lm, SEED_IDS)
    path = tmp_path_factory.mktemp("layouts") / "clean.safetensors"
    eng = Engine(tiny_dir)
    eng.prefill(SEED_IDS)
    eng.dump(path, SEED_IDS)
    return lm, ref, R.load(path)[0]


def _canon(lm, tap, x):
    return to_canonical(tap, x, None, lm.config.as_dict(), T)


# ---------------------------------------------------------------------------
# Shape-level layouts: undone with a note naming them


def _shape_cases():
    for stage in HEAD_MAJOR + TWO_D:
        rank = 3 if stage in HEAD_MAJOR else 2
        for i, j in itertools.combinations(range(rank), 2):
            yield stage, f"swap:{i},{j}"
        if rank == 3:
            yield stage, "reversed"
            yield stage, "flattened"
        yield stage, "batch"
    for stage in ("attn.k", "attn.v", "attn.k_rope"):
        yield stage, "gqa_repeat"
        yield stage, "gqa_tiled"


def _apply_shape(layout: str, x: np.ndarray, n_rep: int) -> np.ndarray:
    if layout.startswith("swap:"):
        i, j = map(int, layout[5:].split(","))
        return np.swapaxes(x, i, j)
    return {"reversed": lambda: x.transpose(tuple(reversed(range(x.ndim)))),
            "flattened": lambda: x.transpose(1, 0, 2).reshape(x.shape[1], -1),
            "batch": lambda: x[None],
            "gqa_repeat": lambda: np.repeat(x, n_rep, axis=0),
            "gqa_tiled": lambda: np.tile(x, (n_rep, 1, 1))}[layout]()


# The words one of which each layout's note must hold.
NOTE_WORDS = {"swap": ("axes [", "ggml order", "transposed"), "reversed": ("axes [", "transposed"),
              "flattened": ("split",), "batch": ("batch",), "gqa_repeat": ("repeated",), "gqa_tiled": ("tiled",)}


@pytest.mark.parametrize("stage,layout", list(_shape_cases()))
def test_shape_level_layout_is_undone_and_named(setup, stage, layout):
    lm, _, clean = setup
    tap = f"layers.1.{stage}"
    x = clean.tensors[tap]
    cfg = lm.config
    y = _apply_shape(layout, x, cfg.num_attention_heads // cfg.num_key_value_heads)
    if y.shape == x.shape:
        pytest.skip(f"{layout} keeps the shape {list(x.shape)} here: a same-shape mistake, diagnosed below")
    canon, _, rows, notes = _canon(lm, tap, y)
    assert rows is None and np.array_equal(canon, x), notes
    words = NOTE_WORDS[layout.partition(":")[0]]
    assert any(w in n for n in notes for w in words), notes


def test_the_clean_layout_gets_no_note(setup):
    lm, _, clean = setup
    for tap in clean.tensors:
        if tap.startswith("layers.1."):
            canon, _, rows, notes = _canon(lm, tap, clean.tensors[tap])
            assert notes == [] and rows is None and np.array_equal(canon, clean.tensors[tap]), tap


def test_a_gqa_expansion_whose_heads_differ_is_refused(setup):
    lm, _, clean = setup
    x = np.repeat(clean.tensors["layers.0.attn.k"], 2, axis=0)
    x[1] += 1.0  # head 1 is no copy of KV head 0
    with pytest.raises(ValueError, match="GQA"):
        _canon(lm, "layers.0.attn.k", x)


def test_flattened_heads_are_named_in_the_comparison(setup):
    """A shape-level layout is named in the compare entry of that stage, which then matches."""
    lm, ref, clean = setup
    cand = copy.copy(clean)
    cand.tensors = dict(clean.tensors)
    x = cand.tensors["layers.0.attn.q_rope"]
    cand.tensors["layers.0.attn.q_rope"] = x.transpose(1, 0, 2).reshape(T, -1)
    result = compare(cand, [ref], Tolerances(), lm.config.as_dict(), T)
    assert result["status"] == "match"
    entry = next(e for e in result["entries"] if e["tap"] == "layers.0.attn.q_rope")
    assert "split" in entry["note"]


# ---------------------------------------------------------------------------
# Same-shape mistakes: diverge at their stage, diagnosed by name


def _buffer_in_order(x: np.ndarray, perm: tuple[int, ...]) -> np.ndarray:
    """x's values written in axis order `perm` under x's own shape (a layout mistake of a writer)."""
    return np.ascontiguousarray(x.transpose(perm)).reshape(x.shape)


def _group_major(x: np.ndarray, H: int, KV: int) -> np.ndarray:
    n_rep = H // KV
    order = [kv * n_rep + r for r in range(n_rep) for kv in range(KV)]  # position r*KV + kv holds this head
    if x.shape[0] == H:
        return x[order]
    t = x.shape[0]
    return x.reshape(t, H, -1)[:, order].reshape(t, -1)


def _value_cases():
    for stage in ["attn.q", "attn.k", "attn.v", "attn.k_rope", "attn.scores", "attn.probs"]:
        for perm in itertools.permutations(range(3)):
            if perm != (0, 1, 2):
                yield stage, ("order", perm)
    for stage in ["attn_norm", "attn.context", "mlp.gate", "out"]:
        yield stage, ("order", (1, 0))
    for stage in ["attn.q", "attn.q_rope", "attn.scores", "attn.scores_scaled", "attn.probs", "attn.context"]:
        yield stage, ("group_major",)


def _expected_id(stage: str, case: tuple) -> str:
    if case[0] == "group_major":
        return "heads_group_major"
    perm = case[1]
    if len(perm) == 2:
        return "transpose"
    if perm == (1, 0, 2):
        return "ggml_dim_order"
    dims = stage_of(f"layers.0.{stage}").dims
    return "axis_order:" + ",".join(dims[p] for p in perm)


def _diagnose(setup, tap, y, keep=None):
    lm, ref, clean = setup
    cand = copy.copy(clean)
    cand.tensors = {t: v for t, v in clean.tensors.items() if keep is None or keep(t)}
    cand.tensors[tap] = y
    result = compare(cand, [ref], Tolerances(), lm.config.as_dict(), T)
    return localize(result, cand, [ref], lm, Tolerances(), T)


@pytest.mark.parametrize("stage,case", list(_value_cases()), ids=lambda v: str(v))
def test_same_shape_mistake_is_diagnosed_by_name(setup, stage, case):
    lm, _, clean = setup
    tap = f"layers.1.{stage}"
    x = clean.tensors[tap]
    if case[0] == "order":
        y = _buffer_in_order(x, case[1])
    else:
        y = _group_major(x, lm.config.num_attention_heads, lm.config.num_key_value_heads)
    result = _diagnose(setup, tap, y)
    assert result["status"] == "diverged" and result["first_divergence"]["tap"] == tap
    found = [d["transform"] for d in result["diagnosis"]]
    assert _expected_id(stage, case) in found, found
    assert all(d["stage"] == tap for d in result["diagnosis"])


def test_scaled_scores_given_as_scores_are_named(setup):
    lm, _, clean = setup
    tap = "layers.1.attn.scores"
    result = _diagnose(setup, tap, clean.tensors[tap] * np.float32(lm.config.attn_scale))
    found = [d["transform"] for d in result["diagnosis"]]
    assert found[0] == "scores_already_scaled" and "kv_head_mapping" not in found, found


KV_ORDER = ["attn.k_rep", "attn.scores", "attn.scores_scaled", "attn.scores_masked", "attn.probs", "attn.context"]


@pytest.mark.parametrize("stage", KV_ORDER)
def test_kv_head_mapping_is_diagnosed_at_every_attention_stage(tiny_dir, tmp_path, setup, stage):
    """The engine reads KV head h % KV; the dump starts at `stage` (the attention stages before it,
    and the expanded V, are not dumped, as from a fused kernel): the mapping is still named there."""
    lm, ref, _ = setup
    eng = Engine(tiny_dir, ["kv_head_mapping@1"])
    eng.prefill(SEED_IDS)
    eng.dump(tmp_path / "k.safetensors", SEED_IDS)
    cand = R.load(tmp_path / "k.safetensors")[0]
    hidden = {f"layers.1.{s}" for s in KV_ORDER[:KV_ORDER.index(stage)] + ["attn.v_rep"]}
    cand.tensors = {t: v for t, v in cand.tensors.items() if t not in hidden}
    result = localize(compare(cand, [ref], Tolerances(), lm.config.as_dict(), T), cand, [ref], lm, Tolerances(), T)
    assert result["first_divergence"]["tap"] == f"layers.1.{stage}"
    assert "kv_head_mapping" in [d["transform"] for d in result["diagnosis"]], result["diagnosis"]

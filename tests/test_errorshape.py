"""The shape of an error (errorshape.py, issue 22): the first divergence's hint leads with what the
error looks like (rows up to a tile boundary right and zero after it, every row but the last, some
heads only, a reordering, a constant factor) and the kernel to look at.

Both ways: each kernel fault of the NumPy engine is named by its pattern at its stage through the
CLI, and a clean engine gets no pattern anywhere; the shapes are also checked on arrays of stages
and axes that no fault here was written for."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SEED_IDS
from mlx_tinyllama.errorshape import explain, stage_pattern
from mlx_tinyllama.trace import main as cli
from numpy_engine import FAULTS, Engine

TINY = {"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64}

# fault -> (pattern name, words the hint must lead with). 38 prompt tokens.
KERNEL_FAULTS = {
    "tile_rows_zero": ("last_partial_tile", "token rows 0-31 match, rows 32-37 are zero"),
    "tile_rows_zero:16": ("rows_zero_from", "token rows 0-15 match, rows 16-37 are zero"),
    "tail_tile_stale": ("last_partial_tile", "token rows 0-31 match, rows 32-37 are copies of rows 0-5"),
    "tail_tile_stale:16": ("last_partial_tile", "token rows 0-31 match, rows 32-37 are copies of rows 0-5"),
    "down_rows_zero": ("rows_zero_from", "token rows 0-15 match, rows 16-37 are zero"),
    "cols_zero": ("columns_from", "columns 0-55 match, columns 56-63 are zero"),
    "rope_sin_sign": ("all_rows_but_first", "token row 0 matches, every later token row differs"),
    "flash_no_rescale": ("rows_mostly_wrong_from", "token rows 0-"),
    "kv_head_mapping": ("heads", "heads 1-2 of 4 differ, heads 0, 3 match"),
    "mask_offset": ("all_rows_but_last", "every token row but the last (37) differs"),
    "mask_off": ("all_rows_but_last", "every token row but the last (37) differs"),
    "wrong_scale": ("scaled", "the values are the reference's times 1.25"),
    "heads_order": ("reordered", "the sum matches, the values do not"),
}
CAUSE = {  # what the rest of the sentence must name
    "tile_rows_zero": "q_proj matmul",
    "tile_rows_zero:16": "computes only the first 16 rows",
    "tail_tile_stale": "not loaded (stale)",
    "tail_tile_stale:16": "tile buffer that is not reloaded",
    "down_rows_zero": "down_proj matmul",
    "cols_zero": "o_proj matmul stops at column 56",
    "rope_sin_sign": "sin sign",
    "flash_no_rescale": "rescale",
    "kv_head_mapping": "GQA broadcast",
    "mask_offset": "off by 1",
    "mask_off": "the causal mask is missing",
    "wrong_scale": "constant factor",
    "heads_order": "permutation",
}


def _compare(tiny_dir, tmp_path, faults) -> tuple[int, dict]:
    engine = Engine(tiny_dir, faults=faults)
    engine.prefill(SEED_IDS)
    dump = engine.dump(tmp_path / "d.safetensors", SEED_IDS)
    out = tmp_path / "c.json"
    rc = cli(["compare", "--against", str(dump), "--model", "synthetic:tiny", "--dtype", "float32", "--json", str(out)])
    return rc, json.loads(out.read_text())


@pytest.mark.parametrize("fault", sorted(KERNEL_FAULTS))
def test_each_kernel_fault_is_named_by_its_pattern_first(fault, tiny_dir, tmp_path):
    rc, result = _compare(tiny_dir, tmp_path, [fault])
    first = result["first_divergence"]
    name, words = KERNEL_FAULTS[fault]
    assert rc == 1 and first["tap"] == "layers.0." + FAULTS[fault.split(":")[0]][1]
    assert first["pattern"]["name"] == name, first["hint"]
    assert first["hint"].startswith(words), first["hint"]
    assert CAUSE[fault] in first["hint"], first["hint"]


def test_a_clean_engine_has_no_pattern_anywhere(tiny_dir, tmp_path):
    rc, result = _compare(tiny_dir, tmp_path, [])
    assert rc == 0 and result["first_divergence"] is None
    assert not [e for e in result["entries"] if e["details"].get("pattern")]


def test_a_fault_in_a_later_layer_is_named_there(tiny_dir, tmp_path):
    """The pattern belongs to the first diverging stage, in whichever layer."""
    rc, result = _compare(tiny_dir, tmp_path, ["down_rows_zero:8@1"])
    first = result["first_divergence"]
    assert rc == 1 and first["tap"] == "layers.1.mlp.down"
    assert first["hint"].startswith("token rows 0-7 match, rows 8-37 are zero"), first["hint"]


# ---------------------------------------------------------------------------
# The shapes on arrays: other stages, axes and sizes than the faults above


RNG = np.random.default_rng(7)


def _budget():
    return 1e-8


def test_a_tile_tail_on_the_logits_names_the_lm_head_and_its_vectors_case():
    b = RNG.standard_normal((70, 128))
    a = b.copy()
    a[64:] = 0.0
    p = stage_pattern("logits", a, b, _budget(), TINY)
    assert p.name == "last_partial_tile" and "rows 64-69 are zero" in p.words
    assert "lm_head matmul" in p.cause and "matmul.lm_head" in p.next_step


def test_garbage_after_a_boundary_is_not_called_zero_or_stale():
    b = RNG.standard_normal((4, 40, 16))
    a = b.copy()
    a[:, 8:] = RNG.standard_normal((4, 32, 16))
    p = explain(a, b, token_axis=1, budget=_budget(), kernel="k")
    assert p.name == "rows_wrong_from" and "rows 8-39 are wrong (non-zero) values" in p.words


def test_heads_of_merged_context_are_found_per_kv_group():
    """attn.context is [T, H*D]: its heads are column blocks; two of eight heads (one KV group of
    four KV heads) wrong."""
    cfg = {"num_attention_heads": 8, "num_key_value_heads": 4}
    b = RNG.standard_normal((12, 8 * 16))
    a = b.copy()
    a[:, 2 * 16:4 * 16] = RNG.standard_normal((12, 32))
    p = stage_pattern("layers.3.attn.context", a, b, _budget(), cfg)
    assert p.name == "heads" and p.evidence["wrong_heads"] == [2, 3] and p.evidence["kv_groups"] == [1]


def test_heads_of_a_projection_are_not_blamed_on_gqa():
    """attn.v has KV heads: no query-to-KV broadcast happens there."""
    b = RNG.standard_normal((4, 10, 16))
    a = b.copy()
    a[1] *= -1
    p = stage_pattern("layers.0.attn.v", a, b, _budget(), TINY)
    assert p.name == "heads" and "GQA" not in p.cause and p.evidence["wrong_heads"] == [1]


def test_every_other_row_is_a_stride():
    b = RNG.standard_normal((16, 32))
    a = b.copy()
    a[1::2] += RNG.standard_normal((8, 32))
    p = explain(a, b, token_axis=0, budget=_budget(), kernel="k")
    assert p.name == "periodic_rows" and p.evidence["period"] == 2 and p.evidence["offset"] == 1


def test_rows_written_to_other_positions_are_a_move_not_stale():
    b = RNG.standard_normal((10, 32))
    a = b[[0, 1, 2, 4, 3, 5, 6, 7, 9, 8]]
    p = explain(a, b, token_axis=0, budget=_budget(), kernel="k")
    assert p.name == "rows_moved" and p.evidence["row_holds"] == {3: 4, 4: 3, 8: 9, 9: 8}


def test_the_values_in_another_order_within_each_row():
    b = RNG.standard_normal((6, 2, 8))
    a = b[..., ::-1].copy()
    p = explain(a, b, token_axis=0, budget=_budget(), kernel="k")
    assert p.name == "reordered"


def test_no_pattern_for_noise_within_a_row_slack_or_for_unrelated_values():
    b = RNG.standard_normal((38, 64))
    near = b * (1 + 1e-6 * RNG.standard_normal(b.shape))
    assert explain(near, b, token_axis=0, budget=_budget(), kernel="k") is None
    other = RNG.standard_normal((38, 64))
    p = explain(other, b, token_axis=0, budget=_budget(), kernel="k")
    assert p is None, p


def test_a_small_dense_error_is_precision_not_a_tile():
    b = RNG.standard_normal((40, 64))
    a = b + 1e-3 * RNG.standard_normal(b.shape)
    p = explain(a, b, token_axis=0, budget=_budget(), kernel="k")
    assert p.name == "dense_small"


def test_mask_values_of_any_size_mask_alike():
    """-1e4 (an fp16 converter's mask) and -inf hide the same keys: not an error shape; a key left
    visible by one side is."""
    b = np.triu(np.full((2, 6, 6), -np.inf), 1) + np.tril(RNG.standard_normal((2, 6, 6)))
    a = np.where(np.isneginf(b), -1e4, b)
    assert stage_pattern("layers.0.attn.scores_masked", a, b, _budget(), TINY) is None
    leak = a.copy()
    idx = np.arange(5)
    leak[:, idx, idx + 1] = 0.5  # each query sees the next key
    p = stage_pattern("layers.0.attn.scores_masked", leak, b, _budget(), TINY)
    assert p.name == "all_rows_but_last" and "off by 1" in p.cause


# ---------------------------------------------------------------------------
# On what llama.cpp prints: the first and last 3 rows along each axis


PRINTED = {  # fault -> (stage, pattern, words the hint leads with)
    # zero rows add nothing to the printed sum: it places the boundary the printed rows miss
    "tile_rows_zero": ("attn.q", "last_partial_tile", "token rows 0-31 match, rows 32-37 are zero (by the printed sum"),
    "down_rows_zero:16": ("mlp.down", "rows_zero_from", "token rows 0-15 match, rows 16-37 are zero (by the printed sum"),
    # stale rows add unknown amounts, so the sum places nothing; but the reference is whole, so the
    # wrong printed rows are found to hold rows 3-5's right values (32 rows before them)
    "tail_tile_stale": ("mlp.gate", "rows_stale_from", "the printed token rows up to 2 match, the printed rows from 35 "
                                                       "on are copies of rows 3-5 (the boundary lies between rows 3 "
                                                       "and 35)"),
    "rope_sin_sign": ("attn.q_rope", "all_rows_but_first", "printed token row 0 matches"),
    "kv_head_mapping": ("attn.scores", "heads", "printed heads 1-2 differ, printed heads 0, 3 match"),
    "mask_offset": ("attn.probs", "all_rows_but_last", "every printed token row but the last (37) differs"),
}


@pytest.fixture(scope="module")
def tiny_run():
    from mlx_tinyllama import sources
    from mlx_tinyllama.compare import run_side

    lm = sources.load("synthetic:tiny", "float32")
    return run_side(lm, SEED_IDS), lm.config.as_dict()


def _log_compare(tiny_dir, tiny_run, tmp_path, faults):
    from test_llamacpp_log import llamacpp_log

    from mlx_tinyllama import refs as R
    from mlx_tinyllama.compare import compare
    from mlx_tinyllama.tolerances import Tolerances

    taps = Engine(tiny_dir, faults=faults).prefill(SEED_IDS)
    path = tmp_path / "eval.log"
    path.write_text(llamacpp_log(taps, 2))
    side, cfg = tiny_run
    return compare(R.load(path)[0], [side], Tolerances(), cfg, len(SEED_IDS))


@pytest.mark.parametrize("fault", sorted(PRINTED))
def test_printed_corners_name_the_pattern(fault, tiny_dir, tiny_run, tmp_path):
    stage, name, words = PRINTED[fault]
    result = _log_compare(tiny_dir, tiny_run, tmp_path, [fault])
    first = result["first_divergence"]
    assert first["tap"] == "layers.0." + stage and first["pattern"]["name"] == name, first["hint"]
    assert first["hint"].startswith(words), first["hint"]


def test_a_clean_log_has_no_pattern(tiny_dir, tiny_run, tmp_path):
    result = _log_compare(tiny_dir, tiny_run, tmp_path, [])
    assert result["status"] == "match"
    assert not [e for e in result["entries"] if e["details"].get("pattern")]


def _printed(a, rows=(0, 1, 2, 37, 38, 39)):
    known = np.zeros(a.shape, bool)
    known[list(rows)] = True
    return np.where(known, a, 0.0), known


def test_the_printed_sum_places_a_zero_boundary_only_when_one_row_count_fits():
    from mlx_tinyllama.errorshape import printed_pattern

    b = RNG.standard_normal((40, 16)) + 0.5  # rows whose sums are far apart from one another
    a = b.copy()
    a[32:] = 0.0
    cand, known = _printed(a)
    p = printed_pattern("layers.0.mlp.down", cand, b, known, 1e-4, 0.5e-4, (float(a.sum()), 0.0))
    assert p.name == "last_partial_tile" and p.words.startswith("token rows 0-31 match, rows 32-39 are zero")
    assert p.evidence["boundary_from_sum"] == 32 and "down_proj" in p.cause
    # a sum that no row count gives: the boundary stays somewhere between the printed rows
    p = printed_pattern("layers.0.mlp.down", cand, b, known, 1e-4, 0.5e-4, (float(a.sum()) + 3.0, 0.0))
    assert p.name == "rows_zero_from" and p.words.startswith("the printed token rows up to 2 match")
    assert "boundary_from_sum" not in p.evidence and p.evidence["sum_places"] == []
    # wrong (non-zero) rows add unknown amounts: even a sum that happens to fit places nothing
    a[32:] = RNG.standard_normal((8, 16))
    a[32:] -= a[32:].sum() / a[32:].size  # they sum to zero, as zero rows would
    cand, known = _printed(a)
    p = printed_pattern("layers.0.mlp.down", cand, b, known, 1e-4, 0.5e-4, (float(b[:32].sum()), 0.0))
    assert p.name == "rows_wrong_from" and "boundary_from_sum" not in p.evidence


def test_printed_merged_heads_name_the_kv_head_the_wrong_heads_read():
    from mlx_tinyllama.errorshape import printed_pattern

    cfg = (8, 2)  # 8 query heads, 2 KV heads: head h reads KV head h // 4
    b = RNG.standard_normal((40, 8 * 4))
    a = b.reshape(40, 8, 4).copy()
    printed_heads = [0, 1, 2, 5, 6, 7]
    known = np.zeros((40, 8, 4), bool)
    known[np.ix_([0, 1, 2, 37, 38, 39], printed_heads, [0, 1, 2, 3])] = True
    a[:, [1, 6]] += 1.0  # where h % 2 differs from h // 4 among the printed heads
    p = printed_pattern("layers.0.attn.context", a.reshape(40, 32), b, known.reshape(40, 32), 1e-4, 0.5e-4,
                        heads=cfg)
    assert p.name == "heads" and p.words == "printed heads 1, 6 differ, printed heads 0, 2, 5, 7 match"
    assert p.evidence["reads"] == "h % 2" and p.evidence["kv_groups"] == [0, 1]
    # another head fault (head 5 only): named, but not as h % 2
    a = b.reshape(40, 8, 4).copy()
    a[:, 5] *= -1.0
    p = printed_pattern("layers.0.attn.context", a.reshape(40, 32), b, known.reshape(40, 32), 1e-4, 0.5e-4,
                        heads=cfg)
    assert p.name == "heads" and p.evidence["wrong_heads"] == [5] and "reads" not in p.evidence
    assert "a wrong KV head stride" in p.cause
    # every printed head right: nothing to name
    p = printed_pattern("layers.0.attn.context", b, b, known.reshape(40, 32), 1e-4, 0.5e-4, heads=cfg)
    assert p is None


def test_printed_rows_that_hold_other_rows_are_stale_with_their_offset():
    from mlx_tinyllama.errorshape import printed_pattern

    b = RNG.standard_normal((40, 16))
    a = b.copy()
    a[32:] = b[16:24]  # a 16-row tile buffer not reloaded: rows 32-39 keep rows 16-23
    cand, known = _printed(a)
    p = printed_pattern("layers.0.mlp.down", cand, b, known, 1e-4, 0.5e-4)
    assert p.name == "rows_stale_from" and "are copies of rows 21-23" in p.words
    assert p.evidence["offset"] == 16 and "the boundary is likely 32" in p.cause
    # wrong rows that are no row of the reference stay "wrong"
    a[32:] = RNG.standard_normal((8, 16))
    cand, known = _printed(a)
    p = printed_pattern("layers.0.mlp.down", cand, b, known, 1e-4, 0.5e-4)
    assert p.name == "rows_wrong_from" and "offset" not in p.evidence


def test_an_error_only_in_unprinted_rows_is_said_to_lie_there(tiny_dir, tiny_run, tmp_path):
    from test_llamacpp_log import llamacpp_log

    from mlx_tinyllama import refs as R
    from mlx_tinyllama.compare import compare
    from mlx_tinyllama.tolerances import Tolerances

    taps = Engine(tiny_dir, faults=[]).prefill(SEED_IDS)
    taps["layers.0.mlp.down"] = taps["layers.0.mlp.down"].copy()
    taps["layers.0.mlp.down"][10] += 0.5  # a middle row: never printed, but in the sum
    path = tmp_path / "eval.log"
    path.write_text(llamacpp_log(taps, 2))
    side, cfg = tiny_run
    first = compare(R.load(path)[0], [side], Tolerances(), cfg, len(SEED_IDS))["first_divergence"]
    assert first["tap"] == "layers.0.mlp.down" and first["pattern"]["name"] == "unprinted", first["hint"]
    assert first["hint"].startswith("the printed values match, the printed sum does not") and "down_proj" in first["hint"]


def test_masked_is_judged_by_effect_in_the_candidates_dtype():
    """The error-shape reader uses the verdict's mask rule (metrics.masked_positions): a score 40
    below its row's maximum gets no weight in float16, so written there instead of -inf it is no
    error shape in float16; in float32 (where exp(-40) is not zero) it is a key left visible."""
    b = np.triu(np.full((2, 6, 6), -np.inf), 1) + np.tril(RNG.standard_normal((2, 6, 6)))
    a = np.where(np.isneginf(b), b.max() - 40.0, b)
    assert stage_pattern("layers.0.attn.scores_masked", a, b, _budget(), TINY, "float16") is None
    assert stage_pattern("layers.0.attn.scores_masked", a, b, _budget(), TINY, "float32") is not None


# --- reorderings read from printed corners (llama.cpp logs: first and last 3 along each axis) ---------


def _printed_mask(shape) -> np.ndarray:
    """The positions llama-eval-callback prints: the first and last 3 along each axis."""
    out = np.ones(shape, bool)
    for axis, n in enumerate(shape):
        keep = np.isin(np.arange(n), [0, 1, 2, n - 3, n - 2, n - 1])
        out &= keep.reshape([n if a == axis else 1 for a in range(len(shape))])
    return out


def test_printed_reordering_names_a_permuted_k_and_swapped_heads_at_a_head_major_stage():
    from mlx_tinyllama.errorshape import printed_reordering
    from mlx_tinyllama.gguf import permute_qk

    rng = np.random.default_rng(0)
    k = rng.normal(size=(2, 10, 16))  # attn.k [KV, T, D]: K rows written with the permutation once too often
    rows = permute_qk(k.transpose(0, 2, 1).reshape(32, 10), 2).reshape(2, 16, 10).transpose(0, 2, 1)
    known = _printed_mask(k.shape)
    found = printed_reordering("layers.1.attn.k", np.where(known, rows, 0), k, known, 1e-3, 0.0)
    assert found["kind"] == "qk_permutation" and found["fits"] == ["gguf.unpermute_qk"] and found["decided"]
    q = rng.normal(size=(8, 10, 16))  # attn.q_rope [H, T, D]: heads 1 and 6 swapped
    swapped = q[[0, 6, 2, 3, 4, 5, 1, 7]]
    known = _printed_mask(q.shape)
    found = printed_reordering("layers.0.attn.q_rope", np.where(known, swapped, 0), q, known, 1e-3, 0.0)
    assert found["kind"] == "head_order" and found["holds"] == {1: 6, 6: 1} and found["decided"]
    # the other way: the right values say nothing, and a head that equals two reference heads at the
    # printed positions is not decided
    assert printed_reordering("layers.0.attn.q_rope", np.where(known, q, 0), q, known, 1e-3, 0.0) is None
    twin = q.copy()
    twin[3] = twin[6]
    found = printed_reordering("layers.0.attn.q_rope", np.where(known, swapped, 0), twin, known, 1e-3, 0.0)
    assert found["ambiguous"] == [1] and not found["decided"]


def test_reordering_words_need_the_printed_sum():
    from mlx_tinyllama.errorshape import reordering_words

    heads = {"kind": "head_order", "holds": {1: 6, 6: 1}, "ambiguous": [], "no_reference_head": []}
    assert reordering_words(heads, True) == ("the heads are in another order: printed head 1 holds the reference's "
                                             "head 6, printed head 6 holds the reference's head 1, and the printed "
                                             "sum matches", True)
    text, said = reordering_words(heads, False)
    assert not said and text.startswith("head order: not decidable from the printed values") and "sum differs" in text
    text, said = reordering_words(heads, None)
    assert not said and "no sum is printed" in text
    qk = {"kind": "qk_permutation", "fits": ["gguf.permute_qk", "gguf.unpermute_qk"]}
    assert reordering_words(qk, True)[1] is False and "not decidable" in reordering_words(qk, True)[0]
    assert reordering_words({"kind": "qk_permutation", "fits": []}, True) == ("", False)

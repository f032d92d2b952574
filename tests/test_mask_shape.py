"""Mask faults said as the bound they break (errorshape.explain_mask): a sliding window not applied,
off by one, a window the model does not have, a strict causal bound. Before this, a Mistral engine
that dropped its window (rows past the window wrong) was told "the last partial tile is computed
wrong: a remainder tile skipped" -- a tiling hint for a mask bug. Unit cases on masks built here,
then the model itself run with its window changed (another engine's mistake, made by config), and
the command line on a dump of such a run."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from conftest import SEED_IDS
from mlx_tinyllama import sources, synthetic
from mlx_tinyllama.compare import run_side
from mlx_tinyllama.errorshape import explain_mask, stage_pattern


def hidden(T: int, K: int | None = None, window: int | None = None, causal_extra: int = 0, heads: int = 2,
           strict: bool = False) -> np.ndarray:
    """[heads, T, K] True where a key is masked: query rows are the last T of K positions."""
    K = T if K is None else K
    d = (K - T + np.arange(T))[:, None] - np.arange(K)[None, :]
    h = d < -causal_extra
    if strict:
        h |= d == 0
    if window:
        h |= d >= window
    return np.broadcast_to(h, (heads, T, K)).copy()


def test_window_missing_is_named_with_its_size_and_rows():
    p = explain_mask(hidden(12), hidden(12, window=8), "causal mask")
    assert p.name == "mask_window_missing"
    assert p.words.startswith("queries at positions 8-11 see keys 8 or more positions back (10 query-key pairs)")
    assert "the sliding window is not applied" in p.cause and "ring buffer" in p.next_step
    assert p.evidence["reference_window"] == 8 and p.evidence["candidate_window"] is None


@pytest.mark.parametrize("cand, ref, name, words", [
    (9, 8, "mask_window_off", "see keys 8 positions back"),
    (11, 8, "mask_window_off", "see keys 8-10 positions back"),
    (7, 8, "mask_window_off", "do not see keys 7 positions back"),
    (5, None, "mask_window_extra", "do not see keys 5-11 positions back"),
])
def test_a_window_of_the_wrong_size_says_by_how_much(cand, ref, name, words):
    p = explain_mask(hidden(12, window=cand), hidden(12, window=ref), "causal mask")
    assert p.name == name and words in p.words, p.words
    if ref is None:
        assert "the model does not have" in p.cause
    else:
        assert f"a sliding window of {cand} instead of {ref}" in p.cause or f"is {cand} instead of {ref}" in p.cause
        assert f"off by {abs(cand - ref)}" in p.cause


@pytest.mark.parametrize("extra, cause", [(1, "off by 1"), (3, "off by 3"), (7, "the causal mask is missing")])
def test_future_keys_are_the_causal_bound(extra, cause):
    """The causal bound read the same way as the window: by distance, in the mask itself (it was a
    row-shape reading with the keys counted afterwards); the words stay the row shape's."""
    p = explain_mask(hidden(8, causal_extra=extra), hidden(8), "causal mask")
    assert p.name == "all_rows_but_last" and p.words == "every token row but the last (7) differs"
    assert cause in p.cause and p.evidence["extra_visible_keys"][:2] == [min(extra, 7), min(extra, 6)]


def test_a_strict_causal_bound_is_the_diagonal():
    p = explain_mask(hidden(6, strict=True), hidden(6), "causal mask")
    assert p.name == "mask_hides_diagonal" and "j < i instead of j <= i" in p.cause


def test_a_decode_step_is_read_at_its_own_position():
    """One query row at position 20 over 21 keys: the positions named are the step's, not row 0."""
    p = explain_mask(hidden(1, 21), hidden(1, 21, window=8), "causal mask")
    assert p.name == "mask_window_missing" and p.words.startswith("queries at positions 20 see keys 8 or more")
    assert p.evidence["shown"] == 13


def test_what_is_not_a_bound_is_left_to_the_row_shapes():
    assert explain_mask(hidden(8), hidden(8), "m") is None  # same masks
    stray = hidden(8)
    stray[:, 2, 5] = False  # one future key shown to one query: no bound
    assert explain_mask(stray, hidden(8), "m") is None
    a = hidden(8, window=4)
    a[1] = hidden(8, heads=1)[0]  # one head only: not a mask bound
    assert explain_mask(a, hidden(8, window=4), "m") is None
    b = hidden(8, window=4)
    b[:, 6, 0] = False  # one stray pair shown and the window bound elsewhere right: no band...
    b[:, 7, 7] = True  # ...and one hidden on the diagonal
    assert explain_mask(b, hidden(8, window=4), "m") is None


@pytest.fixture(scope="module")
def mistral():
    d = synthetic.materialize("mistral-tiny", 0)
    lm = sources.load(str(d), "float32")
    ref = {k: np.asarray(v, np.float64) for k, v in run_side(lm, SEED_IDS).tensors.items()}
    return d, lm, ref




@pytest.mark.parametrize("window, name", [(0, "mask_window_missing"), (9, "mask_window_off"),
                                          (6, "mask_window_off")])
def test_the_model_run_with_another_window_is_named_at_scores_masked(mistral, window, name):
    """synthetic:mistral-tiny (window 8, 38 tokens) run with its window changed, as an engine that
    read the config wrong would: the first stage to differ is layer 0's scores_masked, and its
    shape is the window's, not a tile's."""
    d, lm, ref = mistral
    weights = dict(sources.read_safetensors(sources.weight_files(d)))
    other = sources.load(str(d), "float32")
    other.model = sources.build_model(replace(lm.config, sliding_window=window), weights, "float32", lm.model.ops)
    got = {k: np.asarray(v, np.float64) for k, v in run_side(other, SEED_IDS).tensors.items()}
    tap = "layers.0.attn.scores_masked"
    p = stage_pattern(tap, got[tap], ref[tap], 2.27e-11, json.loads((d / "config.json").read_text()), "float32")
    assert p is not None and p.name == name, p
    assert "tile" not in p.sentence()
    # clean: the model against itself has no shape at all
    assert stage_pattern(tap, ref[tap], ref[tap], 2.27e-11, json.loads((d / "config.json").read_text()),
                         "float32") is None


def test_the_command_line_leads_with_the_window(mistral, tmp_path, capfd):
    """`trace run --dump` of the same weights under a config without the window, compared against
    the model: exit 1 at layer 0's scores_masked and a hint that starts with the window."""
    import shutil

    from test_robustness import invoke

    d, _, _ = mistral
    nowin = tmp_path / "nowin"
    shutil.copytree(d, nowin)
    cfg = json.loads((nowin / "config.json").read_text())
    cfg["sliding_window"] = None
    (nowin / "config.json").write_text(json.dumps(cfg))
    ids = ",".join(map(str, SEED_IDS))
    rc, _, err = invoke(["run", "--model", nowin, "--token-ids", ids, "--taps", "*", "--dump",
                         tmp_path / "nowin.safetensors"], capfd)
    assert rc == 0, err[-2000:]
    rc, out, err = invoke(["compare", "--against", tmp_path / "nowin.safetensors", "--model", d,
                           "--token-ids", ids, "--json", tmp_path / "c.json"], capfd)
    result = json.loads((tmp_path / "c.json").read_text())
    assert rc == 1 and result["first_divergence"]["tap"] == "layers.0.attn.scores_masked", out[-3000:]
    hint = " ".join(out.split("hint:", 1)[1].split())
    assert hint.startswith("queries at positions 8-37 see keys 8 or more positions back"), hint[:300]
    assert "the sliding window is not applied" in hint and "remainder tile" not in hint

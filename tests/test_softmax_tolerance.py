"""The stages that read the attention scores through exp() (probs, context, attn.out) carry the
scores' tolerance amplified by the reference's own scores (tolerances.py, "Stages that read the
scores through exp()"): the first-order rule against a perturbed softmax, nothing added where
the scores are small, the amplification taken from the reference and never the candidate, and
the seed-7 drawn Llama whose `paths` raised a false alarm at layers.2.attn.probs."""

from __future__ import annotations

import copy
import os
import random

import numpy as np
import pytest

from conftest import SEED_IDS, has_torch
from mlx_tinyllama import paths, sources
from mlx_tinyllama.compare import compare, run_side
from mlx_tinyllama.metrics import row_amplification, softmax_amplification, total_amplification
from mlx_tinyllama.tolerances import A_CALIBRATED, WIDENED_NMSE_CAP, Tolerances, scores_of, tolerance_for


def _softmax(s):
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("size", [3.0, 12.0])
def test_the_first_order_rule_predicts_a_perturbed_softmax(size):
    """Scores with absolute errors of one variance tau**2: the probabilities' NMSE is tau**2 * F,
    i.e. tol_s * A when tau**2 = tol_s * mean(s**2) (the derivation's model), within 10 %."""
    rng = np.random.default_rng(0)
    s = rng.normal(0.0, size, (4, 1, 24))  # [heads, 1 token, keys]
    tau = 1e-4
    p = _softmax(s)
    err = []
    for _ in range(400):
        dp = _softmax(s + rng.normal(0.0, tau, s.shape)) - p
        err.append((dp ** 2).sum() / (p ** 2).sum())
    a = softmax_amplification(s, token_axis=1)
    predicted = tau ** 2 / (a["s2"].sum() / a["n"].sum()) * total_amplification(a)  # tau**2 * F
    assert np.mean(err) == pytest.approx(predicted, rel=0.1)
    assert row_amplification(a)[0] == pytest.approx(total_amplification(a))  # one row: the same A


def test_small_scores_add_nothing_and_only_the_readers_widen():
    tol = Tolerances()
    s = np.random.default_rng(1).normal(0.0, 0.5, (2, 5, 5))
    s = np.where(np.tril(np.ones((5, 5), bool))[None], s, np.finfo(np.float32).min)
    small = total_amplification(softmax_amplification(s))
    assert 0 < small < 1
    lm = sources.load("synthetic:tiny", "float32")  # a fixture's own scores: at most the calibration's A
    side = run_side(lm, SEED_IDS)
    fixture = max(total_amplification(softmax_amplification(side.tensors[f"layers.{i}.attn.scores_masked"]))
                  for i in range(2))
    assert 1 < fixture <= A_CALIBRATED
    for tap in ("layers.1.attn.probs", "layers.1.attn.context", "layers.1.attn.out"):
        assert scores_of(tap) == "layers.1.attn.scores_masked"
        for metric in ("nmse", "rel_rms", "sum_rel"):
            for a in (small, fixture):
                assert tol.amplified(tap, metric, a, "float32", "float32", 2) == tol.get(tap, metric, "float32",
                                                                                      "float32", 2)
        big = tol.amplified(tap, "nmse", 400.0, "float32", "float32", 2)
        assert big == pytest.approx(400.0 / A_CALIBRATED * tolerance_for("layers.1.attn.scores_masked", "nmse", "float32",
                                                          "float32", 2))
    for tap in ("layers.1.attn.scores_masked", "layers.1.attn.v", "layers.1.mlp.down", "logits"):
        assert scores_of(tap) is None
        assert tol.amplified(tap, "nmse", 400.0, "float32", "float32", 2) == tol.get(tap, "nmse", "float32",
                                                                                     "float32", 2)
    assert tol.amplified("layers.1.attn.probs", "mask_mismatch", 400.0, "float32", "float32", 2) == 0.0
    # scores too large to vouch for the softmax: the widening stops a tenth below the faults' NMSE
    assert tol.amplified("layers.0.attn.probs", "nmse", 1e6, "float16", "float16", 2) == WIDENED_NMSE_CAP
    deep = tol.get("layers.21.attn.probs", "nmse", "float16", "float16", 22)  # already above the cap
    assert deep > WIDENED_NMSE_CAP and tol.amplified("layers.21.attn.probs", "nmse", 1e6, "float16", "float16",
                                                      22) == deep
    given = Tolerances.from_overrides(["*.attn.probs:nmse=1e-9"])  # an override is taken as given
    assert given.amplified("layers.1.attn.probs", "nmse", 400.0, "float32", "float32", 2) == 1e-9


def test_a_single_key_or_a_saturated_row_cannot_move():
    s = np.array([[[60.0, -60.0, -60.0]]])  # p = (1, ~0, ~0): exp() leaves nothing to amplify
    assert total_amplification(softmax_amplification(s)) < 1e-6
    assert total_amplification(softmax_amplification(np.array([[[45.0]]]))) == 0.0


def _scaled(side, factor):
    out = copy.copy(side)
    out.tensors = dict(side.tensors)
    for tap in [t for t in side.tensors if t.endswith("attn.scores_masked")]:
        x = side.tensors[tap]
        out.tensors[tap] = np.where(x > -1e30, np.where(x > -1e30, x, 0.0) * factor, x)  # the mask kept
    return out


def test_compare_takes_the_amplification_from_the_reference_never_the_candidate():
    """A candidate whose scores are blown up (a fault) leaves every tolerance where it was; the
    same scores on the reference's side widen the readers' tolerances and nothing else."""
    lm = sources.load("synthetic:tiny", "float32")
    ref = run_side(lm, SEED_IDS)
    cfg = lm.config.as_dict()

    def tolerances(cand, reference):
        r = compare(cand, [reference], Tolerances(), cfg, len(SEED_IDS))
        return {(e["tap"], e["metric"]): e["tolerance"] for e in r["entries"]}, r

    clean, _ = tolerances(ref, ref)
    faulty, r = tolerances(_scaled(ref, 20.0), ref)
    assert faulty == clean
    assert r["first_divergence"]["tap"] == "layers.0.attn.scores_masked"  # still caught where it is
    widened, _ = tolerances(_scaled(ref, 20.0), _scaled(ref, 20.0))
    grown = {k for k in clean if widened[k] > clean[k]}
    assert {"layers.0.attn.probs", "layers.1.attn.context", "layers.1.attn.out"} <= {t for t, _ in grown}
    assert all(scores_of(t) is not None for t, _ in grown)


# ---------------------------------------------------------------------------------------------
# The model that found it: seed 7's 3-layer Llama (linear RoPE, attention biases, initialiser
# range 0.3; scores up to +-68), drawn as tests/test_family_random.py draws it.

SEED7 = (7021, "LlamaForCausalLM", 7)


@pytest.fixture(scope="module")
def seed7(tmp_path_factory):
    if not has_torch():
        pytest.skip("needs torch + transformers")
    os.environ.setdefault("MLX_TINYLLAMA_FAMILY_SEED", "7")
    import test_family_random as fr

    out = tmp_path_factory.mktemp("seed7")
    kw, T = fr.draw_config(*SEED7)
    assert kw["num_hidden_layers"] == 3 and kw["initializer_range"] == 0.3 and kw["attention_bias"]
    fr.make_model(*SEED7, out)
    ids = random.Random(SEED7[0]).choices(range(kw["vocab_size"]), k=T)
    return sources.load(str(out), "float32"), ids


def test_the_seed7_llamas_paths_agree_where_the_fixed_budget_raised_a_false_alarm(seed7):
    lm, ids = seed7
    L = lm.config.num_hidden_layers
    r = paths.check_paths(lm.model, ids, chunks=(2, len(ids) - 2), continue_n=0, dtype="float32")
    assert r["agree"] and r["first_divergence"] is None, r["first_divergence"]
    # the same rows against the fixed stage budget: over it (the false alarm this fixes)
    worst = max(np.nanmax(r["nmse_by_tap_position"]["decode"][f"layers.2.attn.{s}"])
                / tolerance_for(f"layers.2.attn.{s}", "nmse", "float32", "float32", L)
                for s in ("probs", "context", "out"))
    assert worst > 1.0


def test_the_seed7_llama_still_diverges_under_a_cache_fault(seed7):
    lm, ids = seed7
    r = paths.check_paths(lm.model, ids, chunks=(2,), continue_n=0, dtype="float32", fault="drop-kv")
    assert not r["agree"]
    assert r["first_divergence"]["tap"].startswith("layers.0.attn.")


# ---------------------------------------------------------------------------------------------
# A case unlike seed 7's: the synthetic tiny model with layers 0 and 1's q_proj and k_proj x7
# (scores x49, up to +-585), in float16 and against another engine (the NumPy engine).

FACTOR = 7.0


@pytest.fixture(scope="module")
def scaled_dir(tmp_path_factory):
    import shutil

    from safetensors.numpy import load_file, save_file

    from mlx_tinyllama.synthetic import materialize

    out = tmp_path_factory.mktemp("scaled") / "tiny-qk7"
    shutil.copytree(materialize("tiny", 0), out)
    w = load_file(str(out / "model.safetensors"))
    for layer in (0, 1):
        for proj in ("q_proj", "k_proj"):
            k = f"model.layers.{layer}.self_attn.{proj}.weight"
            w[k] = (w[k].astype(np.float32) * np.float32(FACTOR)).astype(w[k].dtype)
    save_file(w, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_a_float16_model_with_large_scores_keeps_its_paths_in_agreement(scaled_dir):
    """float16 `paths`: the decode row of layers.1.attn.probs was 1.78x the fixed budget (measured on
    the old rule); carried through the softmax it is inside, and the worst stage is elsewhere."""
    lm = sources.load(str(scaled_dir), "float16")
    r = paths.check_paths(lm.model, SEED_IDS, chunks=(2,), continue_n=0, dtype="float16")
    assert r["agree"], r["first_divergence"]
    worst = max(np.nanmax(r["nmse_by_tap_position"]["decode"]["layers.1.attn.probs"])
                / tolerance_for("layers.1.attn.probs", "nmse", "float16", "float16", 2), 0.0)
    assert worst > 1.0  # over the fixed budget: the false alarm this fixes


@pytest.mark.parametrize("fault", ["rope-decode-offset", "drop-kv:9"])
def test_path_faults_on_large_float16_scores_still_diverge(fault, scaled_dir):
    lm = sources.load(str(scaled_dir), "float16")
    r = paths.check_paths(lm.model, SEED_IDS, chunks=(2,), continue_n=0, dtype="float16", fault=fault)
    assert not r["agree"]
    assert r["first_divergence"]["tap"].startswith("layers.0.attn.")


@pytest.fixture(scope="module")
def scaled_ref(scaled_dir):
    lm = sources.load(str(scaled_dir), "float32")
    return lm, run_side(lm, SEED_IDS)


@pytest.mark.parametrize("fault", ["softmax_axis", "mask_offset", "flash_no_rescale", "heads_order", "cols_zero",
                                   "transpose"])
def test_softmax_faults_on_large_scores_still_diverge_at_their_stage(fault, scaled_dir, scaled_ref, tmp_path):
    from numpy_engine import Engine, Fault

    from mlx_tinyllama import refs as R

    lm, ref = scaled_ref
    spec = f"{fault}@1"
    engine = Engine(scaled_dir, [spec])
    engine.prefill(SEED_IDS)
    dump = engine.dump(tmp_path / "f.safetensors", SEED_IDS)
    r = compare(R.load(dump)[0], [ref], Tolerances(), lm.config.as_dict(), len(SEED_IDS))
    d = r["first_divergence"]
    assert d["tap"] == Fault.parse(spec).stage
    assert d["error"]["ratio"] > 10
    clean = Engine(scaled_dir)
    clean.prefill(SEED_IDS)
    r = compare(R.load(clean.dump(tmp_path / "c.safetensors", SEED_IDS))[0], [ref], Tolerances(),
                lm.config.as_dict(), len(SEED_IDS))
    assert r["status"] == "match", r["first_divergence"]


def test_scores_rounded_to_float16_in_a_float32_engine_diverge_at_the_probabilities(scaled_ref):
    """An engine that dumps no scores and computes them in float16 inside float32: the widened budget
    is the scores' float32 tolerance carried through the softmax, and the float16 scores are far over
    it, so the probabilities show it (where A is at its largest)."""
    lm, ref = scaled_ref
    cand = copy.copy(ref)
    cand.tensors = {t: x for t, x in ref.tensors.items() if not t.startswith("layers.1.attn.scores")}
    s = ref.tensors["layers.1.attn.scores_masked"]
    s16 = np.where(s > -1e30, np.where(s > -1e30, s, 0.0).astype(np.float16).astype(np.float64), -np.inf)
    cand.tensors["layers.1.attn.probs"] = _softmax(s16).astype(np.float32)
    r = compare(cand, [ref], Tolerances(), lm.config.as_dict(), len(SEED_IDS))
    d = r["first_divergence"]
    assert d["tap"] == "layers.1.attn.probs" and d["error"]["ratio"] > 10, d
    amp = next(e for e in r["entries"] if e["tap"] == "layers.1.attn.probs" and e["metric"] == "nmse")
    assert amp["tolerance"] > 10 * tolerance_for("layers.1.attn.probs", "nmse", "float32", "float32", 2)


@pytest.mark.xfail(strict=True, reason="known (docs/compare.md, Not done): the widening stops at attn.out; with a "
                                       "small residual the amplified error reaches layers.0.mlp.prod at ~1.1x")
def test_an_exact_engine_against_large_float16_scores_matches(scaled_dir, tmp_path):
    from numpy_engine import Engine

    from mlx_tinyllama import refs as R

    lm = sources.load(str(scaled_dir), "float16")
    engine = Engine(scaled_dir)
    engine.prefill(SEED_IDS)
    dump = engine.dump(tmp_path / "exact.safetensors", SEED_IDS, dtype="float16")
    r = compare(R.load(dump)[0], [run_side(lm, SEED_IDS)], Tolerances(), lm.config.as_dict(), len(SEED_IDS))
    ratio = {e["tap"]: e["value"] / e["tolerance"] for e in r["entries"] if e["metric"] == "nmse"}
    assert ratio["layers.0.attn.out"] < 0.1  # the readers are inside their widened budget
    assert r["status"] == "match", (r["first_divergence"]["tap"], ratio.get("layers.0.resid_mid"),
                                    ratio.get("layers.0.mlp.prod"))

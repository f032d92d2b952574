"""Replay, diagnosis and coverage (mlx_tinyllama/localize) on dumps of the independent NumPy engine
(tests/numpy_engine.py): each transform ID is proven by injecting its fault and getting that
diagnosis; the clean engine is localized nowhere and diagnosed with nothing; a drift under
tolerance that innocent stages amplify is not blamed, the real fault after it is."""

from __future__ import annotations

import math

import pytest

from conftest import SEED_IDS
from mlx_tinyllama import refs as R
from mlx_tinyllama import sources
from mlx_tinyllama.compare import compare, run_side
from mlx_tinyllama.localize import localize
from mlx_tinyllama.localize.transforms import BY_ID, TRANSFORMS
from mlx_tinyllama.stages import tap_names
from mlx_tinyllama.tolerances import Tolerances, tolerance_for
from numpy_engine import Engine, Fault


@pytest.fixture(scope="module")
def tiny():
    lm = sources.load("synthetic:tiny", "float32")
    return lm, run_side(lm, SEED_IDS)


def localize_dump(engine: Engine, path, lm, ref, keep=None) -> dict:
    engine.prefill(SEED_IDS)
    engine.dump(path, SEED_IDS)
    cand = R.load(path)[0]
    if keep is not None:
        cand.tensors = {t: x for t, x in cand.tensors.items() if keep(t)}
    result = compare(cand, [ref], Tolerances(), lm.config.as_dict(), len(SEED_IDS))
    return localize(result, cand, [ref], lm, Tolerances(), len(SEED_IDS))


# transform ID -> (fault injected in the NumPy engine, the ID diagnosis must give)
PROOFS = {
    "transpose": ("transpose@1", "transpose"),
    "ggml_dim_order": ("ggml_dim_order@1", "ggml_dim_order"),
    "heads_order": ("heads_order@1", "heads_order"),
    "axis_order": ("axis_order@1", "axis_order:dim,token,kv_head"),
    "heads_group_major": ("heads_group_major@1", "heads_group_major"),
    "scores_already_scaled": ("scores_already_scaled@1", "scores_already_scaled"),
    "rope_interleaved": ("rope_interleaved@1", "rope_interleaved"),
    "rope_offset": ("rope_offset:2@1", "rope_offset:2"),
    "missing_scale": ("missing_scale@1", "missing_scale"),
    "double_scale": ("double_scale@1", "double_scale"),
    "softmax_axis": ("softmax_axis@1", "softmax_axis"),
    "mask_off": ("mask_off@1", "mask_off"),
    "mask_offset": ("mask_offset:-2@1", "mask_offset:-2"),
    "kv_head_mapping": ("kv_head_mapping@1", "kv_head_mapping"),
    "bos_shift": ("bos_shift", "bos_shift"),
    "fp16_rounding": ("fp16_rounding@1", "fp16_rounding"),
}


def test_every_transform_has_a_proof():
    assert set(PROOFS) == set(BY_ID) == {t.id for t in TRANSFORMS}


@pytest.mark.parametrize("tid", sorted(PROOFS))
def test_injected_fault_is_localized_and_diagnosed(tid, tiny_dir, tmp_path, tiny):
    lm, ref = tiny
    spec, expected = PROOFS[tid]
    fault = Fault.parse(spec)
    result = localize_dump(Engine(tiny_dir, [spec]), tmp_path / "d.safetensors", lm, ref)
    loc = result["localized"]
    assert loc["stage"] == fault.stage == result["first_divergence"]["tap"]
    assert loc["local_ratio"] > 100 and loc["inherited_ratio"] < 1
    assert result["diagnosis"], f"no diagnosis for {spec}"
    best = result["diagnosis"][0]
    assert (best["stage"], best["transform"]) == (fault.stage, expected)
    assert best["ratio_after"] <= 1 and best["words"]
    assert [d["transform"] for d in result["diagnosis"]] == [expected]  # no other transform explains it


def test_clean_engine_is_localized_nowhere(tiny_dir, tmp_path, tiny):
    lm, ref = tiny
    result = localize_dump(Engine(tiny_dir), tmp_path / "c.safetensors", lm, ref)
    assert result["status"] == "match" and result["localized"] is None and result["diagnosis"] == []
    locals_ = [s["local_ratio"] for s in result["stages"]]
    assert all(r is not None for r in locals_[1:])  # every stage replayed, the embedding from the ids too
    assert max(locals_) < 0.2 and result["replay"]["replayed"] == len(result["stages"])


def test_a_real_fault_without_a_transform_is_localized_not_diagnosed(tiny_dir, tmp_path, tiny):
    lm, ref = tiny
    result = localize_dump(Engine(tiny_dir, ["wrong_scale@1"]), tmp_path / "w.safetensors", lm, ref)
    assert result["localized"]["stage"] == "layers.1.attn.scores_scaled"
    assert result["diagnosis"] == []  # scale × 1.25 is none of the library's mistakes: nothing is claimed


def drift_eps(n_layers: int, fraction: float = 0.5) -> float:
    return math.sqrt(fraction * tolerance_for("layers.0.attn_norm", "nmse", "float32", "float32", n_layers))


def test_drift_plus_real_fault_localizes_the_real_fault(small_dir, tmp_path):
    """Layer 0's RMSNorm drifts at half its tolerance; Q·Kᵀ (innocent) doubles the relative error and
    is the first stage over tolerance; the real fault is layer 2's attention scale. Replay names layer 2."""
    lm = sources.load("synthetic:small", "float32")
    ref = run_side(lm, SEED_IDS)
    result = localize_dump(Engine(small_dir, [f"drift:{drift_eps(4)}", "wrong_scale@2"]), tmp_path / "d.safetensors",
                           lm, ref)
    local = {s["tap"]: s["local_ratio"] for s in result["stages"]}
    total = {s["tap"]: s["ratio"] for s in result["stages"]}
    assert result["first_divergence"]["tap"] == "layers.0.attn.scores" and total["layers.0.attn_norm"] < 1
    assert 0.3 < local["layers.0.attn_norm"] < 1  # the drift itself: under tolerance, locally too
    assert local["layers.0.attn.scores"] < 0.01  # the innocent amplifier: nothing local
    assert result["localized"]["stage"] == "layers.2.attn.scores_scaled"
    assert result["localized"]["local_ratio"] > 1e3

    alone = localize_dump(Engine(small_dir, [f"drift:{drift_eps(4)}"]), tmp_path / "a.safetensors", lm, ref)
    assert alone["status"] == "diverged" and alone["localized"] is None
    assert "layers.0.attn_norm" in alone["replay"]["note"]


def test_fused_attention_dump_replays_context_through_the_missing_stages(tiny_dir, tmp_path, tiny):
    """No scores or probabilities in the dump (a fused attention kernel): the context is replayed
    from their q_rope, k_rope and v; a softmax over the wrong axis is localized at the context."""
    lm, ref = tiny
    internals = ("attn.scores", "attn.scores_scaled", "attn.scores_masked", "attn.probs")
    keep = lambda t: not t.endswith(internals)  # noqa: E731
    result = localize_dump(Engine(tiny_dir, ["softmax_axis@1"]), tmp_path / "f.safetensors", lm, ref, keep)
    assert result["localized"]["stage"] == "layers.1.attn.context"
    assert result["coverage"]["missing"] == [f"layers.{i}.{s}" for i in range(2) for s in internals]
    clean = localize_dump(Engine(tiny_dir), tmp_path / "c.safetensors", lm, ref, keep)
    assert clean["localized"] is None and max(s["local_ratio"] for s in clean["stages"][1:]) < 0.2


def test_layer_outputs_only_localize_the_layer(tiny_dir, tmp_path, tiny):
    """A dump of each layer's output only: the replay recomputes the whole layer from the previous
    output, so the faulty layer is named (not the first layer, which already inherits nothing)."""
    lm, ref = tiny
    keep = lambda t: (t.endswith(".out") and not t.endswith("attn.out")) or t in ("embed", "final_norm", "logits")  # noqa: E731
    result = localize_dump(Engine(tiny_dir, ["kv_head_mapping@1"]), tmp_path / "l.safetensors", lm, ref, keep)
    local = {s["tap"]: s["local_ratio"] for s in result["stages"]}
    assert local["layers.0.out"] < 0.2 and result["localized"]["stage"] == "layers.1.out"


def test_coverage_names_missing_unmapped_and_misshapen_stages(tiny_dir, tmp_path, tiny):
    from numpy_engine import _kit_module

    lm, ref = tiny
    engine = Engine(tiny_dir)
    taps = engine.prefill(SEED_IDS)
    d = _kit_module().TapDump(tokens=SEED_IDS, dtype="float32")
    for name, x in taps.items():
        if name.startswith("layers.1.mlp."):
            continue  # never dumped
        d.add(name, x[:, :-1] if name == "layers.0.attn.out" else x)  # one column short
    d.add("my_engine.kv_cache", taps["layers.0.attn.k"])
    d.write(tmp_path / "c.safetensors")
    cand = R.load(tmp_path / "c.safetensors")[0]
    result = localize(compare(cand, [ref], Tolerances(), lm.config.as_dict(), len(SEED_IDS)), cand, [ref], lm,
                      Tolerances(), len(SEED_IDS))
    cov = result["coverage"]
    mlp = ["layers.1.mlp.gate", "layers.1.mlp.up", "layers.1.mlp.act", "layers.1.mlp.prod", "layers.1.mlp.down"]
    assert cov["missing"] == mlp
    assert list(cov["shape_mismatch"]) == ["layers.0.attn.out"]
    assert "no canonical tap" in cov["not_comparable"]["my_engine.kv_cache"]
    n = len(tap_names(2))  # every canonical tap of the 2-layer model has a cell
    assert len(cov["compared"]) == n - 6 and len(cov["cells"]) == n
    assert {cov["cells"][t] for t in mlp} == {"missing"}

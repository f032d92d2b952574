"""fp16 stability: stress presets break exactly where they were built to (and
where transformers fp16 breaks), the hf policy stays finite where transformers
does, normal models stay finite with bounded drift, and our fp16 error against
fp32 is no larger than transformers' (within FACTOR)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import SEED_IDS, needs_torch
from mlx_tinyllama import stability, stress, synthetic
from mlx_tinyllama.taps import tap_names
from mlx_tinyllama.tolerances import tolerance_for
from mlx_tinyllama.trace import main as trace_main

ALL_POLICIES = list(stability.POLICY_ORDER)
PRESETS = list(stress.STRESS_PRESETS)
# Our fp16 NMSE vs fp32 must stay within FACTOR × transformers' fp16 NMSE vs fp32 (+ FLOOR for taps
# where both are exact). Measured (docs/stability.md), seed prompt, hf policy, largest ratio over all
# taps: 1.18 on synthetic:tiny and on synthetic:small; with the CPU's half matmuls as fp32 GEMM and
# SiLU in fp32 (ops.py) 1.15 on tiny and 1.14 on small (same precision as transformers, not
# identical roundings: most taps sit between 1.0 and 1.1); the fp16-pure policy reaches 2.6 (its
# RMSNorm runs in fp16), so 2 separates "same precision as transformers" from "one stage less precise".
FACTOR = 2.0
FLOOR = 1e-12


@pytest.fixture(scope="module")
def results() -> dict:
    """One stability run (fp16, every policy) per stress preset and for the normal tiny model."""
    out = {}
    for preset in PRESETS + ["tiny"]:
        out[preset], _, _ = stability.run_stability(f"synthetic:{preset}", SEED_IDS, ["float16"], ALL_POLICIES)
    return out


def _transformers_taps(model_dir, dtype: str) -> dict[str, np.ndarray]:
    import torch

    from mlx_tinyllama.reference import hf

    # reference/hf.py checks its recomputed probs with torch.equal, which is False for NaN == NaN;
    # on a model that breaks, compare NaN-aware (the lead is asked to fix this in hf.py).
    plain_equal = torch.equal
    torch.equal = lambda a, b: a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())
    try:
        taps, _ = hf.capture(hf.load_hf_model(model_dir, dtype), SEED_IDS)
    finally:
        torch.equal = plain_equal
    return {n: t.float().numpy() for n, t in taps.items()}


@pytest.fixture(scope="module")
def transformers_runs() -> dict:
    """Per preset: transformers fp16 taps measured against transformers fp32 by the same code as ours."""
    out = {}
    for preset in PRESETS + ["tiny"]:
        model_dir = synthetic.materialize(preset, 0)
        low, ref = _transformers_taps(model_dir, "float16"), _transformers_taps(model_dir, "float32")
        cfg = synthetic.PRESETS[preset]
        out[preset] = stability.analyze(low, ref, "float16", "transformers", "eager", cfg)
    return out


# ---------------------------------------------------------------------------
# Stress presets


def test_presets_are_registered():
    for name in PRESETS:
        assert synthetic.parse_spec(f"synthetic:{name}") == (name, 0)
        assert name in synthetic.WEIGHT_TWEAKS


@pytest.mark.parametrize("preset", PRESETS)
def test_fp16_pure_breaks_at_the_built_stage(results, preset):
    spec = stress.STRESS_PRESETS[preset]
    run = results[preset]["runs"]["float16"]["fp16-pure"]
    assert run["origin"]["tap"] == spec.breaks
    assert run["origin"]["kind"] == spec.failure
    if spec.failure == "nonfinite":
        assert run["first_nonfinite"] == spec.breaks
        assert run["taps"][spec.breaks]["inf"] > 0
    else:  # an fp16 RMSNorm overflow zeroes rows (rsqrt(inf) = 0): no NaN, logits all zero
        assert run["first_collapse"] == spec.breaks and run["first_nonfinite"] is None
        assert run["taps"][spec.breaks]["collapsed_rows"] == run["taps"][spec.breaks]["rows"]
        assert run["taps"]["logits"]["absmax"] == 0.0
    for name in tap_names(2)[: tap_names(2).index(spec.breaks)]:  # everything before it is intact
        t = run["taps"][name]
        assert t["nan"] == t["inf"] == t["collapsed_rows"] == 0, name


@pytest.mark.parametrize("preset", PRESETS)
def test_broken_policies_are_exactly_the_documented_ones(results, preset):
    spec = stress.STRESS_PRESETS[preset]
    runs = results[preset]["runs"]["float16"]
    assert {p for p in ALL_POLICIES if not stability.sound(runs[p])} == set(spec.broken_policies)
    for p in spec.broken_policies:
        assert runs[p]["origin"]["tap"] == spec.breaks


@needs_torch
@pytest.mark.parametrize("preset", PRESETS + ["tiny"])
def test_first_nonfinite_matches_transformers_fp16(results, transformers_runs, preset):
    theirs = transformers_runs[preset]["first_nonfinite"]
    runs = results[preset]["runs"]["float16"]
    # transformers' policy is hf: same first non-finite stage, or finite where transformers is.
    assert runs["hf"]["first_nonfinite"] == theirs
    if theirs is not None:
        assert theirs == stress.STRESS_PRESETS[preset].breaks
        assert runs["fp16-pure"]["first_nonfinite"] == theirs
    else:
        assert transformers_runs[preset]["first_collapse"] is None
        assert stability.sound(runs["hf"])


def test_bfloat16_keeps_the_mlp_stress_finite():
    result, _, _ = stability.run_stability("synthetic:stress-mlp", SEED_IDS, ["bfloat16"], ["hf"])
    run = result["runs"]["bfloat16"]["hf"]
    assert stability.sound(run)
    assert run["taps"]["layers.1.mlp.prod"]["headroom"] < 0  # beyond fp16's range, fine in bf16


def test_origin_names_the_fed_values(results):
    mlp = results["stress-mlp"]["runs"]["float16"]["hf"]["origin"]
    ref_prod = results["stress-mlp"]["reference"]["taps"]["layers.1.mlp.prod"]["absmax"]
    assert ref_prod > stability.FP16_MAX and mlp["reference_absmax"] == ref_prod
    assert "MLP product overflowed" in mlp["explanation"]
    assert all(v["nan"] == v["inf"] == 0 and v["absmax"] < stability.FP16_MAX for v in mlp["inputs"].values())
    assert set(mlp["inputs"]) == {"layers.1.mlp.act", "layers.1.mlp.up"}

    scores = results["stress-scores"]["runs"]["float16"]["fp16-pure"]["origin"]
    assert "Q·Kᵀ overflowed" in scores["explanation"] and "mixed" in scores["explanation"]
    assert set(scores["inputs"]) == {"layers.1.attn.q_rope", "layers.1.attn.k_rope"}

    norm = results["stress-norm"]["runs"]["float16"]["fp16-pure"]["origin"]
    fed = norm["inputs"]["layers.0.out"]["absmax"]
    assert fed ** 2 > stability.FP16_MAX > fed  # x fits in fp16, x² does not
    assert "x² overflowed" in norm["explanation"] and "logits are all zero" in norm["explanation"]


def test_recommendation_names_the_cheapest_sound_policy(results):
    assert "at least policy 'mixed'" in results["stress-scores"]["recommendation"]["float16"]
    assert "at least policy 'hf'" in results["stress-norm"]["recommendation"]["float16"]
    assert results["stress-mlp"]["recommendation"]["float16"].startswith("no float16 policy")
    assert "stays finite even with every op in float16" in results["tiny"]["recommendation"]["float16"]


# ---------------------------------------------------------------------------
# Normal model: finite, drift bounded, no worse than transformers


def test_normal_model_finite_at_every_policy_with_bounded_drift(results):
    result = results["tiny"]
    names = tap_names(2)
    for policy, run in result["runs"]["float16"].items():
        assert stability.sound(run), policy
        for name in names:
            t = run["taps"][name]
            assert t["nan"] == t["inf"] == t["masked_inf"] == 0
            assert math.isfinite(t["nmse"]) and t["nmse"] <= tolerance_for(name, "nmse", "float16", "float32", 2), \
                (policy, name, t["nmse"])
            assert t["headroom"] > 4  # a normal model sits far from 65504
        assert run["taps"]["logits"]["nmse"] > 0  # fp16 really ran: the drift is measured, not zero


@needs_torch
def test_our_fp16_error_is_no_larger_than_transformers(results, transformers_runs):
    ours = results["tiny"]["runs"]["float16"]["hf"]["taps"]
    theirs = transformers_runs["tiny"]["taps"]
    worse = {n: (ours[n]["nmse"], theirs[n]["nmse"]) for n in tap_names(2)
             if not ours[n]["nmse"] <= FACTOR * theirs[n]["nmse"] + FLOOR}
    assert not worse, worse
    assert max(theirs[n]["nmse"] for n in ours) > 1e-7  # transformers' fp16 error is real, not zero


# ---------------------------------------------------------------------------
# Measuring one tap


def test_tap_metrics_counts_underflow_nonfinite_and_collapse():
    tiny = float(np.finfo(np.float16).tiny)
    low = np.array([[0.0, tiny / 4, 1.0, np.inf], [0.0, 0.0, 0.0, 0.0], [np.nan, 2.0, 3.0, -4.0]], np.float32)
    ref = np.array([[1e-3, tiny / 4, 1.0, 7e4], [1.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, -4.0]], np.float32)
    m = stability.tap_metrics("layers.0.attn_norm", low, ref, "float16")
    assert (m["underflow"], m["inf"], m["nan"], m["collapsed_rows"], m["rows"]) == (3, 1, 1, 1, 3)
    assert m["absmax"] == 4.0 and m["headroom"] == pytest.approx(math.log2(65504 / 4))


def test_masked_minus_inf_is_harmless_but_plus_inf_is_not():
    s = np.zeros((1, 3, 3), np.float32)
    s[0][np.triu_indices(3, 1)] = -np.inf  # fp16 mask + a negative score rounds to -inf: harmless
    m = stability.tap_metrics("layers.0.attn.scores_masked", s, np.where(np.isinf(s), -3e38, 0), "float16")
    assert (m["inf"], m["masked_inf"]) == (0, 3)
    s[0, 0, 2] = np.inf  # +inf above the diagonal poisons the softmax
    assert stability.tap_metrics("layers.0.attn.scores_masked", s, np.zeros_like(s), "float16")["inf"] == 1


def test_headroom_in_powers_of_two():
    assert stability.headroom(65504.0) == 0
    assert stability.headroom(65504.0 / 8) == pytest.approx(3)
    assert stability.headroom(0.0) == math.inf
    assert stability.headroom(2 * 65504.0) == pytest.approx(-1)


# ---------------------------------------------------------------------------
# Command line


def test_cli_json_per_policy(tmp_path, capsys, results):
    out = tmp_path / "s.json"
    rc = trace_main(["stability", "--model", "synthetic:stress-scores", "--token-ids",
                     ",".join(map(str, SEED_IDS)), "--taps", "layers.1.attn.*", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    text = capsys.readouterr().out
    for policy in ALL_POLICIES:
        run = data["runs"]["float16"][policy]
        assert run["first_nonfinite"] == results["stress-scores"]["runs"]["float16"][policy]["first_nonfinite"]
        assert {"absmax", "headroom"} <= set(run["taps"]["layers.1.attn.scores"])
    assert data["runs"]["float16"]["mixed"]["first_nonfinite"] is None
    assert "Q·Kᵀ overflowed" in text and "needs at least policy 'mixed'" in text


def test_cli_one_policy_and_bf16(tmp_path):
    out = tmp_path / "s.json"
    assert trace_main(["stability", "--model", "synthetic:tiny", "--token-ids", "1,2,3", "--dtype", "bf16",
                       "--policy", "fp16-pure", "--json", str(out), "--taps", "logits"]) == 0
    data = json.loads(out.read_text())
    assert list(data["runs"]) == ["bfloat16"] and list(data["runs"]["bfloat16"]) == ["fp16-pure"]


@pytest.mark.parametrize("argv, message", [
    (["--policies", "hf,fast"], "unknown precision policy 'fast'"),
    (["--dtypes", "float16,fp8"], "unknown dtype 'fp8'"),
    (["--dtype", "float32"], "stability compares a low-precision run against float32"),
    (["--model", "synthetic:stress-nope"], "unknown synthetic preset"),
    (["--json", "/nonexistent-dir/x.json"], "does not exist"),
])
def test_bad_input_exits_2(tmp_path, capsys, argv, message):
    before = set(tmp_path.iterdir())
    model = [] if "--model" in argv else ["--model", "synthetic:tiny"]  # (a second --model is refused)
    assert trace_main(["stability", *model, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert set(tmp_path.iterdir()) == before


def test_bad_policy_choice_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        trace_main(["stability", "--policy", "fp8-pure"])
    assert e.value.code == 2 and "fp8-pure" in capsys.readouterr().err


def test_model_too_big_for_memory_is_refused_before_loading(tmp_path, capsys):
    cfg = synthetic.PRESETS["tiny"].to_hf_dict()
    cfg.update(hidden_size=65536, intermediate_size=262144, num_hidden_layers=512, num_attention_heads=512,
               num_key_value_heads=512, head_dim=128)  # ~3e13 parameters, no weights on disk
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert trace_main(["stability", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "does not fit in memory at float32" in err and "GiB" in err

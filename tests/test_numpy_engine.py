"""The independent NumPy engine (tests/numpy_engine.py) as "another engine": clean, its dumps match
this package's MLX run at every tap through `compare`; each injected fault diverges at its stage;
the drift case puts the first divergence on an innocent stage; decode steps through its own KV
cache match MLX's KV-cache decode, and the decode faults break the step they should."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from conftest import SEED_IDS
from mlx_tinyllama import refs as R
from mlx_tinyllama import sources
from mlx_tinyllama.compare import compare, run_side
from mlx_tinyllama.taps import Taps, tap_names
from mlx_tinyllama.tolerances import Tolerances, tolerance_for
from mlx_tinyllama.metrics import metrics
from mlx_tinyllama.trace import main as cli
from numpy_engine import FAULTS, Engine, Fault

# ("bias" faults need a model with biases: test_feature_hints.py; "window" faults a sliding window:
# test_steps.py runs them on synthetic:mistral-tiny)
PREFILL_FAULTS = sorted(n for n, (kind, _, _) in FAULTS.items() if kind in ("compute", "dump") and n != "drift")
DECODE_FAULTS = sorted(n for n, (kind, _, _) in FAULTS.items() if kind == "decode")


@pytest.fixture(scope="module")
def tiny_lm():
    return sources.load("synthetic:tiny", "float32")


@pytest.fixture(scope="module")
def tiny_ref(tiny_lm):
    return run_side(tiny_lm, SEED_IDS)


def _compare(engine: Engine, path, lm, ref) -> dict:
    engine.prefill(SEED_IDS)
    engine.dump(path, SEED_IDS)
    return compare(R.load(path)[0], [ref], Tolerances(), lm.config.as_dict(), len(SEED_IDS))


def drift_eps(fraction: float, n_layers: int) -> float:
    """RMSNorm × (1+eps) has NMSE eps²: the eps that puts layer 0's attn_norm at `fraction` of its tolerance."""
    return float(np.sqrt(fraction * tolerance_for("layers.0.attn_norm", "nmse", "float32", "float32", n_layers)))


def test_clean_engine_matches_the_mlx_model_at_every_tap(tiny_dir, tmp_path):
    """Through the CLI: every canonical tap compared, each far inside its float32 tolerance."""
    engine = Engine(tiny_dir)
    engine.prefill(SEED_IDS)
    dump = engine.dump(tmp_path / "clean.safetensors", SEED_IDS)
    rc = cli(["compare", "--against", str(dump), "--model", "synthetic:tiny", "--dtype", "float32",
              "--json", str(tmp_path / "c.json")])
    result = json.loads((tmp_path / "c.json").read_text())
    assert rc == 0 and result["status"] == "match"
    assert [s["tap"] for s in result["stages"]] == tap_names(2)
    assert max(s["ratio"] for s in result["stages"]) < 0.2  # fp32 NMSE far below even the tightest tolerance


@pytest.mark.parametrize("fault", PREFILL_FAULTS)
def test_each_fault_diverges_at_its_stage(fault, tiny_dir, tmp_path, tiny_lm, tiny_ref):
    spec = f"{fault}@1" if FAULTS[fault][1] != "embed" else fault  # layer 1: the faults are not layer-0 only
    expected = Fault.parse(spec).stage
    result = _compare(Engine(tiny_dir, [spec]), tmp_path / "f.safetensors", tiny_lm, tiny_ref)
    assert result["first_divergence"]["tap"] == expected
    d = result["first_divergence"]
    assert d["error"]["ratio"] > 10
    assert d["before"] is None or d["before"]["ok"]


def test_drift_under_tolerance_is_amplified_over_it_by_innocent_stages(tiny_dir, tmp_path, tiny_lm, tiny_ref):
    """The issue's trap: attn_norm is off by half its tolerance (not flagged); Q·Kᵀ multiplies the
    two equal relative errors of q and k (NMSE ×4), so the innocent attn.scores is the first stage over."""
    eps = drift_eps(0.5, 2)
    result = _compare(Engine(tiny_dir, [f"drift:{eps}"]), tmp_path / "d.safetensors", tiny_lm, tiny_ref)
    ratio = {s["tap"]: s["ratio"] for s in result["stages"]}
    assert 0.3 < ratio["layers.0.attn_norm"] < 1
    assert result["first_divergence"]["tap"] == "layers.0.attn.scores"
    assert 1.5 < ratio["layers.0.attn.scores"] < 3  # ~4x the NMSE of q and k


def test_drift_plus_a_real_fault_later(small_dir, tmp_path):
    """drift in layer 0 and a wrong attention scale in layer 2 (synthetic:small, 4 layers): the first
    stage over tolerance is layer 0's, far ahead of the real fault."""
    lm = sources.load("synthetic:small", "float32")
    ref = run_side(lm, SEED_IDS)
    result = _compare(Engine(small_dir, [f"drift:{drift_eps(0.5, 4)}", "wrong_scale@2"]),
                      tmp_path / "d.safetensors", lm, ref)
    ratio = {s["tap"]: s["ratio"] for s in result["stages"]}
    assert result["first_divergence"]["tap"].startswith("layers.0.")
    assert ratio["layers.2.attn.scores_scaled"] > 100 * ratio["layers.2.attn.scores"]
    clean = _compare(Engine(small_dir), tmp_path / "c.safetensors", lm, ref)
    assert clean["status"] == "match"


# --- decode steps ------------------------------------------------------------------------------

N_STEPS = 3


def _mlx_decode(lm, ids, tokens) -> list[dict[str, np.ndarray]]:
    """This package's taps for each decode step through its KV cache (mlx-lm KVCache)."""
    model = lm.model
    cache = model.make_cache()
    mx.eval(model(mx.array(ids), cache=cache))
    names = tap_names(lm.config.num_hidden_layers)
    out = []
    for tok in tokens:
        taps = Taps(names, "full")
        mx.eval(model(mx.array([tok]), cache=cache, tap=taps))
        out.append({n: np.array(v.astype(mx.float32)) for n, v in taps.tensors.items()})
    return out


def _first_mismatch(steps, reference, n_layers) -> tuple[int, str] | None:
    """(step, tap) of the first tap over its float32 tolerance, in step then forward order."""
    for k, (got, want) in enumerate(zip(steps, reference)):
        for name in tap_names(n_layers):
            a, b = got[name], want[name]
            if a.shape != b.shape:
                return k, name
            m = metrics(a, b, masked=name.endswith("scores_masked"))
            if not m["nmse"] <= tolerance_for(name, "nmse", "float32", "float32", n_layers) or m["mask_mismatch"]:
                return k, name
    return None


def _engine_steps(engine: Engine, tokens) -> list[dict[str, np.ndarray]]:
    engine.prefill(SEED_IDS)
    return [dict(engine.step(t)) for t in tokens]


@pytest.fixture(scope="module")
def decode_case(tiny_dir, tiny_lm):
    engine = Engine(tiny_dir)
    engine.prefill(SEED_IDS)
    tokens = [int(np.argmax(engine.taps["logits"][-1]))]
    for _ in range(N_STEPS - 1):
        tokens.append(int(np.argmax(engine.step(tokens[-1])["logits"][-1])))
    return tokens, _mlx_decode(tiny_lm, SEED_IDS, tokens)


def test_clean_decode_steps_match_mlx_kv_cache_decode_and_prefill_rows(tiny_dir, decode_case):
    tokens, mlx_steps = decode_case
    steps = _engine_steps(Engine(tiny_dir), tokens)
    assert _first_mismatch(steps, mlx_steps, 2) is None
    assert steps[1]["layers.0.attn.scores"].shape == (4, 1, len(SEED_IDS) + 2)  # S grows with the cache
    prefill = Engine(tiny_dir).prefill(SEED_IDS + tokens)  # one prefill over the same tokens: same rows
    for k, step in enumerate(steps):
        pos = len(SEED_IDS) + k
        np.testing.assert_allclose(step["layers.1.out"][0], prefill["layers.1.out"][pos], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(step["layers.1.attn.probs"][:, 0], prefill["layers.1.attn.probs"][:, pos, :pos + 1],
                                   rtol=1e-9, atol=1e-12)


DECODE_CASES = [
    ("cache_stops_growing", 1, "layers.0.attn.scores"),  # step 0 still fits in the cache
    ("positions_stuck", 1, "layers.0.attn.q_rope"),  # step 0 is at the right position by luck
    ("zeros_after_first_step", 1, "layers.0.attn.context"),
    ("kv_late", 0, "layers.0.attn.scores"),  # the first step's own key is in the slot after the one read
    ("ring", 0, "layers.0.attn.scores"),  # 4 of 39 keys
    ("extra_key", 0, "layers.0.attn.scores"),  # 40 keys at position 38
]


def test_every_decode_fault_has_a_case():
    assert sorted(c[0] for c in DECODE_CASES) == DECODE_FAULTS


@pytest.mark.parametrize("fault,step,tap", DECODE_CASES)
def test_decode_fault_breaks_the_step_after_the_first(fault, step, tap, tiny_dir, tiny_lm, decode_case):
    tokens, mlx_steps = decode_case
    assert FAULTS[fault][1] == tap.split(".", 2)[2]
    steps = _engine_steps(Engine(tiny_dir, [fault]), tokens)
    assert _first_mismatch(steps, mlx_steps, 2) == (step, tap)
    clean, faulty = Engine(tiny_dir).prefill(SEED_IDS), Engine(tiny_dir, [fault]).prefill(SEED_IDS)
    assert all(np.array_equal(clean[n], faulty[n]) for n in clean)  # decode faults leave the prefill alone

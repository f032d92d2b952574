"""The stage registry (mlx_tinyllama/stages.py) is the one place that states each stage's facts:
its derived facts agree with the display shapes, its data-flow graph is the forward pass's, a stage
added to the table reaches every consumer without a KeyError, and no other module keeps a
per-stage table of its own (a scan of the package's string literals)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import SEED_IDS
from mlx_tinyllama import sources, stages
from mlx_tinyllama.stages import LAYER_INPUT, Stage, inputs_of, stage_of, tap_names

PACKAGE = Path(__file__).resolve().parents[1] / "mlx_tinyllama"


def test_display_shape_token_and_key_axes_derive_from_dims():
    got = {s.name: (s.shape, s.token_axis, s.key_axis, s.head_major) for s in stages.all_stages()}
    assert got["attn.q"] == ("[H, T, D]", 1, None, True)
    assert got["attn.k"] == ("[KV, T, D]", 1, None, True)
    assert got["attn.probs"] == ("[H, T, S]", 1, 2, True)
    assert got["attn.context"] == ("[T, H*D]", 0, None, False)
    assert got["logits"] == ("[T, V]", 0, None, False)
    cfg = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
           "vocab_size": 100}
    assert stage_of("layers.0.attn.k").sizes(cfg, 5) == (2, 5, 16)
    assert stage_of("layers.0.attn.scores").sizes(cfg, 1, 7) == (4, 1, 7)
    assert stage_of("layers.0.attn.context").sizes(cfg, 5) == (5, 64)


def test_the_graph_is_the_data_flow_not_forward_order():
    assert inputs_of("layers.2.attn.q_rope", 4) == ["layers.2.attn.q"]  # forward order would say attn.v
    assert inputs_of("layers.0.resid_mid", 4) == ["embed", "layers.0.attn.out"]
    assert inputs_of("layers.3.attn_norm", 4) == ["layers.2.out"]
    assert inputs_of("final_norm", 4) == ["layers.3.out"]
    assert inputs_of("layers.1.attn.scores", 4) == ["layers.1.attn.q_rope", "layers.1.attn.k_rope"]
    names = tap_names(3)
    for tap in names:  # every input is a tap that comes earlier in forward order
        for i in inputs_of(tap, 3):
            assert names.index(i) < names.index(tap), (tap, i)


def test_hint_uses_the_graph():
    from mlx_tinyllama.divergence import hint

    # attn.v comes just before q_rope in forward order but is not its input: the old forward-order
    # predecessor said "inputs match" from attn.v alone, though attn.q was never compared
    v = {"tap": "layers.0.attn.v"}
    assert hint("layers.0.attn.q_rope", v, 2, {"layers.0.attn.v"}).startswith("the last matching stage is")
    assert hint("layers.0.attn.q_rope", v, 2).startswith("the last matching stage is")
    both = {"layers.0.attn.q", "layers.0.attn.k", "layers.0.attn.v"}
    assert hint("layers.0.attn.q_rope", v, 2, both).startswith("inputs to this stage match")
    assert hint("layers.0.attn.q_rope", {"tap": "layers.0.attn.q"}, 2).startswith("inputs to this stage match")


# ---------------------------------------------------------------------------
# A stage added to the table reaches every consumer


EXTRA = Stage("extra.twice", ("token", "hidden"), "residual", "a stage added by the test: 2 × out", "twice",
              ("out",), hint="the test's doubling")


@pytest.fixture
def extra_stage(monkeypatch):
    """The table with EXTRA after `out`, in every module that bound the table."""
    old = stages.LAYER_STAGES
    new = old + (EXTRA,)
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("mlx_tinyllama") and getattr(mod, "LAYER_STAGES", None) is old:
            monkeypatch.setattr(mod, "LAYER_STAGES", new)
    return new


@pytest.fixture(scope="module")
def tiny():
    from mlx_tinyllama.compare import run_side

    lm = sources.load("synthetic:tiny", "float32")
    return lm, run_side(lm, SEED_IDS)


def _with_extra(side, factor_at: dict[int, float]):
    import copy

    out = copy.copy(side)
    out.tensors = dict(side.tensors)
    for i in range(side.config["num_hidden_layers"] if side.config else 0):
        out.tensors[f"layers.{i}.extra.twice"] = side.tensors[f"layers.{i}.out"] * factor_at.get(i, 2.0)
    return out


@pytest.mark.parametrize("broken", [False, True])
def test_a_stage_added_to_the_table_reaches_every_consumer(tiny, extra_stage, broken):
    from mlx_tinyllama.compare import compare
    from mlx_tinyllama.localize import localize
    from mlx_tinyllama.localize.steps import compare_step
    from mlx_tinyllama.refs.layout import to_canonical
    from mlx_tinyllama.report.sections import magnitude_section
    from mlx_tinyllama.stability import explain
    from mlx_tinyllama.tolerances import Tolerances

    lm, ref = tiny
    L = lm.config.num_hidden_layers
    ref = _with_extra(ref, {})
    cand = _with_extra(ref, {1: 3.0} if broken else {})
    assert "layers.1.extra.twice" in tap_names(L)
    result = compare(cand, [ref], Tolerances(), lm.config.as_dict(), len(SEED_IDS))
    result = localize(result, cand, [ref], lm, Tolerances(), len(SEED_IDS))
    assert result["coverage"]["cells"]["layers.1.extra.twice"] == "compared"
    skipped = result["replay"]["skipped"]
    assert "not replayable" in skipped["layers.1.extra.twice"] and "'twice'" in skipped["layers.1.extra.twice"]
    if broken:
        assert result["status"] == "diverged" and result["first_divergence"]["tap"] == "layers.1.extra.twice"
        assert "the test's doubling" in result["first_divergence"]["hint"]
        assert result["diagnosis"] == []  # nothing in the library explains a factor of 1.5
    else:
        assert result["status"] == "match"
    # steps, layouts, stability and the report on every tap, the new one included
    x = cand.tensors["layers.1.extra.twice"]
    rows = compare_step({"layers.1.extra.twice": x}, {"layers.1.extra.twice": ref.tensors["layers.1.extra.twice"]},
                        0, Tolerances(), ("float32", "float32"), L)
    assert rows[0]["ok"] is (not broken)
    canon, _, _, notes = to_canonical("layers.1.extra.twice", x.T.copy()[None], None, lm.config.as_dict(),
                                      len(SEED_IDS))
    assert np.array_equal(canon, x) and notes
    low = {t: v for t, v in ref.tensors.items()}
    run = {"taps": {t: {"nan": 0, "inf": 1, "collapsed_rows": 0, "rows": 1} for t in low}}
    text = explain("layers.1.extra.twice", "overflow", low, low, run, "float16", "hf", L, lm.config.head_dim)
    assert text["inputs"] == {"layers.1.out": text["inputs"]["layers.1.out"]}
    stats = {t: {"absmax": float(np.abs(v).max()), "mean": 0.0, "std": 1.0} for t, v in ref.tensors.items()}
    sec = magnitude_section(stats, L, "test")
    assert "Recorded but in no panel: extra.twice." in sec.intro


def test_the_clean_table_names_no_unplotted_stage(tiny):
    from mlx_tinyllama.report.sections import magnitude_section

    _, ref = tiny
    stats = {t: {"absmax": float(np.abs(v).max()), "mean": 0.0, "std": 1.0} for t, v in ref.tensors.items()}
    assert "no panel" not in magnitude_section(stats, 2, "test").intro


# ---------------------------------------------------------------------------
# No per-stage tables outside the registry

# The modules that may name stages: the table, the model, the transformers capture, the fault
# library, and the per-engine name maps (llama.cpp's graph names, the seed's published values).
ALLOWED = {"stages.py", "model.py", "reference/hf.py", "faults.py", "refs/llamacpp.py", "refs/seed.py"}


def stages_named(source: str) -> set[str]:
    """Stage names that appear as string literals: the name itself or a tap name ending in it."""
    names = {s.name for s in stages.all_stages()}
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            v = node.value
            found |= {n for n in names if v == n or v.endswith("." + n) and ("layers" in v or v.startswith("."))}
    return found


def test_the_scan_sees_a_per_stage_table():
    bad = 'HINTS = {"attn.q": 1, "attn.k": 2, "mlp.up": 3}\nx = f"layers.{i}.attn.probs"\n'
    assert stages_named(bad) == {"attn.q", "attn.k", "mlp.up", "attn.probs"}


def test_no_module_outside_the_registry_names_four_stages():
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in ALLOWED:
            continue
        named = stages_named(path.read_text(encoding="utf-8"))
        if len(named) >= 4:
            offenders[rel] = sorted(named)
    assert offenders == {}


def test_inputs_refer_to_stages():
    layer = {s.name for s in stages.LAYER_STAGES}
    glob = {s.name for s in stages.GLOBAL_HEAD + stages.GLOBAL_TAIL}
    for s in stages.LAYER_STAGES:
        assert all(i in layer or i == LAYER_INPUT for i in s.inputs), s.name
    for s in stages.GLOBAL_HEAD + stages.GLOBAL_TAIL:
        assert all(i in glob or i == stages.LAST_OUTPUT for i in s.inputs), s.name
    assert all(s.panel is None or s.panel in stages.PANELS for s in stages.all_stages())


# ---------------------------------------------------------------------------
# attn.k_rep / attn.v_rep: the keys and values after the GQA repeat


@pytest.mark.parametrize("kernels", ["fused", "explicit"])
def test_k_rep_and_v_rep_are_the_repeated_k_rope_and_v(kernels):
    import mlx.core as mx

    from mlx_tinyllama.ops import Ops
    from mlx_tinyllama.taps import Taps

    lm = sources.load("synthetic:tiny", "float32")
    cfg = lm.config
    n_rep = cfg.num_attention_heads // cfg.num_key_value_heads
    assert n_rep > 1  # a real repeat, not the identity
    taps = Taps(tap_names(cfg.num_hidden_layers), "full")
    lm.model(mx.array(SEED_IDS), tap=taps, ops=Ops("hf", kernels))
    t = {n: np.array(v) for n, v in taps.tensors.items()}
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}.attn."
        assert t[p + "k_rep"].shape == (cfg.num_attention_heads, len(SEED_IDS), cfg.head_dim)
        assert np.array_equal(t[p + "k_rep"], np.repeat(t[p + "k_rope"], n_rep, axis=0))
        assert np.array_equal(t[p + "v_rep"], np.repeat(t[p + "v"], n_rep, axis=0))
        assert not np.array_equal(t[p + "k_rep"], np.tile(t[p + "k_rope"], (n_rep, 1, 1)))  # h // n_rep, not h % KV


def test_k_rep_and_v_rep_against_transformers(tiny_dir):
    """transformers' own repeat_kv (reference/hf.py) gives the same tensors, within the fp32 tolerance."""
    pytest.importorskip("torch")
    from mlx_tinyllama.compare import compare, run_side
    from mlx_tinyllama.reference.hf import capture, load_hf_model
    from mlx_tinyllama.refs.side import Side
    from mlx_tinyllama.tolerances import Tolerances

    lm = sources.load("synthetic:tiny", "float32")
    captured, _ = capture(load_hf_model(tiny_dir), SEED_IDS)
    hf = {n: captured[n].float().numpy() for n in captured if ".attn." in n}
    for i in range(lm.config.num_hidden_layers):
        p = f"layers.{i}.attn."
        assert np.array_equal(hf[p + "k_rep"], np.repeat(hf[p + "k_rope"], 2, axis=0))
        assert np.array_equal(hf[p + "v_rep"], np.repeat(hf[p + "v"], 2, axis=0))
    ref = Side("transformers", "full-tensors", dtype="float32", tensors=hf)
    result = compare(run_side(lm, SEED_IDS), [ref], Tolerances(), lm.config.as_dict(), len(SEED_IDS))
    rep = [s for s in result["stages"] if s["tap"].endswith(("k_rep", "v_rep"))]
    assert len(rep) == 2 * lm.config.num_hidden_layers and all(s["ok"] for s in rep)


def test_llamacpp_name_map_names_registry_stages():
    """refs/llamacpp.py keeps llama.cpp's graph names (a per-engine name map, beside the table):
    every stage it maps to is one of the registry's, layer stages to layer stages."""
    from mlx_tinyllama.refs import llamacpp as L

    layer = {s.name for s in stages.LAYER_STAGES}
    glob = {s.name for s in stages.GLOBAL_HEAD + stages.GLOBAL_TAIL}
    by_op = {st for ops in L.LLAMACPP_BY_OP.values() for st in ops.values()}
    twice = {st for pair in L.LLAMACPP_TWICE.values() for st in pair}
    assert set(L.LLAMACPP_STAGES.values()) | by_op | twice <= layer
    assert set(L.LLAMACPP_GLOBAL.values()) <= glob

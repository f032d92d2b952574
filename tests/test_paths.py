"""Prefill, token-by-token decode, chunked prefill and the compiled decode step compute the same numbers;
the paths check finds the stage where a faulty cache or decode-only RoPE breaks them."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from conftest import SEED_IDS

from mlx_tinyllama import paths, sources
from mlx_tinyllama.taps import tap_names
from mlx_tinyllama.metrics import metrics
from mlx_tinyllama.trace import main as trace

T = 38  # the seed prompt's length: chunks of 2 divide it, 5 and 7 do not


@pytest.fixture(scope="module")
def small32(small_dir):
    return sources.load(str(small_dir), "float32")


def nmse(a: mx.array, b: mx.array) -> float:
    return metrics(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32)))["nmse"]


@pytest.mark.parametrize("chunk", [1, 2, 5, 7])
def test_fp32_cached_logits_equal_prefill_at_every_position(small32, seed_ids, chunk):
    # small: 4 layers, 8 query heads, 2 KV heads (GQA)
    prefill = small32.model(mx.array(seed_ids))[0]
    cache = small32.model.make_cache()
    rows = [small32.model(mx.array(seed_ids[s:s + chunk]), cache=cache)[0] for s in range(0, T, chunk)]
    cached = mx.concatenate(rows, axis=0)
    assert cached.shape == prefill.shape
    for t in range(T):
        assert nmse(cached[t], prefill[t]) < 1e-10, f"position {t}"


def test_paths_agree_at_every_tap_fp32(small32, seed_ids):
    r = paths.check_paths(small32.model, seed_ids, chunks=(2, 5), continue_n=0, dtype="float32")
    assert r["first_divergence"] is None and r["agree"]
    assert [p["path"] for p in r["paths"]] == ["decode", "chunk-2", "chunk-5", "compiled"]
    assert [p["steps"] for p in r["paths"]] == [38, 19, 8, 38]
    for p in r["paths"]:
        assert p["logits_max_nmse"] < 1e-10
        assert p["worst_tap_nmse"] <= p["worst_tap_tolerance"]


def test_every_tap_of_every_step_is_recorded_with_step_shapes(small32, seed_ids):
    run = paths.run_path(small32.model, seed_ids[:6], 4)
    assert [(s.start, s.length) for s in run.steps] == [(0, 4), (4, 2)]
    assert list(run.steps[1].taps) == tap_names(4)
    assert run.tap(1, "layers.0.attn.q").shape == (8, 2, 32)  # [H, T, D] of that step
    assert run.tap(1, "layers.3.attn.probs").shape == (8, 2, 6)  # [H, T, S], S = offset + T
    assert run.tap(0, "logits").shape == (4, 32000)


def test_compiled_path_records_every_tap_through_the_compiled_step(small32, seed_ids):
    run = paths.run_compiled(small32.model, seed_ids[:6])
    assert [(s.start, s.length) for s in run.steps] == [(k, 1) for k in range(6)]
    assert list(run.steps[5].taps) == tap_names(4)
    assert run.tap(5, "layers.3.attn.probs").shape == (8, 1, 6)  # capacity 6, cut to the 6 visible keys
    assert run.tap(2, "layers.3.attn.probs").shape == (8, 1, 3)


def test_compiled_step_that_attends_to_unwritten_slots_is_caught(small32, seed_ids, monkeypatch):
    """Fault in the compiled path only: the fixed-capacity cache's mask dropped, so each step
    also attends to the zero keys of the slots not yet written. Caught at the first step's
    probs (position 0 sees 38 keys); the clean run (test above) is not flagged."""
    from mlx_tinyllama import decode

    fetch = decode.FixedKVCache.update_and_fetch

    def unmasked(self, keys, values):
        out = fetch(self, keys, values)
        self.mask = None
        return out

    monkeypatch.setattr(decode.FixedKVCache, "update_and_fetch", unmasked)
    r = paths.check_paths(small32.model, seed_ids, chunks=(), dtype="float32")
    assert where(r["first_divergence"]) == ("compiled", "layers.0.attn.probs", 0)
    assert [p["agree"] for p in r["paths"]] == [True, False]


def test_fp16_paths_agree_within_derived_tolerance(tiny_dir, seed_ids):
    lm = sources.load(str(tiny_dir), "float16")
    r = paths.check_paths(lm.model, seed_ids, chunks=(2, 5), continue_n=4, dtype="float16")
    assert r["agree"], r["first_divergence"]
    assert r["tolerance"]["layer_0"] == pytest.approx(4.77e-5, rel=0.01)  # derived: 10*(20*u16² + 620*u32²)


def test_row_errors_match_tolerances_metrics():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((5, 7)), rng.standard_normal((5, 7))
    expected = [metrics(a[i], b[i])["nmse"] for i in range(5)]
    assert paths.row_errors(a, b) == pytest.approx(expected, rel=1e-12)
    b[2, 3] = np.nan
    assert np.isinf(paths.row_errors(a, b)[2]) and np.isfinite(paths.row_errors(a, b)[1])


def test_greedy_continuation_cache_equals_recompute(small32, seed_ids):
    c = paths.greedy_continuation(small32.model, seed_ids, 10)
    assert c.first_mismatch is None and len(c.cached) == 10 and c.cached == c.recomputed
    assert c.logits_max_abs_diff < 1e-3


def where(first: dict) -> tuple:
    return first["path"], first["tap"], first["position"]


def test_dropping_cache_caught_at_scores_of_the_position(small32, seed_ids):
    r = paths.check_paths(small32.model, seed_ids, chunks=(), continue_n=4, dtype="float32", fault="drop-kv:9")
    assert where(r["first_divergence"]) == ("decode", "layers.0.attn.scores", 9)
    assert r["continuation"]["agree"] is False


def test_decode_only_rope_offset_caught_at_q_rope(small32, seed_ids):
    r = paths.check_paths(small32.model, seed_ids, chunks=(5,), dtype="float32", fault="rope-decode-offset")
    assert where(r["first_divergence"]) == ("decode", "layers.0.attn.q_rope", 1)
    chunk = r["paths"][1]["first_divergence"]
    assert (chunk["tap"], chunk["position"]) == ("layers.0.attn.q_rope", 5)  # first token of the 2nd chunk
    assert small32.model.ops.__class__.__name__ == "Ops"  # the fault was taken out again


def test_rope_offset_on_every_path_is_invisible_here(small32, seed_ids):
    # faults.py's rope-offset shifts every path alike; RoPE is relative, so the paths agree
    # (compare against transformers catches it instead). This documents the limit.
    r = paths.check_paths(small32.model, seed_ids, continue_n=0, dtype="float32", fault="rope-offset")
    assert r["agree"]


def test_command_json_and_exit_codes(tiny_dir, tmp_path):
    out = tmp_path / "p.json"
    rc = trace(["paths", "--model", str(tiny_dir), "--dtype", "float32", "--continue", "3", "--json", str(out)])
    r = json.loads(out.read_text())
    assert rc == 0 and r["first_divergence"] is None
    assert set(r["logits_max_abs_diff"]) == {"decode", "chunk-2", "chunk-3", "compiled"}  # 2 divides 38, 3 does not
    rc = trace(["paths", "--model", str(tiny_dir), "--dtype", "float32", "--continue", "0", "--fault", "drop-kv:3",
                "--json", str(out)])
    assert rc == 1 and json.loads(out.read_text())["first_divergence"]["position"] == 3


@pytest.mark.parametrize("argv", [["--chunk", "0"], ["--chunk", "38"], ["--continue", "-1"], ["--fault", "nope"],
                                  ["--fault", "drop-kv:x"], ["--fault", "drop-kv:37"], ["--tol", "nmse"],
                                  ["--json", "/nonexistent/dir/p.json"], ["--token-ids", "1,99999"]])
def test_bad_input_exits_2(tiny_dir, argv, capsys):
    assert trace(["paths", "--model", str(tiny_dir), "--continue", "0", *argv]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_report_argument_calls_report_module(tiny_dir, tmp_path, monkeypatch):
    import mlx_tinyllama.report as report

    calls = []
    monkeypatch.setattr(report, "paths_report", lambda *a, **options: calls.append(a))
    html = tmp_path / "r.html"
    fast = ["--dtype", "float32", "--chunk", "19", "--continue", "0"]
    assert trace(["paths", "--model", str(tiny_dir), *fast, "--report", str(html)]) == 0
    result, lm, html_path, plots = calls[0]
    assert "first_divergence" in result and html_path == str(html) and result["prompt"]["ids"] == SEED_IDS

"""The bench command: every JSON field present, positive, finite, and every
derived figure (tokens/s, ratios, bandwidth, shares) recomputed from the
measured numbers. No timing thresholds: speed targets live in docs/benchmarks.md."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import pytest

from mlx_tinyllama import bench, fast, sources
from mlx_tinyllama.synthetic import PRESETS
from mlx_tinyllama.taps import tap_names
from mlx_tinyllama.trace import main

from conftest import needs_torch

REPEATS, DECODE, TAP_DECODE, LENGTHS = 2, 4, 3, (8, 20)


def run_bench(tmp_path, *extra) -> dict:
    out = tmp_path / "bench.json"
    taps = [] if "--no-tap-overhead" in extra else ["--tap-decode-tokens", str(TAP_DECODE)]  # (refused unused)
    argv = ["bench", "--model", "synthetic:tiny", "--dtype", "float32", "--prompt-lengths",
            ",".join(map(str, LENGTHS)), "--decode-tokens", str(DECODE), "--decode-context", "6", *taps,
            "--repeats", str(REPEATS), "--warmup", "1", "--json", str(out), *extra]
    assert main(argv) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    return run_bench(tmp_path_factory.mktemp("bench"), "--peak-bandwidth", "50")


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def check_summary(s: dict, work: int) -> None:
    assert len(s["samples_s"]) == REPEATS and all(positive(t) for t in s["samples_s"])
    assert s["min_s"] == min(s["samples_s"]) and s["max_s"] == max(s["samples_s"])
    assert s["min_s"] <= s["median_s"] <= s["max_s"]
    assert s["spread"] == pytest.approx((s["max_s"] - s["min_s"]) / s["median_s"])
    assert s["tokens_per_s"] == pytest.approx(work / s["median_s"])
    assert s["ms_per_token"] == pytest.approx(1e3 * s["median_s"] / work)


def test_header_device_and_model(result):
    cfg = PRESETS["tiny"]
    assert result["format"] == bench.FORMAT and result["dtype"] == "float32"
    assert result["device"] == result["hardware"]["description"] and result["command"] == "bench"
    d = result["hardware"]
    assert d["backend"] in ("cpu", "metal", "cuda") and d["description"] and d["name"]
    assert d["peak_bandwidth_gbs"] == 50 and d["peak_bandwidth_source"] == "--peak-bandwidth"
    if d["backend"] == "cpu":
        assert d["blas"]
    assert result["model"]["config"] == cfg.as_dict()
    m = result["weights"]
    assert m["parameters"] == cfg.num_parameters()
    assert m["total_bytes"] == 4 * cfg.num_parameters()  # float32
    # decode reads every weight but only one embedding row
    assert m["per_decode_token_bytes"] == m["total_bytes"] - 4 * cfg.vocab_size * cfg.hidden_size + 4 * cfg.hidden_size
    assert result["settings"]["prompt_lengths"] == list(LENGTHS)


def test_prefill_rows(result):
    assert [r["tokens"] for r in result["prefill"]] == list(LENGTHS)
    for row in result["prefill"]:
        assert set(row["engines"]) == {"ours", "mlx_lm"}
        for e in row["engines"].values():
            check_summary(e, row["tokens"])
            assert positive(e["peak_memory_bytes"])
        speed = {n: e["tokens_per_s"] for n, e in row["engines"].items()}
        assert row["ratio_ours_over_mlx_lm"] == pytest.approx(speed["ours"] / speed["mlx_lm"])


def test_decode(result):
    dec = result["decode"]
    assert dec["tokens"] == DECODE and dec["context"] == 6
    per_token = result["weights"]["per_decode_token_bytes"]
    for e in dec["engines"].values():
        check_summary(e, DECODE)
        assert e["achieved_weight_gbs"] == pytest.approx(per_token * e["tokens_per_s"] / 1e9)
        assert e["fraction_of_peak"] == pytest.approx(e["achieved_weight_gbs"] / 50)
        assert positive(e["peak_memory_bytes"])
    assert list(dec["engines"]) == ["ours", "ours_compiled", "mlx_lm"]
    ours, ref = dec["engines"]["ours"]["tokens_per_s"], dec["engines"]["mlx_lm"]["tokens_per_s"]
    assert dec["ratio_ours_over_mlx_lm"] == pytest.approx(ours / ref)
    compiled = dec["engines"]["ours_compiled"]["tokens_per_s"]
    assert dec["ratio_ours_compiled_over_mlx_lm"] == pytest.approx(compiled / ref)
    # same weights, same model, fp32: mlx-lm and the compiled step pick the same greedy tokens
    assert dec["greedy_tokens_agree"] == {"ours_compiled": 1.0, "mlx_lm": 1.0}


def test_tap_overhead(result):
    to = result["tap_overhead"]
    assert to["stats_taps"] == len(tap_names(PRESETS["tiny"].num_hidden_layers))
    assert to["prefill_tokens"] == LENGTHS[0]
    assert to["decode_tokens"] == TAP_DECODE
    for phase, work in (("prefill", LENGTHS[0]), ("decode", TAP_DECODE)):
        modes = to[phase]["modes"]
        assert set(modes) == {"off", "stats_all", "full_layer"}
        for s in modes.values():
            check_summary(s, work)
        for mode, r in to[phase]["ratios"].items():
            assert r == pytest.approx(modes[mode]["median_s"] / modes["off"]["median_s"])


def test_stages(result):
    st = result["stages"]
    assert st["method"]
    for phase, tokens in (("prefill", LENGTHS[0]), ("decode", 1)):
        p = st[phase]
        assert p["tokens"] == tokens
        assert tuple(p["kinds"]) == bench.STAGE_KINDS
        assert all(positive(k["seconds"]) for k in p["kinds"].values())
        assert sum(k["share_of_parts"] for k in p["kinds"].values()) == pytest.approx(1.0)
        assert p["sum_of_parts_s"] == pytest.approx(sum(k["seconds"] for k in p["kinds"].values()))
        assert p["coverage"] == pytest.approx(p["sum_of_parts_s"] / p["whole_forward_s"])


@needs_torch
def test_with_transformers(tmp_path):
    r = run_bench(tmp_path, "--with-transformers", "--no-tap-overhead", "--no-stages")
    assert "torch" in r["transformers"]["device"]
    assert "tap_overhead" not in r and "stages" not in r
    for row in r["prefill"] + [r["decode"]]:
        t = row["engines"]["transformers"]
        check_summary(t, row["tokens"])
        assert row["ratio_ours_over_transformers"] == pytest.approx(
            row["engines"]["ours"]["tokens_per_s"] / t["tokens_per_s"])
    assert r["decode"]["greedy_tokens_agree"]["transformers"] == 1.0


def test_vs_dtype_times_a_second_copy_of_ours_in_the_same_run(tmp_path):
    r = run_bench(tmp_path, "--vs-dtype", "float16", "--no-mlx-lm", "--no-tap-overhead", "--no-stages")
    for row in r["prefill"] + [r["decode"]]:
        half = row["engines"]["ours_float16"]
        check_summary(half, row["tokens"])
        assert row["ratio_ours_over_ours_float16"] == pytest.approx(
            row["engines"]["ours"]["tokens_per_s"] / half["tokens_per_s"])
    assert list(r["decode"]["engines"]) == ["ours", "ours_compiled", "ours_float16"]
    assert r["settings"]["vs_dtype"] == "float16"


@pytest.mark.parametrize("args, message", [
    (["--prompt-lengths", "8,4096"], "beyond the model's context"),
    (["--decode-tokens", "0"], "--decode-tokens must be at least 1"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--prompt-lengths", "8,x"], "comma-separated integers"),
    (["--decode-context", "2000", "--decode-tokens", "100"], "beyond the model's context"),
    (["--tap-layer", "9"], "not a layer"),
    (["--tap-decode-tokens", "0"], "--tap-decode-tokens must be at least 1"),
])
def test_bad_input_exits_2(tmp_path, capsys, args, message):
    out = tmp_path / "never.json"
    assert main(["bench", "--model", "synthetic:tiny", "--dtype", "float32", "--json", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not out.exists()


def test_metal_capture_needs_metal(tmp_path, capsys, monkeypatch):
    """Off a Mac: a clear message. On a Mac: the path must be a new .gputrace."""
    metal = mx.metal.is_available()
    monkeypatch.setenv("MTL_CAPTURE_ENABLED", "1")
    path = tmp_path / ("trace.txt" if metal else "trace.gputrace")
    assert main(["bench", "--model", "synthetic:tiny", "--metal-capture", str(path)]) == 2
    err = capsys.readouterr().err
    assert (".gputrace" if metal else "needs MLX's Metal backend") in err
    assert not path.exists()


def test_peak_table_matches_whole_words_longest_first():
    assert bench.lookup_peak("Apple M2 Max")[0] == bench.PEAK_BANDWIDTH_GBS["m2 max"][0]
    assert bench.lookup_peak("Apple M2")[0] == bench.PEAK_BANDWIDTH_GBS["m2"][0]
    assert bench.lookup_peak("NVIDIA H200")[0] == bench.PEAK_BANDWIDTH_GBS["h200"][0]
    assert bench.lookup_peak("AMD EPYC") == (None, None)
    assert bench.lookup_peak("Apple M12") == (None, None)  # no partial-word match


def test_pipelined_decode_matches_synced_and_full_recompute(tiny_dir):
    """async_eval pipelining changes when the host waits, not what is computed:
    the greedy ids equal the naive loop's and a cache-free recompute's."""
    lm = sources.load(str(tiny_dir), "float32")
    step = fast.model_step(lm.model)
    prompt = bench.synthetic_ids(5, lm.config.vocab_size, 0)
    runs = []
    for decode in (fast.greedy_decode, fast.synced_decode):
        cache = lm.model.make_cache()
        first = fast.next_token(fast.prefill(step, prompt, cache))
        runs.append([first.item()] + decode(step, cache, first, 6))
    assert runs[0] == runs[1]
    ids = prompt.tolist()[0]
    for _ in range(7):  # no cache: the whole sequence each time
        ids.append(int(mx.argmax(lm.model(mx.array(ids))[0, -1]).item()))
    assert runs[0] == ids[5:]


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_compiled_silu_and_swiglu_are_the_explicit_arithmetic(dtype):
    """The fused path's compiled SiLU saves launches, not digits: bit-identical to x * sigmoid(x)."""
    from mlx_tinyllama.ops import Ops

    x = (mx.random.normal((64, 173)) * 4).astype(dtype)
    up = (mx.random.normal((64, 173)) * 4).astype(dtype)
    fused, explicit = Ops("hf", "fused"), Ops("hf", "explicit")
    assert mx.array_equal(fused.silu(x), explicit.silu(x)).item()
    one_kernel, two_steps = fused.swiglu(x, up), explicit.swiglu(x, up)
    assert one_kernel.dtype == two_steps.dtype and mx.array_equal(one_kernel, two_steps).item()


def test_the_cuda_graph_batch_size_is_recorded(monkeypatch):
    """MLX_MAX_OPS_PER_BUFFER moves GPU timings (docs/benchmarks.md): bench's JSON says whether it was set."""
    from mlx_tinyllama.bench.devices import device_report

    monkeypatch.delenv("MLX_MAX_OPS_PER_BUFFER", raising=False)
    assert device_report(None)["mlx_max_ops_per_buffer"] is None
    monkeypatch.setenv("MLX_MAX_OPS_PER_BUFFER", "50")
    assert device_report(None)["mlx_max_ops_per_buffer"] == "50"


# --- the family table (scripts/family_bench_table.py) ------------------------------------------


def _table_script():
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("family_bench_table", REPO / "scripts" / "family_bench_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(ours: list[float], compiled: list[float], mlx_lm: list[float], preset="qwen2.5-0.5b", backend="cpu"):
    def engines(**e):
        return {"engines": {n: {"samples_s": s} for n, s in e.items()}}

    return {"model": {"spec": f"synthetic:{preset}", "details": {"preset": preset}}, "dtype": "float32",
            "date": "2026-12-08T01:02:03+00:00",
            "hardware": {"backend": backend, "name": "NVIDIA H100 80GB HBM3" if backend == "cuda" else "cpu"},
            "prefill": [{"tokens": 38, **engines(ours=ours, mlx_lm=mlx_lm)}],
            "decode": {**engines(ours=ours, ours_compiled=compiled, mlx_lm=mlx_lm),
                       "greedy_tokens_agree": {"mlx_lm": 1.0}}}


def test_family_table_pairs_the_alternated_samples():
    """The ratio is the median of t_mlx_lm[i] / t_ours[i] (samples taken back to back), not the ratio of
    the medians: a machine that slowed down for samples 1-2 moves both engines alike."""
    t = _table_script()
    ours = [1.0, 3.0, 3.0, 1.0, 1.0]
    mlx = [1.1, 3.3, 3.3, 1.1, 1.1]  # always 1.1x ours's time, in the same slow and fast phases
    assert t.paired({"engines": {"ours": {"samples_s": ours}, "mlx_lm": {"samples_s": mlx}}}, "ours") == \
        pytest.approx((1.1, 1.1, 1.1))
    skewed = [1.0, 1.0, 3.0, 3.0, 3.0]  # medians 1.0 vs 3.0 would say 3x; pairs say otherwise
    med, lo, hi = t.paired({"engines": {"ours": {"samples_s": skewed}, "mlx_lm": {"samples_s": mlx}}}, "ours")
    assert med == pytest.approx(1.1) and lo == pytest.approx(1.1 / 3) and hi == pytest.approx(3.3)


def test_family_table_marks_slow_rows_and_only_those():
    t = _table_script()
    slow = _run(ours=[1.0] * 3, compiled=[1.0] * 3, mlx_lm=[0.8] * 3)  # mlx-lm 1.25x faster
    fine = _run(ours=[1.0] * 3, compiled=[1.0] * 3, mlx_lm=[0.9] * 3, preset="mistral-7b", backend="cuda")
    lines = t.table([slow, fine])
    assert lines[0].startswith("| preset | device | run (UTC) | dtype | prefill 38 | decode eager | decode compiled")
    assert lines[2] == "| `qwen2.5-0.5b` | CPU | 12-08 01:02 | float32 | 0.80 [0.80-0.80] slow | " \
                       "0.80 [0.80-0.80] slow | 0.80 [0.80-0.80] slow | 1.00 |"
    assert "slow" not in lines[3] and lines[3].startswith("| `mistral-7b` | H100 80GB HBM3 |")


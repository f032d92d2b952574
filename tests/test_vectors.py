"""Kernel conformance vectors: the project's MLX ops (both kernel paths) pass every quick case
at fp32, fp16 and bf16; an independent NumPy engine passes clean and, given one kernel fault at
a time, is named with the op, the first failing shape and the fault's pattern."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest

import numpy_kernels as nk
from mlx_tinyllama.tolerances import kernel_nmse_budget, unit_roundoff
from mlx_tinyllama.trace import main as trace
from mlx_tinyllama.vectors import cases as case_list
from mlx_tinyllama.vectors import engine as mlx_engine
from mlx_tinyllama.vectors import patterns
from mlx_tinyllama.vectors.check import check, check_case
from mlx_tinyllama.vectors.runner import run_engine
from mlx_tinyllama.vectors.store import Vectors, to_numpy
from mlx_tinyllama.vectors.write import write_vectors

MODEL = "synthetic:small"  # 256 hidden, 688 intermediate, 8 heads, 2 KV heads, 32000 vocabulary
DTYPES = ("float32", "float16", "bfloat16")
NUMPY_ENGINE = str(nk.__file__)


@pytest.fixture(scope="module")
def vector_dirs(tmp_path_factory, small_dir) -> dict[str, Vectors]:
    root = tmp_path_factory.mktemp("vectors")
    out = {}
    for dtype in DTYPES:
        write_vectors(root / dtype, MODEL, dtype, quick=True)
        out[dtype] = Vectors(root / dtype)
    return out


def _check(vectors: Vectors, engine, ops=None, names=None) -> dict:
    results, skipped = run_engine(vectors, engine, ops, names)
    assert not skipped
    return check(vectors, {k: to_numpy(v) for k, v in results.items()}, ops, names)


def _op(result: dict, op: str) -> dict:
    return next(s for s in result["ops"] if s["op"] == op)


def _case(result: dict, name: str) -> dict:
    return next(c for c in result["cases"] if c["name"] == name)


def _failing_ops(result: dict) -> set[str]:
    return {s["op"] for s in result["ops"] if not s["pass"]}


# --- the project's own ops and the clean NumPy engine pass ------------------------------------


@pytest.mark.parametrize("kernels", ["fused", "explicit"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_project_ops_pass_every_quick_case(vector_dirs, dtype, kernels):
    vectors = vector_dirs[dtype]
    result = _check(vectors, getattr(mlx_engine, kernels))
    assert {s["op"] for s in result["ops"]} == set(case_list.SEMANTICS)  # every op family is exercised
    assert result["pass"], [(c["name"], c["nmse"], c["tolerance"]) for c in result["cases"] if not c["pass"]]
    assert len(result["cases"]) == len(vectors.cases)


@pytest.mark.parametrize("dtype", DTYPES)
def test_clean_numpy_engine_is_not_flagged(vector_dirs, dtype):
    result = _check(vector_dirs[dtype], nk.clean)
    assert result["pass"], [(c["name"], c["pattern"], c["ratio"]) for c in result["cases"] if not c["pass"]]


# --- each injected fault is named: op, first failing shape, pattern ------------------------------


def test_matmul_dropping_the_last_partial_tile(vector_dirs):
    result = _check(vector_dirs["float16"], nk.drop_partial_tile)
    assert _failing_ops(result) == {"matmul"}
    s = _op(result, "matmul")
    # Tiles of 16 rows: M < 16 is one partial tile (all zero); M = 16, 32, 64 are whole tiles.
    # The names are compare's (errorshape): the rows past the last whole tile are the last partial tile.
    assert (s["first_failing"], s["pattern"]) == ("matmul.q_proj.M1", "rows_zero_from:0")
    assert "M=1 " in s["first_failing_shape"] and s["detail"] == "every token row (1 of 1) is zero"
    assert _case(result, "matmul.q_proj.M33")["detail"] == "token rows 0-31 match, row 32 is zero"
    for proj in ("q_proj", "k_proj", "gate_proj", "down_proj"):
        assert _case(result, f"matmul.{proj}.M17")["pattern"] == "last_partial_tile:16"
        assert _case(result, f"matmul.{proj}.M33")["pattern"] == "last_partial_tile:32"
        assert _case(result, f"matmul.{proj}.M39")["pattern"] == "last_partial_tile:32"
        assert _case(result, f"matmul.{proj}.M39")["detail"] == "token rows 0-31 match, rows 32-38 are zero"
        assert all(_case(result, f"matmul.{proj}.M{m}")["pass"] for m in (16, 32, 64))


def test_matmul_zeroing_rows_from_32(vector_dirs):
    """The seed's symptom: correct for the first 32 tokens, zero after."""
    result = _check(vector_dirs["float16"], nk.zero_rows_from_32)
    assert _failing_ops(result) == {"matmul"}
    s = _op(result, "matmul")
    # M = 33 and 39 read as the last partial tile (rows 32.. of a 32-row tile); M = 64 cannot: there
    # the first 32 rows alone are computed, which is what tells this fault from a dropped remainder.
    assert (s["first_failing"], s["pattern"], s["patterns"]) == ("matmul.q_proj.M33", "last_partial_tile:32",
                                                               ["last_partial_tile:32", "rows_zero_from:32"])
    assert _case(result, "matmul.q_proj.M64")["pattern"] == "rows_zero_from:32"
    assert "computes only the first 32 rows" in _case(result, "matmul.q_proj.M64")["explanation"]["cause"]
    assert "M=33 K=256 N=256" in s["first_failing_shape"]
    assert all(c["pass"] for c in result["cases"] if c["op"] == "matmul" and int(c["name"].split(".M")[1]) <= 32)


def test_matmul_accumulating_in_fp16(vector_dirs):
    # NumPy's fp16 loop is slow: M = 1 and 33 of every projection (K = 256 and 688)
    result = _check(vector_dirs["float16"], nk.fp16_accumulation, ["matmul"], ["matmul.*.M1", "matmul.*.M33"])
    s = _op(result, "matmul")
    assert not s["pass"] and s["pattern"] == "accumulation_precision" and s["patterns"] == ["accumulation_precision"]
    assert s["first_failing_shape"].startswith("q_proj M=")
    # the error grows with K: down_proj (K = 688) is further out than the K = 256 projections
    ratios = {c["name"]: c["ratio"] for c in result["cases"]}
    assert ratios["matmul.down_proj.M33"] > 2 * ratios["matmul.q_proj.M33"]


def test_softmax_without_max_subtraction(vector_dirs):
    result = _check(vector_dirs["float16"], nk.softmax_no_max)
    assert _failing_ops(result) == {"softmax"}  # SDPA's scores stay below exp's overflow
    s = _op(result, "softmax")
    assert (s["first_failing"], s["pattern"]) == ("softmax.T38.S38.shift1000", "overflow_nonfinite")
    assert "row maxima + 1000" in s["first_failing_shape"]
    assert _case(result, "softmax.T1.S2048.large")["pattern"] == "overflow_nonfinite"
    assert all(_case(result, n)["pass"] for n in ("softmax.T38.S38", "softmax.T1.S39", "softmax.T1.S2048"))


def test_rope_offset_by_one(vector_dirs):
    result = _check(vector_dirs["float16"], nk.rope_offset_by_one)
    assert _failing_ops(result) == {"rope"}
    s = _op(result, "rope")
    assert (s["first_failing"], s["pattern"], s["failed"]) == ("rope.q.offset0.T38", "wrong_offset", s["cases"])
    assert "start at 1, not 0" in s["detail"]
    assert "start at 2048, not 2047" in _case(result, "rope.q.offset2047.T1")["detail"]


def test_decode_mask_at_the_wrong_position(vector_dirs):
    result = _check(vector_dirs["float16"], nk.decode_mask_at_zero)
    assert _failing_ops(result) == {"scores", "sdpa"}
    for op in ("scores", "sdpa"):
        s = _op(result, op)
        # S = 1 has a single key (nothing to mask); prefill and the chunk of 7 use the right mask
        assert (s["first_failing"], s["pattern"]) == (f"{op}.T1.S39", "wrong_offset")
        assert "position 0, not 38" in s["detail"] and "T=1 S=39" in s["first_failing_shape"]
        assert _case(result, f"{op}.T1.S2048")["pattern"] == "wrong_offset"
        assert all(_case(result, f"{op}.{shape}")["pass"] for shape in ("T38.S38", "T1.S1", "T7.S38"))


def test_missing_mask(vector_dirs):
    result = _check(vector_dirs["float16"], nk.no_mask)
    assert _failing_ops(result) == {"scores", "sdpa"}
    for op in ("scores", "sdpa"):
        assert (_op(result, op)["first_failing"], _op(result, op)["pattern"]) == (f"{op}.T38.S38", "mask_missing")
        assert _case(result, f"{op}.T1.S2048")["pass"]  # decode has nothing to mask


# --- the patterns themselves, on constructed outputs ------------------------------------------


@pytest.fixture
def golden_2d() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((40, 64))


BUDGET = 1e-6


def _name(a, b, alternatives=(), op="matmul") -> tuple[str, str]:
    found = patterns.classify(a, b, BUDGET, list(alternatives), op)
    return patterns.label(found), found.words


def test_pattern_zero_columns(golden_2d):
    a = golden_2d.copy()
    a[:, 48:] = 0.0
    assert _name(a, golden_2d) == ("columns_from:48", "columns 0-47 match, columns 48-63 are zero")


def test_pattern_zero_rows_needs_the_rows_before_to_be_right(golden_2d):
    a = golden_2d.copy()
    a[32:] = 0.0
    assert _name(a, golden_2d) == ("last_partial_tile:32", "token rows 0-31 match, rows 32-39 are zero")
    a[3] += 1.0  # a wrong row before the zero tail: not a clean tile edge (and no small values flushed)
    assert _name(a, golden_2d)[0] == "unclassified"


def test_pattern_rows_repeated(golden_2d):
    a = golden_2d.copy()
    a[20:] = a[19]  # a stuck row index
    assert _name(a, golden_2d) == ("rows_stale_from:20", "token rows 0-19 match, rows 20-39 are copies of rows 19")


def test_stale_rows_that_are_not_a_tail():
    """A row index that does not advance in the middle of the output (rows 5 and 9 recomputed as
    rows 4 and 8), on an RMSNorm output: the copies are named, not a boundary."""
    b = np.random.default_rng(5).standard_normal((12, 64))
    a = b.copy()
    a[5], a[9] = a[4], a[8]
    assert _name(a, b, op="rms_norm") == ("rows_stale", "token rows 5, 9 of 12 differ and are copies of rows 4, 8")


def test_rows_repeated_ignores_rows_the_golden_output_repeats_too(golden_2d):
    b = golden_2d.copy()
    b[30] = b[10]  # a repeated token gives equal golden rows
    a = b.copy()
    a[25:] = np.random.default_rng(1).standard_normal((15, 64))
    a[30] = a[10]  # equal to its own golden row: right, not a copy
    found = patterns.classify(a, b, BUDGET, [], "matmul")
    assert found.name == "rows_mostly_wrong_from" and found.evidence["first_wrong_row"] == 25, found.words


def test_pattern_garbage_tail_within_a_row():
    b = np.random.default_rng(2).standard_normal((1, 512))
    a = b.copy()
    a[0, 300:] = np.random.default_rng(3).standard_normal(212) * 5
    label, words = _name(a, b)
    assert label == "columns_from:300" and words.startswith("columns 0-299 match"), words


def test_pattern_transposed_square(golden_2d):
    b = golden_2d[:32, :32]
    assert _name(b.T.copy(), b)[0] == "transposed"


def test_pattern_underflow_zero():
    b = np.ones((4, 64))
    b[:, 1::2] = 1e-2  # small values between large ones: flushed to zero, not a tile edge
    a = np.where(b < 0.05, 0.0, b)
    assert _name(a, b) == ("underflow_zero", "128 values are 0 where the reference is not (the largest 0.01)")


def test_zero_rows_of_large_values_are_not_underflow(golden_2d):
    a = golden_2d.copy()
    a[1::3] = 0.0  # every third row zero: large values, a row stride
    assert _name(a, golden_2d)[0] == "periodic_rows"


def test_pattern_nonfinite_comes_first(golden_2d):
    a = golden_2d.copy()
    a[32:] = 0.0
    a[5, 7] = np.inf
    assert _name(a, golden_2d) == ("overflow_nonfinite", "1 NaN/Inf values where the reference is finite "
                                                         "(in token rows 5 of 40; the first at [5, 7])")


def test_pattern_hypotheses_name_their_cause(golden_2d):
    alt = golden_2d * 0.5
    found = patterns.classify(alt, golden_2d, BUDGET, [patterns.alternative("wrong_offset", "x", alt)], "rope")
    assert (found.name, found.words) == ("wrong_offset", "x") and "offset" in found.cause
    # without the hypothesis the same output is the reference times a constant (compare's `scaled`)
    assert _name(alt, golden_2d)[0] == "scaled"


def test_unrelated_output_is_unclassified(golden_2d):
    a = np.random.default_rng(4).standard_normal(golden_2d.shape)
    assert _name(a, golden_2d)[0] == "unclassified"


def _dense_small():
    return patterns.Pattern("dense_small", "d", "c", "s", {"nmse": 1e-6})


def test_small_dense_error_is_accumulation_only_when_it_grows_with_n():
    grows = patterns.resolve(_dense_small(), [(256, 1e-6), (688, 2.7e-6), (256, 1.1e-6)], "matmul")
    assert grows.name == "accumulation_precision" and "float32" in grows.next_step
    flat = patterns.resolve(_dense_small(), [(256, 1e-6), (688, 1e-6)], "matmul")
    assert flat.name == "dense_small" and "not growing" in flat.words
    one = patterns.resolve(_dense_small(), [(256, 1e-6), (256, 2e-6)], "matmul")
    assert one.name == "dense_small" and "one reduction length only" in one.words
    other = patterns.Pattern("rows_zero_from", "w", "c", "s", {"first_wrong_row": 32})
    assert patterns.resolve(other, [], "matmul") is other


def test_transposed_result_shape_is_a_failure_not_bad_input(vector_dirs):
    vectors = vector_dirs["float32"]
    results, _ = run_engine(vectors, nk.clean, ["sdpa"])
    case = next(c for c in vectors.cases if c["name"] == "sdpa.T38.S38")
    row = check_case(vectors, case, np.array(results[case["output"]]).transpose(1, 0, 2))  # [T, H, D]
    assert (row["pass"], row["pattern"]) == (False, "transposed")


# --- the tolerance rule: correct fp16 kernels inside, fp16 accumulation outside ------------------


@pytest.mark.parametrize("K", [2048, 5632])
def test_kernel_budget_separates_fp16_accumulation_from_fp32(K):
    rng = np.random.default_rng(K)
    x = (rng.standard_normal((4, K))).astype(np.float16)
    w = (rng.standard_normal((16, K)) / math.sqrt(K)).astype(np.float16)
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    fp32_acc = (x.astype(np.float32) @ w.astype(np.float32).T).astype(np.float16)
    fp16_acc = nk.fp16_accumulation("matmul", {"x": x, "w": w}, {"dtype": "float16"})

    def nmse(a):
        return float(np.sum((a.astype(np.float64) - exact) ** 2) / np.sum(exact ** 2))

    budget = kernel_nmse_budget("float16", K)
    assert nmse(fp32_acc) < 0.1 * budget  # one rounding of the output: ~u^2/3
    assert nmse(fp16_acc) > 3 * budget
    assert nmse(fp32_acc) < unit_roundoff("float16") ** 2


# --- what `write` stores ---------------------------------------------------------------------------


def test_manifest_describes_every_case_and_inputs_are_the_models_weights(vector_dirs, small_dir):
    model = mx.load(str(small_dir / "model.safetensors"))
    for dtype, vectors in vector_dirs.items():
        manifest = vectors.manifest
        assert manifest["dtype"] == dtype and manifest["quick"] is True
        stored = {}
        for name in {c["file"] for c in vectors.cases}:
            stored.update(mx.load(str(vectors.dir / name)))
        for case in vectors.cases:
            assert set(case) >= {"op", "semantics", "shapes", "dtype", "params", "inputs", "output", "tolerance"}
            assert "\n" not in case["semantics"] and case["semantics"] == case_list.SEMANTICS[case["op"]]
            tol = case["tolerance"]
            assert tol["nmse"] == kernel_nmse_budget(dtype, tol["n"], tol["kappa"])
            assert stored[case["output"]].dtype == mx.float32  # golden outputs in float32
            for role, key in case["inputs"].items():
                want = mx.int32 if role == "ids" else getattr(mx, dtype)
                assert stored[key].dtype == want and list(stored[key].shape) == case["shapes"][role]
        weight = model["model.layers.0.self_attn.q_proj.weight"].astype(getattr(mx, dtype))
        assert mx.array_equal(stored["matmul.q_proj.w"], weight)
        assert mx.array_equal(stored["embedding.table"], model["model.embed_tokens.weight"].astype(getattr(mx, dtype)))
        edges = next(c for c in vectors.cases if c["name"] == "embedding.edges")
        assert stored[edges["inputs"]["ids"]].tolist() == [0, 1, 2, 31999]


def test_full_case_list_covers_every_real_shape(tiny_dir):
    from mlx_tinyllama.vectors.inputs import activations, load_weights

    w = load_weights(str(tiny_dir))
    act = activations(w, case_list.positions_needed(), case_list.mlp_rows(False))
    built = case_list.build(w, act, False, -65504.0)
    cfg = w.config
    real = {tuple(reversed(shape)) for name, shape in cfg.weight_shapes().items()
            if name.startswith("model.layers.0.") and len(shape) == 2} | {(cfg.hidden_size, cfg.vocab_size)}
    matmul = [c for c in built if c.op == "matmul"]
    assert {(c.params["K"], c.params["N"]) for c in matmul} == real  # every real (K, N) pair
    for K, N in real:
        assert sorted(c.params["M"] for c in matmul if (c.params["K"], c.params["N"]) == (K, N)) == \
            sorted(case_list.M_VALUES)
    assert sorted((c.params["offset"]) for c in built if c.op == "rope") == [0, 1, 31, 37, 38, 255, 2047]
    decode = sorted(c.params["S"] for c in built if c.op == "sdpa" and c.params["T"] == 1)
    assert decode == sorted(case_list.DECODE_S) and max(decode) == 2048
    assert any(c.op == "sdpa" and c.params["T"] == 38 for c in built)
    large = next(c for c in built if c.name == "rms_norm.large")
    assert np.abs(large.inputs["x"][1]).max(axis=1).tolist() == pytest.approx(list(case_list.LARGE_ABSMAX))
    quick = {c.name for c in case_list.build(w, act, True, -65504.0)}
    assert quick < {c.name for c in built}


def test_rewriting_a_vectors_directory_replaces_it_atomically(tmp_path, tiny_dir):
    target = tmp_path / "v"
    write_vectors(target, str(tiny_dir), "float32", quick=True)
    first = (target / "manifest.json").read_text()
    write_vectors(target, str(tiny_dir), "float32", quick=True)
    assert (target / "manifest.json").read_text() == first  # deterministic
    assert sorted(p.name for p in target.iterdir()) == sorted(
        ["manifest.json"] + [f"{fam}.safetensors" for fam in case_list.FAMILIES])  # no temporary files left


# --- the command line ------------------------------------------------------------------------------


def _run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = trace(["vectors", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_run_and_check_exit_codes_json_and_report(vector_dirs, tmp_path, capsys):
    d = vector_dirs["float16"].dir
    clean, faulty = tmp_path / "clean.safetensors", tmp_path / "faulty.safetensors"
    assert _run_cli(capsys, "run", d, "--engine", f"{NUMPY_ENGINE}:clean", "--out", clean)[0] == 0
    assert _run_cli(capsys, "check", d, "--results", clean)[0] == 0
    assert _run_cli(capsys, "run", d, "--engine", f"{NUMPY_ENGINE}:zero_rows_from_32", "--out", faulty)[0] == 0
    rc, out, _ = _run_cli(capsys, "check", d, "--results", faulty, "--json", tmp_path / "r.json",
                          "--report", tmp_path / "r.html")
    assert rc == 1
    assert "matmul at q_proj M=33 K=256 N=256: last_partial_tile:32" in out
    data = json.loads((tmp_path / "r.json").read_text())
    matmul = next(s for s in data["ops"] if s["op"] == "matmul")
    assert (data["pass"], matmul["pattern"], matmul["first_failing"]) == (False, "last_partial_tile:32",
                                                                         "matmul.q_proj.M33")
    # the same object compare gives a diverging stage (`first_divergence.pattern`)
    assert set(matmul["explanation"]) == {"name", "words", "cause", "next_step", "evidence"}
    assert matmul["explanation"]["name"] == "last_partial_tile" and matmul["explanation"]["evidence"]["tile"] == 32
    html = (tmp_path / "r.html").read_text()
    assert "last_partial_tile:32" in html and "some ops fail" in html
    assert "check the M (row) loop and its remainder of the q_proj matmul at M = 33" in html
    rc, out, _ = _run_cli(capsys, "check", d, "--results", faulty, "--ops", "rope,sdpa")
    assert rc == 0 and "matmul" not in out.split("per op")[1].split("all ops pass")[0]


def test_cli_run_with_the_projects_engine(vector_dirs, tmp_path, capsys):
    d = vector_dirs["bfloat16"].dir
    out = tmp_path / "mlx.safetensors"
    assert _run_cli(capsys, "run", d, "--engine", "mlx_tinyllama.vectors.engine:explicit", "--out", out,
                    "--ops", "rms_norm,rope")[0] == 0
    assert set(mx.load(str(out))) == {c["output"] for c in vector_dirs["bfloat16"].cases if c["op"] in ("rms_norm", "rope")}
    assert _run_cli(capsys, "check", d, "--results", out, "--ops", "rms_norm,rope")[0] == 0


def _bad_inputs(vectors: Vectors, tmp_path):
    d = vectors.dir
    results, _ = run_engine(vectors, nk.clean, ["add"])
    keys = list(results)
    renamed = tmp_path / "renamed.safetensors"
    mx.save_safetensors(str(renamed), {k.replace(".y", ".out"): v for k, v in results.items()})
    wrong_shape = tmp_path / "shape.safetensors"
    mx.save_safetensors(str(wrong_shape), dict(results, **{keys[0]: results[keys[0]][:, :5]}))
    text = tmp_path / "notes.txt"
    text.write_text("not tensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    full = tmp_path / "full"
    full.mkdir()
    (full / "something.txt").write_text("x")
    broken, other = tmp_path / "broken", tmp_path / "other"
    for directory, content in ((broken, "{"), (other, json.dumps({"format": "something else"}))):
        directory.mkdir()
        (directory / "manifest.json").write_text(content)
    return {
        "manifest not JSON": (["check", broken, "--results", renamed], "not valid JSON"),
        "not a vectors manifest": (["check", other, "--results", renamed], "not a vectors manifest"),
        "missing manifest": (["check", empty, "--results", renamed], "has no manifest.json"),
        "wrong keys": (["check", d, "--results", renamed, "--ops", "add"], "results lack 2 of the 2 outputs"),
        "shape mismatch": (["check", d, "--results", wrong_shape, "--ops", "add"], "has shape"),
        "not safetensors": (["check", d, "--results", text], "cannot read"),
        "results over the manifest": (["run", d, "--engine", f"{NUMPY_ENGINE}:clean", "--out", d / "manifest.json"],
                                      "is an input of this run"),
        "json over the results": (["check", d, "--results", renamed, "--json", renamed], "is an input of this run"),
        "unknown op": (["check", d, "--results", renamed, "--ops", "conv2d"], "not in the manifest"),
        "bad engine": (["run", d, "--engine", "no_such_module_xyz:f", "--out", tmp_path / "o.safetensors"],
                       "cannot import"),
        "write into a non-empty directory": (["write", full, "--model", "synthetic:tiny", "--quick"], "not empty"),
        "bad dtype": (["write", tmp_path / "new", "--dtype", "float8"], "unknown dtype"),
    }


def test_bad_inputs_are_one_line_and_exit_2(vector_dirs, tmp_path, capsys):
    for what, (argv, message) in _bad_inputs(vector_dirs["float32"], tmp_path).items():
        rc, out, err = _run_cli(capsys, *argv)
        assert rc == 2, what
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (what, err)
    assert not (tmp_path / "new").exists()


def test_inputs_from_a_gguf_file_equal_those_from_the_hf_directory(tiny_dir, tmp_path):
    from mlx_tinyllama.gguf_write import convert
    from mlx_tinyllama.vectors.inputs import USED, load_weights

    convert(tiny_dir, tmp_path / "tiny.gguf", out_type="f16")
    from_dir, from_gguf = load_weights(str(tiny_dir)), load_weights(str(tmp_path / "tiny.gguf"))
    assert from_gguf.config == from_dir.config and from_gguf.description["format"] == "gguf"
    for name in USED + ("lm_head.weight",):  # Q/K un-permuted by the GGUF reader: the same matrices
        np.testing.assert_array_equal(from_gguf.tensors[name], from_dir.tensors[name])


def test_weight_read_as_in_out_is_named_transposed(vector_dirs):
    def engine(op, inputs, params):  # x @ w: a [in, out] weight layout on an HF [out, in] checkpoint
        return nk.round_to(np.asarray(inputs["x"], np.float32) @ np.asarray(inputs["w"], np.float32), params["dtype"])

    vectors = vector_dirs["float16"]
    results, _ = run_engine(vectors, engine, ["matmul"], ["matmul.q_proj.*"])
    result = check(vectors, {k: to_numpy(v) for k, v in results.items()}, ["matmul"], ["matmul.q_proj.*"])
    s = _op(result, "matmul")
    assert (s["first_failing"], s["pattern"], s["failed"]) == ("matmul.q_proj.M1", "transposed", s["cases"])
    assert "w read as [in, out]" in s["detail"]


def test_rms_norm_squaring_in_fp16_is_named_an_overflow(vector_dirs):
    """The project's fp16-pure policy computes x² in fp16: fine on ordinary rows, inf above 256."""
    result = _check(vector_dirs["float16"], mlx_engine.fp16_pure, ["rms_norm"])
    s = _op(result, "rms_norm")
    assert (s["first_failing"], s["pattern"], s["failed"]) == ("rms_norm.large", "overflow_nonfinite", 1)
    assert "overflows to inf" in s["detail"]


# --- one pattern library: a kernel vector's failure is named as compare names the stage ---------

# fault of the NumPy engine, its first failing case, the compare stage that case reproduces, how the
# vector's [rows, ...] layout maps onto the stage's, the shared name and the words both must say.
SAME_AS_COMPARE = [
    ("zero_rows_from_32", "matmul.q_proj.M39", "layers.0.attn.q", "heads", "last_partial_tile",
     "token rows 0-31 match, rows 32-38 are zero"),
    ("rope_sin_sign", "rope.q.offset0.T38", "layers.0.attn.q_rope", None, "all_rows_but_first",
     "token row 0 matches, every later token row differs"),
    ("rope_pairs_interleaved", "rope.q.offset0.T38", "layers.0.attn.q_rope", None, "reordered",
     "the sum matches, the values do not"),
    ("softmax_stale_tile", "softmax.T38.S38", "layers.0.attn.probs", None, "last_partial_tile",
     "token rows 0-31 match, rows 32-37 are copies of rows 0-5"),
    ("sdpa_kv_head_modulo", "sdpa.T38.S38", "layers.0.attn.context", "merge", "heads",
     "heads 1, 3-4, 6 of 8 differ, heads 0, 2, 5, 7 match"),
    ("rms_norm_tail_columns", "rms_norm.T38", "layers.0.attn_norm", None, "columns_from",
     "columns 0-191 match, columns 192-255 are zero"),
    ("scores_scale_by_d", "scores.T38.S38", "layers.0.attn.scores_masked", None, "scaled",
     "the values are the reference's times 0.17677"),
    # the same fault seen after the softmax: row 0 has one key, so it alone is right; both read
    # it as a fault in combining keys, not RoPE's (compare's attn.context reading)
    ("scores_scale_by_d", "sdpa.T38.S38", "layers.0.attn.context", "merge", "all_rows_but_first",
     "token row 0 matches, every later token row differs"),
]


def _as_stage(x: np.ndarray, layout: str | None, heads: int) -> np.ndarray:
    if layout == "heads":  # a projection's [T, H*D] as the head-major stage [H, T, D]
        return x.reshape(x.shape[0], heads, -1).transpose(1, 0, 2)
    if layout == "merge":  # SDPA's [H, T, D] as attn.context [T, H*D]
        return x.transpose(1, 0, 2).reshape(x.shape[1], -1)
    return x


@pytest.mark.parametrize("fault,name,tap,layout,pattern,words", SAME_AS_COMPARE,
                         ids=[f"{r[0]}-{r[1]}" for r in SAME_AS_COMPARE])
def test_a_kernel_fault_is_named_as_compare_names_its_stage(vector_dirs, fault, name, tap, layout, pattern, words):
    """The fault injected into one kernel's output: `vectors check` names it with the same pattern
    and words as `compare` gives the stage that kernel computes, on the same numbers (matmul, RoPE,
    softmax, SDPA, RMSNorm, scores); the clean engine's output of the same case has no pattern on
    either side."""
    from mlx_tinyllama.errorshape import stage_pattern

    vectors = vector_dirs["float16"]
    case = next(c for c in vectors.cases if c["name"] == name)
    op = case["op"]
    sdpa = next(c for c in vectors.cases if c["op"] == "sdpa")["shapes"]
    cfg = {"num_attention_heads": sdpa["q"][0], "num_key_value_heads": sdpa["k"][0]}
    faulty, _ = run_engine(vectors, getattr(nk, fault), [op], [name])
    clean, _ = run_engine(vectors, nk.clean, [op], [name])
    a, g = to_numpy(faulty[case["output"]]).astype(np.float64), vectors.golden(case).astype(np.float64)
    row = check_case(vectors, case, a)
    ours = stage_pattern(tap, _as_stage(a, layout, cfg["num_attention_heads"]),
                         _as_stage(g, layout, cfg["num_attention_heads"]), case["tolerance"]["nmse"], cfg)
    assert not row["pass"] and row["explanation"]["name"] == ours.name == pattern, (row["detail"], ours.words)
    assert row["detail"] == ours.words and ours.words.startswith(words), (row["detail"], ours.words)
    if op != "scores":  # compare's masked-scores stage is the causal mask's: another kernel named
        assert row["explanation"]["cause"] == ours.cause
    if op == "sdpa" and pattern == "all_rows_but_first":
        assert "one key only" in ours.cause and "RoPE's angle" not in row["explanation"]["next_step"]
    clean_out = to_numpy(clean[case["output"]]).astype(np.float64)
    assert check_case(vectors, case, clean_out)["pattern"] is None
    assert stage_pattern(tap, _as_stage(clean_out, layout, cfg["num_attention_heads"]),
                         _as_stage(g, layout, cfg["num_attention_heads"]), case["tolerance"]["nmse"], cfg) is None


@pytest.mark.parametrize("fault,op,first,label", [
    ("rope_sin_sign", "rope", "rope.q.offset0.T38", "all_rows_but_first"),
    ("softmax_stale_tile", "softmax", "softmax.T38.S38", "last_partial_tile:32"),
    ("sdpa_kv_head_modulo", "sdpa", "sdpa.T38.S38", "heads"),
    ("rms_norm_tail_columns", "rms_norm", "rms_norm.T1", "columns_from:192"),
])
def test_the_new_kernel_faults_fail_only_their_op(vector_dirs, fault, op, first, label):
    """Through `check` as a user runs it: only the faulty op fails, at its first failing case, with
    the shared name; the GQA slip names the KV groups it reads wrong."""
    result = _check(vector_dirs["float16"], getattr(nk, fault))
    assert _failing_ops(result) == {op}
    s = _op(result, op)
    assert (s["first_failing"], s["pattern"]) == (first, label)
    if op == "sdpa":
        assert s["explanation"]["evidence"]["kv_groups"] == [0, 1] and "GQA broadcast" in s["explanation"]["cause"]
    if op == "softmax":  # only the cases with a partial 32-row tile (T = 38); decode rows pass
        assert all(_case(result, n)["pass"] for n in ("softmax.T1.S39", "softmax.T1.S2048"))

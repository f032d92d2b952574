"""No verdict without coverage (issue 21): the verdict line states what was compared; unknown names, cut dumps and logs are exit 2; shared GGUF inputs named; every message agrees with the verdict; --suggest-map.
point to `--suggest-map`; a dump or log that stops early is refused unless `--partial`; a GGUF
given as --model is named as an input both sides share; and over a set of scenarios the exit
code, the status, the printed verdict line (the last line) and the JSON's verdict agree."""

from __future__ import annotations

import json
import os
import lzma
import random
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import SEED_IDS
from mlx_tinyllama.taps import split_name, tap_names
from mlx_tinyllama.trace import main as cli
from numpy_engine import Engine

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "synthetic:tiny", "--dtype", "float32"]
ALL = tap_names(2)  # synthetic:tiny
N = len(ALL)
LLAMACPP = REPO / "tests" / "fixtures" / "llamacpp"


def engine_taps(tiny_dir, faults=(), ids=SEED_IDS) -> dict[str, np.ndarray]:
    engine = Engine(tiny_dir, faults)
    engine.prefill(ids)
    return {k: v.astype(np.float32) for k, v in engine.dumped().items()}


def write(path, tensors: dict, ids=SEED_IDS) -> Path:
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(path),
              metadata={"tokens": json.dumps(list(ids))})
    return Path(path)


def onnx_names(taps: list[str]) -> dict[str, str]:
    """{canonical tap: a name as a dynamo ONNX export gives it}: op kind and a graph-wide counter."""
    kind = {"attn.q": "linear", "attn.k": "linear", "attn.v": "linear", "attn.out": "linear", "mlp.gate": "linear",
            "mlp.up": "linear", "mlp.down": "linear", "logits": "linear", "attn.scores_scaled": "mul",
            "mlp.prod": "mul", "mlp.act": "silu"}
    out, n = {}, 3
    for t in taps:
        n += 7
        out[t] = f"{kind.get(split_name(t)[1], 'val')}_{n}"
    return out


def shuffled(d: dict, seed: int = 0) -> dict:
    keys = list(d)
    random.Random(seed).shuffle(keys)
    return {k: d[k] for k in keys}


def run(tmp_path, capsys, *args) -> tuple[int, dict | None, str, str]:
    out = tmp_path / "v.json"
    out.unlink(missing_ok=True)
    rc = cli(["compare", *map(str, args), "--json", str(out)])
    cap = capsys.readouterr()
    return rc, (json.loads(out.read_text()) if out.exists() else None), cap.out, cap.err


def last_line(out: str) -> str:
    return [ln for ln in out.splitlines() if ln.strip()][-1]


# ---------------------------------------------------------------------------
# Unknown names


def test_unmapped_names_are_exit_2_and_point_to_suggest_map(tiny_dir, tmp_path, capsys):
    taps = engine_taps(tiny_dir)
    names = onnx_names(ALL)
    dump = write(tmp_path / "onnx.safetensors", {names[t]: x for t, x in taps.items()})
    rc, result, out, err = run(tmp_path, capsys, "--against", dump, *TINY)
    assert rc == 2 and result is None and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert f"{N} tensor name(s) are not canonical taps" in err and f"and {N - 5} more" in err
    assert "--suggest-map" in err and sum(f"{n}," in err or f"{n} and" in err for n in names.values()) == 5


def test_a_few_unmapped_names_refused_or_left_out_by_ignore_unmapped(tiny_dir, tmp_path, capsys):
    """Unlike the all-renamed dump: three names unknown among canonical ones (a user who forgot a
    line of --map). Refused; with --ignore-unmapped compared without them, and the verdict says so."""
    taps = engine_taps(tiny_dir)
    renamed = {"layers.1.mlp.up": "blk.1.ffn_up_out", "layers.0.attn.k": "k_cache_in", "logits": "lm_out"}
    dump = write(tmp_path / "few.safetensors", {renamed.get(t, t): x for t, x in taps.items()})
    rc, _, _, err = run(tmp_path, capsys, "--against", dump, *TINY)
    assert rc == 2 and "3 tensor name(s)" in err and "lm_out" in err and "more" not in err
    rc, result, out, _ = run(tmp_path, capsys, "--against", dump, *TINY, "--ignore-unmapped")
    assert rc == 0 and result["status"] == "match"
    line = result["verdict"]["line"]
    assert line.startswith(f"match: {N - 3}/{N} stages; not compared: 3 missing from their dump, 3 of their tensor(s) "
                           "with no canonical name (ignored by --ignore-unmapped)")
    assert last_line(out) == line


def test_clean_canonical_dump_is_not_flagged(tiny_dir, tmp_path, capsys):
    dump = write(tmp_path / "clean.safetensors", engine_taps(tiny_dir))
    rc, result, out, err = run(tmp_path, capsys, "--against", dump, *TINY, "--report", tmp_path / "r.html")
    assert rc == 0 and err == "" and result["verdict"]["line"] == f"match: {N}/{N} stages"
    assert f"match: {N}/{N} stages" in (tmp_path / "r.html").read_text()  # the report states the same verdict
    assert last_line(out) == f"match: {N}/{N} stages" and result["verdict"]["partial"] is None
    assert "shared_input" not in result or result["shared_input"] is None  # an HF model: nothing shared


# ---------------------------------------------------------------------------
# Dumps and logs that stop early


def _drop_after(taps: dict, last: str) -> dict:
    cut = ALL.index(last)
    return {t: x for t, x in taps.items() if ALL.index(t) <= cut}


CUTS = {  # how the dump is cut -> the words that must name where it stops
    "last_layer": (lambda t: _drop_after(t, "layers.0.out"), "stops after layers.0.out"),
    "mid_block": (lambda t: _drop_after(t, "layers.1.attn.out"), "stops after layers.1.attn.out"),
    "no_tail": (lambda t: _drop_after(t, "layers.1.out"), "stops after layers.1.out"),
    "layer_missing": (lambda t: {k: x for k, x in t.items() if not k.startswith("layers.0.")},
                      "holds nothing of layer(s) 0"),
}


@pytest.mark.parametrize("cut", sorted(CUTS))
def test_a_dump_that_stops_early_is_exit_2_unless_partial(cut, tiny_dir, tmp_path, capsys):
    keep, words = CUTS[cut]
    taps = keep(engine_taps(tiny_dir))
    dump = write(tmp_path / "cut.safetensors", taps)
    rc, result, out, err = run(tmp_path, capsys, "--against", dump, *TINY)
    assert rc == 2 and result is None and out == ""
    assert err.startswith("error: ") and words in err and "--partial" in err and len(err.strip().splitlines()) == 1
    rc, result, out, _ = run(tmp_path, capsys, "--against", dump, *TINY, "--partial")
    v = result["verdict"]
    assert rc == 0 and v["status"] == "match" and words in v["partial"]
    assert v["line"].startswith(f"match: {len(taps)}/{N} stages (partial dump, by --partial: it {words}")
    assert last_line(out) == v["line"]


@pytest.mark.parametrize("plan", ["seed_plan", "logits_only", "fused_attention"])
def test_dumps_partial_by_design_but_complete_to_the_end_pass(plan, tiny_dir, tmp_path, capsys):
    """Not cuts: the seed's plan (layer 0 whole, each layer's out), the logits alone, an engine that
    never forms the scores. Their verdict line carries the coverage."""
    taps = engine_taps(tiny_dir)
    keep = {"seed_plan": lambda t: t in ("embed", "final_norm", "logits") or t.startswith("layers.0.")
            or t.endswith(".out") and not t.endswith("attn.out"),
            "logits_only": lambda t: t == "logits",
            "fused_attention": lambda t: ".attn.scores" not in t and ".attn.probs" not in t}[plan]
    kept = {t: x for t, x in taps.items() if keep(t)}
    rc, result, out, _ = run(tmp_path, capsys, "--against", write(tmp_path / "p.safetensors", kept), *TINY)
    assert rc == 0 and result["verdict"]["partial"] is None
    assert result["verdict"]["line"].startswith(f"match: {len(kept)}/{N} stages; not compared: "
                                                f"{N - len(kept)} missing from their dump")
    assert last_line(out) == result["verdict"]["line"]


@pytest.fixture(scope="module")
def fp32_log(tmp_path_factory) -> str:
    return lzma.decompress((LLAMACPP / "clean_fp32_short.log.xz").read_bytes()).decode()


@pytest.mark.parametrize("mid_line", [False, True])
def test_a_llamacpp_log_cut_after_layer_1_attention_is_exit_2(mid_line, fp32_log, small_dir, tmp_path, capsys):
    """The engine died in layer 1's residual add: the log ends in the middle of a block."""
    cut = fp32_log.index("ffn_inp-1 = ")
    cut = fp32_log.rindex("\n", 0, cut) + 1
    if mid_line:  # the dying process flushed half of attn_out-1's values
        start = fp32_log.rindex("attn_out-1 = ", 0, cut)
        cut = start + (cut - start) // 2
    log = tmp_path / "cut.log"
    log.write_text(fp32_log[:cut])
    rc, result, out, err = run(tmp_path, capsys, "--against", log, "--model", small_dir)
    assert rc == 2 and result is None and len(err.strip().splitlines()) == 1
    if mid_line:  # the parser refuses the half block itself (refs/llamacpp.py), naming the tensor
        assert "attn_out-1" in err and "truncated" in err
    else:
        assert "the log stops after layers.1.attn.out: the engine died or the file was cut" in err
    full = tmp_path / "full.log"
    full.write_text(fp32_log)
    rc, result, out, _ = run(tmp_path, capsys, "--against", full, "--model", small_dir)
    assert rc == 0 and result["verdict"]["line"].startswith("match: ")
    assert "shared_input" not in result or result["shared_input"] is None  # HF directory as --model


# ---------------------------------------------------------------------------
# Shared inputs


def test_a_gguf_model_is_named_as_a_shared_input(tiny_dir, tmp_path, capsys):
    from mlx_tinyllama.gguf_write import convert

    gguf = tmp_path / "tiny-f32.gguf"
    convert(tiny_dir, gguf, out_type="f32")
    dump = write(tmp_path / "clean.safetensors", engine_taps(tiny_dir))
    rc, result, out, _ = run(tmp_path, capsys, "--against", dump, "--model", gguf, "--dtype", "float32")
    assert rc == 0 and result["shared_input"]["file"] == str(gguf)
    assert "gguf-check --gguf" in result["shared_input"]["note"] and "--hf HF_DIR" in result["shared_input"]["note"]
    assert "conversion fault" in out and "Q/K written without the permutation" in out.replace("\n", " ")
    assert "conversion faults are not checked" in result["verdict"]["line"] and last_line(out) == result["verdict"]["line"]
    rc, result, out, _ = run(tmp_path, capsys, "--against", dump, "--model", tiny_dir, "--dtype", "float32")
    assert rc == 0 and not result.get("shared_input") and "conversion" not in out


# ---------------------------------------------------------------------------
# --suggest-map


def suggest(tmp_path, capsys, dump, *extra, dtype="float32") -> tuple[int, dict, list[str]]:
    out = tmp_path / "suggested.json"
    rc = cli(["compare", "--against", str(dump), "--model", "synthetic:tiny", "--dtype", dtype,
              "--suggest-map", str(out), *extra])
    printed = capsys.readouterr().out.splitlines()
    return rc, json.loads(out.read_text()), printed


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_suggest_map_reproduces_an_onnx_export_map(dtype, tiny_dir, tmp_path, capsys):
    """Names as a dynamo export gives them, a batch axis on every tensor, the file order shuffled:
    every tensor equals one tap, so the suggested map is the true one, and compare with it matches.
    In float16 too (the mask's float32 minimum becomes -inf there: still masked)."""
    names = onnx_names(ALL)
    with np.errstate(over="ignore"):
        tensors = {names[t]: np.ascontiguousarray(x[None], dtype) for t, x in engine_taps(tiny_dir).items()}
    dump = tmp_path / "onnx.safetensors"
    save_file(shuffled(tensors), str(dump), metadata={"tokens": json.dumps(SEED_IDS)})
    rc, mapping, printed = suggest(tmp_path, capsys, dump, dtype=dtype)
    assert rc == 0 and mapping == {v: k for k, v in names.items()}
    lines = [ln for ln in printed if " -> " in ln]
    assert len(lines) == N and all(" match (" in ln for ln in lines)
    assert printed[-1].startswith("wrote ") and f"{N} of {N} tensors within tolerance" in printed[-1]
    rc, result, out, _ = run(tmp_path, capsys, "--against", dump, "--model", "synthetic:tiny", "--dtype", dtype,
                             "--map", tmp_path / "suggested.json")
    assert rc == 0 and result["verdict"]["line"] == f"match: {N}/{N} stages"
    # the map is an output like any other: never written over an input; and it is all the run writes
    assert cli(["compare", "--against", str(dump), *TINY, "--suggest-map", str(dump)]) == 2
    assert cli(["compare", "--against", str(dump), *TINY, "--suggest-map", str(tmp_path / "m2.json"),
                "--json", str(tmp_path / "j.json")]) == 2
    assert not (tmp_path / "m2.json").exists() and not (tmp_path / "j.json").exists()


def test_suggest_map_says_ambiguous_where_taps_are_equal(tiny_dir, tmp_path, capsys):
    """One token: RoPE at position 0 is the identity (q = q_rope), nothing is masked (scaled =
    masked) and every softmax is 1 (probs equal across layers). Those tensors are called ambiguous
    with the true tap among the candidates and left out of the map; the others are mapped right."""
    ids = SEED_IDS[:1]
    names = onnx_names(ALL)
    truth = {v: k for k, v in names.items()}
    dump = write(tmp_path / "one.safetensors",
                 shuffled({names[t]: x for t, x in engine_taps(tiny_dir, ids=ids).items()}), ids=ids)
    rc, mapping, printed = suggest(tmp_path, capsys, dump)
    assert rc == 0 and all(truth[k] == v for k, v in mapping.items())
    ambiguous = {ln.split(" -> ")[0]: ln for ln in printed if " -> ?  ambiguous" in ln}
    stages = {split_name(truth[n])[1] for n in ambiguous}
    # (and with one key the context is V after the GQA repeat, heads merged: v_rep and context are equal)
    assert stages == {"attn.q", "attn.q_rope", "attn.k", "attn.k_rope", "attn.scores_scaled",
                      "attn.scores_masked", "attn.probs", "attn.v_rep", "attn.context"}
    assert len(ambiguous) == 18 and set(mapping) == set(truth) - set(ambiguous)
    assert all(truth[n] + " (" in ln for n, ln in ambiguous.items())  # the true tap is among the candidates


def test_suggest_map_leaves_out_two_tensors_that_equal_one_tap(tiny_dir, tmp_path, capsys):
    """An engine that dumps one tensor twice (a view and its copy): neither copy can be told from
    the other, so both are ambiguous, each naming the other; everything else is mapped right."""
    names = onnx_names(ALL)
    taps = engine_taps(tiny_dir)
    tensors = {names[t]: x for t, x in taps.items()}
    tensors["copy_7"] = taps["layers.0.mlp.act"].copy()
    rc, mapping, printed = suggest(tmp_path, capsys, write(tmp_path / "twice.safetensors", shuffled(tensors)))
    act = names["layers.0.mlp.act"]
    assert rc == 0 and mapping == {v: k for k, v in names.items() if v != act}
    lines = {ln.split(" -> ")[0]: ln for ln in printed if " -> " in ln}
    assert "ambiguous: copy_7 equal(s) layers.0.mlp.act too" in lines[act]
    assert f"ambiguous: {act} equal(s) layers.0.mlp.act too" in lines["copy_7"]


@pytest.mark.parametrize("sample", [None, 97])
def test_suggest_map_on_mixed_names_of_a_faulted_engine(sample, tiny_dir, tmp_path, capsys, monkeypatch):
    """Unlike the export: half the names already canonical, no batch axis, and a fault (RoPE
    positions off by one in layer 1): the renamed tensors are mapped right, the faulted stage as
    "likely" (closest, over tolerance), and compare with the map finds the fault at its stage.
    With sample=97 every pair is first measured on 97 positions (as big tensors are): same map."""
    if sample:
        monkeypatch.setattr("mlx_tinyllama.refs.suggest.SAMPLE", sample)
    names = onnx_names(ALL)
    taps = engine_taps(tiny_dir, ["rope_offset@1"])
    mixed = {(names[t] if i % 2 else t): x for i, (t, x) in enumerate(taps.items())}
    dump = write(tmp_path / "mixed.safetensors", shuffled(mixed, 1))
    rc, mapping, printed = suggest(tmp_path, capsys, dump)
    assert rc == 0 and mapping == {names[t]: t for i, t in enumerate(taps) if i % 2}
    q_rope = next(ln for ln in printed if ln.startswith(names["layers.1.attn.q_rope"] + " -> "))
    assert " likely (" in q_rope and "check the line" in q_rope
    assert sum(" given (a canonical tap name)" in ln for ln in printed) == (N + 1) // 2
    rc, result, out, _ = run(tmp_path, capsys, "--against", dump, *TINY, "--map", tmp_path / "suggested.json")
    assert rc == 1 and result["first_divergence"]["tap"] == "layers.1.attn.q_rope"
    assert last_line(out).startswith("diverged at layers.1.attn.q_rope")


def test_suggest_map_needs_full_tensors(tmp_path, capsys, fp32_log, small_dir):
    log = tmp_path / "l.log"
    log.write_text(fp32_log)
    assert cli(["compare", "--against", str(log), "--model", str(small_dir), "--suggest-map",
                str(tmp_path / "m.json")]) == 2
    assert "needs full tensors" in capsys.readouterr().err and not (tmp_path / "m.json").exists()


# ---------------------------------------------------------------------------
# Every message agrees with the verdict


def agrees(rc: int, result: dict | None, out: str, err: str) -> str:
    """Exit code, status, the printed verdict line (the last line) and the JSON say one thing."""
    if rc == 2:  # refused: one line on stderr, no verdict anywhere
        assert result is None and len(err.strip().splitlines()) >= 1 and err.strip().splitlines()[-1].startswith("error: ")
        assert "match" not in out
        return "refused"
    v, status = result["verdict"], result["status"]
    assert v["status"] == status and rc == v["exit_code"] == (0 if status == "match" else 1)
    assert last_line(out) == v["line"] and v["line"].startswith(status + (":" if status != "diverged" else " at "))
    assert f"{v['compared']}/{v['stages']} stages" in v["line"]
    assert v["compared"] == len(result["coverage"]["compared"]) and v["stages"] == len(result["coverage"]["cells"])
    if status == "match":
        assert result["first_divergence"] is None and not result.get("localized")
        assert "first divergence" not in out and "localized:" not in out and "required but not" not in out
        assert len(result["coverage"]["compared"]) == v["compared"]
        if v["compared"] < v["stages"]:
            assert "not compared: " in v["line"]  # the match says what it did not cover
    else:
        assert not v["line"].startswith("match")
    first = result["first_divergence"]
    if first and first["error"]["metric"] == "shape":  # a layout or missing rows, not drift from upstream
        assert "accumulates from small errors" not in out and "shape mismatch" in v["line"]
    return status


SCENARIOS = {  # name -> (how the dump is made, extra options, expected outcome)
    "clean": (lambda t: t, [], "match"),
    "faulted": ("wrong_scale@1", [], "diverged"),
    "partial": (lambda t: _drop_after(t, "layers.0.out"), ["--partial"], "match"),
    "cut": (lambda t: _drop_after(t, "layers.0.out"), [], "refused"),
    "unmapped": (lambda t: {("x_" + k if k.endswith("mlp.up") else k): x for k, x in t.items()}, [], "refused"),
    "unmapped_ignored": (lambda t: {("x_" + k if k.endswith("mlp.up") else k): x for k, x in t.items()},
                         ["--ignore-unmapped"], "match"),
    "required_missing": (lambda t: {k: x for k, x in t.items() if not k.endswith("attn.probs")},
                         ["--require", "layers.*.attn.probs"], "incomplete"),
    "last_row_only_npz": (lambda t: {**t, "logits": t["logits"][-1:]}, [], None),  # whatever it is, it agrees
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_status_exit_code_line_and_json_agree(name, tiny_dir, tmp_path, capsys):
    make, extra, expected = SCENARIOS[name]
    if isinstance(make, str):
        taps = engine_taps(tiny_dir, [make])
    else:
        taps = make(engine_taps(tiny_dir))
    if name.endswith("_npz"):
        dump = tmp_path / "d.npz"
        np.savez(dump, **taps)
        extra = [*extra, "--token-ids", ",".join(map(str, SEED_IDS))]
    else:
        dump = write(tmp_path / "d.safetensors", taps)
    outcome = agrees(*run(tmp_path, capsys, "--against", dump, *TINY, *extra))
    assert expected is None or outcome == expected


def test_a_llamacpp_log_and_a_stats_json_agree_too(fp32_log, small_dir, tmp_path, capsys):
    """Other formats: a llama.cpp log (the last layer holds only the last row) and `run --json`."""
    log = tmp_path / "l.log"
    log.write_text(fp32_log)
    assert agrees(*run(tmp_path, capsys, "--against", log, "--model", small_dir)) == "match"
    stats = tmp_path / "stats.json"
    assert cli(["run", *TINY, "--json", str(stats)]) == 0
    capsys.readouterr()
    assert agrees(*run(tmp_path, capsys, "--against", stats, *TINY)) == "match"


def test_a_localized_stage_is_never_beside_a_match():
    """A stage whose own error (replayed from their inputs) is over tolerance while every stage is
    within tolerance of ours: the verdict is `diverged` at that stage, not `match` beside it."""
    from mlx_tinyllama.verdict import verdict

    cov = {"compared": ["embed", "logits"], "cells": {"embed": "compared", "logits": "compared"}, "missing": [],
           "not_comparable": {}, "shape_mismatch": {}}
    base = {"first_divergence": None, "stages": [], "coverage": cov}
    assert verdict({**base, "localized": None})["line"] == "match: 2/2 stages"
    v = verdict({**base, "localized": {"stage": "embed", "local_ratio": 1926.0, "inherited_ratio": 0.0}})
    assert v["status"] == "diverged" and v["exit_code"] == 1 and v["line"].startswith("diverged at embed: ")


def _step_dumps(tiny_dir, out: Path, faults=(), rename=None) -> Path:
    """Three decode steps of the NumPy engine after the prompt, one file each (names renamed by `rename`)."""
    from safetensors.numpy import save_file as save

    out.mkdir()
    engine = Engine(tiny_dir, faults)
    taps, ids = engine.prefill(SEED_IDS), list(SEED_IDS)
    for k in range(3):
        ids.append(int(np.argmax(taps["logits"][-1])))
        taps = engine.step(ids[-1])
        tensors = {(rename or {}).get(t, t): np.ascontiguousarray(x, np.float32) for t, x in engine.dumped().items()}
        save(tensors, str(out / f"step{k}.safetensors"),
             metadata={"tokens": json.dumps(ids), "position": str(len(ids) - 1)})
    return out


def test_decode_steps_have_the_same_verdict_rules(tiny_dir, tmp_path, capsys):
    """--against-steps, a format unlike a prefill dump: its verdict line counts the steps and the
    stages each held; unknown names are exit 2 there too (or left out with --ignore-unmapped)."""
    clean = _step_dumps(tiny_dir, tmp_path / "clean")
    out_json = tmp_path / "s.json"
    rc = cli(["compare", "--against-steps", str(clean), *TINY, "--json", str(out_json)])
    out, result = capsys.readouterr().out, json.loads(out_json.read_text())
    assert rc == 0 and result["status"] == "match"
    # no prefill dump: the cache positions 0-37 are in no file, so the steps' attention is not replayed, said
    unreplayed = "not replayed from their own cache: 12 attention stage(s) of 3 step(s) (not_replayed says why)"
    assert result["verdict"]["line"] == f"match: 3 step(s) at positions 38-40, {N}/{N} stages each; {unreplayed}"
    assert last_line(out) == result["verdict"]["line"]
    bad = _step_dumps(tiny_dir, tmp_path / "bad", ["zeros_after_first_step"])
    rc = cli(["compare", "--against-steps", str(bad), *TINY, "--json", str(out_json)])
    out, result = capsys.readouterr().out, json.loads(out_json.read_text())
    assert rc == 1 and result["status"] == "diverged" and last_line(out) == result["verdict"]["line"]
    assert result["verdict"]["line"].startswith("diverged at position 39, layers.0.attn.context")
    renamed = _step_dumps(tiny_dir, tmp_path / "renamed", rename={"layers.1.mlp.up": "ffn_up_1"})
    assert cli(["compare", "--against-steps", str(renamed), *TINY]) == 2
    err = capsys.readouterr().err
    assert "1 tensor name(s)" in err and "ffn_up_1" in err and "--suggest-map" in err
    rc = cli(["compare", "--against-steps", str(renamed), *TINY, "--ignore-unmapped", "--json", str(out_json)])
    out, result = capsys.readouterr().out, json.loads(out_json.read_text())
    assert rc == 0 and last_line(out) == result["verdict"]["line"] == (
        f"match: 3 step(s) at positions 38-40, {N - 1}/{N} stages each; not compared: 3 stage(s) missing from their "
        f"dumps; {unreplayed}; 3 of their tensor(s) with no canonical name (ignored by --ignore-unmapped)")


@pytest.mark.skipif(os.name == "nt", reason="a shebang script stands in for the binary")
def test_the_llamacpp_command_gives_coverage_and_names_the_shared_gguf(small_dir, tmp_path, capsys):
    """`llamacpp --gguf`: the reference and the engine run the one GGUF (the note says so), and its
    verdict line carries the coverage like compare's."""
    from mlx_tinyllama.gguf_write import convert
    from test_llamacpp_compare import FIXTURES as LLAMACPP_FIXTURES, fake_binary

    gguf = tmp_path / "small-f16.gguf"
    convert(small_dir, gguf, out_type="f16")
    out = tmp_path / "r.json"
    rc = cli(["llamacpp", "--gguf", str(gguf), "--llama-cpp", str(fake_binary(tmp_path, "clean_default_short")),
              "--prompt-file", str(LLAMACPP_FIXTURES / "prompts" / "short.txt"), "--json", str(out)])
    printed, result = capsys.readouterr().out, json.loads(out.read_text())
    v = result["verdict"]
    total = len(tap_names(4))  # synthetic:small
    assert rc == 0 and v["status"] == "match" and v["stages"] == total and 0 < v["compared"] < total
    assert v["line"].startswith(f"match: {v['compared']}/{total} stages; not compared: ")
    assert last_line(printed) == v["line"] and "conversion faults are not checked" in v["line"]
    assert result["shared_input"]["file"] == str(gguf) and "the same GGUF the engine ran" in result["shared_input"]["note"]

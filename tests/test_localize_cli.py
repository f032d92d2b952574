"""`compare` with localization on the command line: the localized stage, diagnosis and coverage
in the output, the JSON and the report; `--require`; `--against-steps`; exit codes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import SEED_IDS
from mlx_tinyllama.stages import tap_names
from mlx_tinyllama.tolerances import tolerance_for
from mlx_tinyllama.trace import main as cli
from numpy_engine import Engine

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "synthetic:tiny", "--dtype", "float32"]
N_TAPS = len(tap_names(2))  # every canonical tap of synthetic:tiny (2 layers)


def _dump(tiny_dir, path, faults=(), drop=()) -> Path:
    engine = Engine(tiny_dir, faults)
    engine.prefill(SEED_IDS)
    for name in [n for n in engine.taps if any(n.endswith(d) for d in drop)]:
        del engine.taps[name]
    return engine.dump(path, SEED_IDS)


def test_drift_and_real_fault_on_the_command_line(tiny_dir, tmp_path, capsys):
    eps = math.sqrt(0.5 * tolerance_for("layers.0.attn_norm", "nmse", "float32", "float32", 2))
    dump = _dump(tiny_dir, tmp_path / "d.safetensors", [f"drift:{eps}", "wrong_scale@1"])
    rc = cli(["compare", "--against", str(dump), *TINY, "--json", str(tmp_path / "r.json"),
              "--report", str(tmp_path / "r.html")])
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "r.json").read_text())
    assert rc == 1
    assert result["first_divergence"]["tap"] == "layers.0.attn.scores"
    assert result["localized"]["stage"] == "layers.1.attn.scores_scaled"
    assert result["coverage"]["compared"] == [s["tap"] for s in result["stages"]] and not result["coverage"]["missing"]
    assert all(isinstance(s["local_ratio"], float) for s in result["stages"][1:])
    assert "localized: layers.1.attn.scores_scaled" in out and "amplifies what it inherited" in out
    assert f"coverage: {N_TAPS}/{N_TAPS} stages compared" in out
    html = (tmp_path / "r.html").read_text()
    assert 'id="localization"' in html and "layers.1.attn.scores_scaled" in html


def test_diagnosis_in_words(tiny_dir, tmp_path, capsys):
    dump = _dump(tiny_dir, tmp_path / "k.safetensors", ["kv_head_mapping@0"])
    assert cli(["compare", "--against", str(dump), *TINY, "--json", str(tmp_path / "k.json")]) == 1
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "k.json").read_text())
    assert [d["transform"] for d in result["diagnosis"]] == ["kv_head_mapping"]
    assert "matches after kv_head_mapping" in out and "h % n_kv_heads" in out


def test_require_fails_a_match_that_skipped_a_required_stage(tiny_dir, tmp_path, capsys):
    partial = _dump(tiny_dir, tmp_path / "p.safetensors", drop=("attn.probs",))
    full = _dump(tiny_dir, tmp_path / "f.safetensors")
    args = ["--require", "layers.*.attn.probs", "--require", "logits"]
    assert cli(["compare", "--against", str(partial), *TINY, "--json", str(tmp_path / "p.json"), *args]) == 1
    result = json.loads((tmp_path / "p.json").read_text())
    # everything compared matches, but not all that was asked: neither `match` (exit 1) nor a divergence
    assert result["status"] == "incomplete" and result["verdict"]["exit_code"] == 1 and not result["first_divergence"]
    assert result["required"]["not_compared"] == ["layers.0.attn.probs", "layers.1.attn.probs"]  # ... but not all
    assert result["coverage"]["missing"] == ["layers.0.attn.probs", "layers.1.attn.probs"]
    assert "required but not compared" in capsys.readouterr().out
    assert cli(["compare", "--against", str(full), *TINY, *args]) == 0
    capsys.readouterr()
    assert cli(["compare", "--against", str(full), *TINY, "--require", "layers.*.attn.nothing"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: tap pattern 'layers.*.attn.nothing'")


def test_replay_against_a_stored_reference_needs_the_model(tiny_dir, tmp_path):
    dump = _dump(tiny_dir, tmp_path / "m.safetensors", ["mask_off@1"])
    ref = str(REPO / "refs" / "synthetic-tiny-fp32.json")
    assert cli(["compare", "--against", str(dump), "--ref", ref, "--json", str(tmp_path / "a.json")]) == 1
    without = json.loads((tmp_path / "a.json").read_text())
    assert without["localized"] is None and "weights" in without["replay"]["note"]
    assert len(without["coverage"]["compared"]) == N_TAPS
    assert cli(["compare", "--against", str(dump), "--ref", ref, *TINY, "--json", str(tmp_path / "b.json")]) == 1
    with_model = json.loads((tmp_path / "b.json").read_text())
    assert with_model["localized"]["stage"] == "layers.1.attn.scores_masked"
    assert [d["transform"] for d in with_model["diagnosis"]] == ["mask_off"]


def _steps(tiny_dir, out: Path, faults=()) -> Path:
    out.mkdir()
    engine = Engine(tiny_dir, faults)
    taps, ids = engine.prefill(SEED_IDS), list(SEED_IDS)
    for k in range(3):
        ids.append(int(np.argmax(taps["logits"][-1])))
        taps = engine.step(ids[-1])
        engine.dump(out / f"step{k}.safetensors", ids, position=len(ids) - 1)
    return out


def test_against_steps_on_the_command_line(tiny_dir, tmp_path, capsys):
    bad = _steps(tiny_dir, tmp_path / "zeros", ["zeros_after_first_step"])
    rc = cli(["compare", "--against-steps", str(bad), *TINY, "--json", str(tmp_path / "s.json")])
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "s.json").read_text())
    assert rc == 1 and result["command"] == "compare" and len(result["prompt"]["ids"]) == 41
    assert (result["first_divergence"]["position"], result["first_divergence"]["tap"]) == (39, "layers.0.attn.context")
    assert "first divergence: position 39, layers.0.attn.context" in out and "all zeros" in out
    clean = _steps(tiny_dir, tmp_path / "clean")
    assert cli(["compare", "--against-steps", str(clean / "step0.safetensors"), str(clean / "step1.safetensors"),
                *TINY]) == 0
    capsys.readouterr()
    assert cli(["compare", "--against-steps", str(clean)]) == 2
    assert cli(["compare", "--against-steps", str(clean), "--against", str(clean / "step0.safetensors"), *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)


@pytest.mark.parametrize("missing", ["scores", "context"])
def test_fused_engine_coverage_in_the_output(tiny_dir, tmp_path, capsys, missing):
    drop = ("attn.scores", "attn.scores_scaled", "attn.scores_masked", "attn.probs") if missing == "scores" \
        else ("attn.context",)
    dump = _dump(tiny_dir, tmp_path / "f.safetensors", drop=drop)
    assert cli(["compare", "--against", str(dump), *TINY]) == 0
    out = capsys.readouterr().out
    n = 2 * len(drop)
    assert f"coverage: {N_TAPS - n}/{N_TAPS} stages compared; {n} missing from their dump" in out
    grid_row = next(line for line in out.splitlines() if line.strip().startswith(drop[0] + " "))
    assert grid_row.split()[1:] == ["·", "·"]


def test_run_compare_reports_coverage_too(tmp_path, capsys):
    """`run --compare REF` (this package against a reference): the same coverage, from the same code."""
    out = tmp_path / "r.json"
    assert cli(["run", *TINY, "--compare", str(REPO / "refs" / "synthetic-tiny-fp32.json"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["coverage"]["compared"]) == N_TAPS and result["coverage"]["missing"] == []
    assert f"coverage: {N_TAPS}/{N_TAPS} stages compared" in capsys.readouterr().out

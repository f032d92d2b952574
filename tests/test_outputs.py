"""One output-path check (outputs.check_file / check_dir) for every command's output options,
made before any model loads; NaN-safe JSON that reads back."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from mlx_tinyllama import cli_common
from mlx_tinyllama.errors import UserError
from mlx_tinyllama.outputs import check_dir, check_file, json_safe, number, write_json
from mlx_tinyllama.trace import main as trace

REF = Path(__file__).resolve().parents[1] / "refs" / "synthetic-tiny-fp32.json"

# every command with its output options (a file option, and --plots where it has one)
OUTPUTS = {"run": ["--json", "--report", "--dump", "--plots"], "compare": ["--json", "--report", "--plots"],
           "paths": ["--json", "--report", "--plots"], "stability": ["--json", "--report", "--plots"],
           "generate": ["--json"], "bench": ["--json"]}


def test_checks_refuse_bad_paths_and_pass_good_ones(tmp_path):
    (tmp_path / "file").write_text("x")
    check_file(tmp_path / "new.json", "--json")  # a new file in an existing directory
    check_dir(tmp_path / "plots", "--plots")  # a new directory in an existing one
    check_dir(tmp_path, "--plots")  # an existing directory
    with pytest.raises(UserError, match="cannot write --json .*its directory does not exist"):
        check_file(tmp_path / "no" / "r.json", "--json")
    with pytest.raises(UserError, match="it is a directory"):
        check_file(tmp_path, "--report")
    with pytest.raises(UserError, match="exists and is not a directory"):
        check_dir(tmp_path / "file", "--plots")
    with pytest.raises(UserError, match="parent directory does not exist"):
        check_dir(tmp_path / "no" / "plots", "--plots")


@pytest.mark.parametrize("command", sorted(OUTPUTS))
def test_every_output_option_is_checked_before_the_model_loads(command, tmp_path, monkeypatch, capsys):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the output paths were checked")

    monkeypatch.setattr(cli_common, "load_model", no_load)
    monkeypatch.setattr("mlx_tinyllama.stability.sources.load", no_load)
    (tmp_path / "file").write_text("x")
    for option in OUTPUTS[command]:
        bad = tmp_path / "file" if option == "--plots" else tmp_path / "no" / "out.safetensors"
        extra = ["--ref", str(REF)] if command == "compare" else []
        assert trace([command, "--model", "synthetic:tiny", *extra, option, str(bad)]) == 2, option
        err = capsys.readouterr().err
        assert err.startswith(f"error: cannot write {option} ") and err.count("\n") == 1, err
    assert (tmp_path / "file").read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_json_keeps_nan_and_inf_readable(tmp_path):
    data = {"a": math.nan, "b": [math.inf, -math.inf, 1.5], "c": np.float32(2.0), "d": np.int64(3), 4: None}
    write_json(tmp_path / "r.json", data)
    back = json.loads((tmp_path / "r.json").read_text())
    assert back == {"a": "nan", "b": ["inf", "-inf", 1.5], "c": 2.0, "d": 3, "4": None}
    assert math.isnan(number(back["a"])) and [number(v) for v in back["b"]] == [math.inf, -math.inf, 1.5]
    assert json_safe(True) is True and json_safe("nan") == "nan"

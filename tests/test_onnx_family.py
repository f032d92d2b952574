"""`trace onnx` beyond the model it was written on: dynamo exports of the Llama family's tiny
presets (Llama 3 RoPE + tied embeddings, Qwen2's q/k/v biases, Mistral's sliding window) are
mapped by structure and match with every stage compared; a Mistral graph exported without its
window (the config's `sliding_window` lost, as llama.cpp's converter loses it) diverges at layer
0's `scores_masked` and the hint leads with the window, not a tile."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from conftest import needs_torch  # noqa: E402
from test_robustness import invoke  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "field"))
import onnx_engine as E  # noqa: E402  (the field suite's exporter)

IDS = "1,5,9,13,17,21,25,29,33,37,41,45"  # 12 ids: past mistral-tiny's window of 8


def _onnx(args, tmp_path, capfd):
    js = tmp_path / "r.json"
    rc, out, err = invoke(["onnx", *args, "--token-ids", IDS, "--json", js], capfd)
    return rc, out, err, json.loads(js.read_text()) if js.exists() else None


@needs_torch
@pytest.mark.parametrize("preset, dtype", [("llama3-tiny", "float32"), ("qwen2-tiny", "float32"),
                                           ("mistral-tiny", "float32"), ("qwen2-tiny", "float16")])
def test_family_exports_map_by_structure_and_match(preset, dtype, tmp_path, capfd):
    """Also a float16 export (ORT runs it in float16): judged at the float16 tolerance, read from
    the graph's own output types, with no --dtype given."""
    from mlx_tinyllama import synthetic

    d = synthetic.materialize(preset, 0)
    graph = E.export(Path(d), 12, dtype, tmp_path / f"{preset}.onnx")
    rc, out, err, result = _onnx(["--model", graph, "--hf", d], tmp_path, capfd)
    assert rc == 0, out[-2000:] + err[-2000:]
    assert result["tolerance_basis"]["dtype"] == dtype, result["tolerance_basis"]
    assert result["status"] == "match" and "match: 47/47 stages" in out
    assert len(result["onnx_map"]["structure"]) == 47 and result["onnx_map"]["value"] == []


@needs_torch
def test_mistral_graph_without_its_window_is_named_as_the_window(tmp_path, capfd):
    from mlx_tinyllama import synthetic

    d = synthetic.materialize("mistral-tiny", 0)
    nowin = tmp_path / "nowin"
    shutil.copytree(d, nowin)
    cfg = json.loads((nowin / "config.json").read_text())
    assert cfg["sliding_window"] == 8
    cfg["sliding_window"] = None
    (nowin / "config.json").write_text(json.dumps(cfg))
    graph = E.export(nowin, 12, "float32", tmp_path / "nowin.onnx")
    rc, out, err, result = _onnx(["--model", graph, "--hf", d], tmp_path, capfd)
    assert rc == 1 and result["first_divergence"]["tap"] == "layers.0.attn.scores_masked", out[-3000:]
    assert result["first_divergence"]["pattern"]["name"] == "mask_window_missing"
    hint = " ".join(out.split("hint:", 1)[1].split())
    assert hint.startswith("queries at positions 8-11 see keys 8 or more positions back"), hint[:300]
    assert "tile" not in hint.split(";")[0]

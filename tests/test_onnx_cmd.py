"""`trace onnx`: a dynamo export of synthetic:tiny run by ONNX Runtime through the command, for
12 ids. Clean exits 0 with every stage compared; graph faults of the field engine (FAULTS) exit 1
at the stage where each first shows; a stage the structure cannot find is matched by value and
said so; a file that is not ONNX, or a missing extra, is one line and exit 2."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from conftest import needs_torch  # noqa: E402
from test_robustness import assert_one_error, invoke  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "field"))
import onnx_engine as E  # noqa: E402  (the field suite's exporter and faults)

IDS = "1,5,9,13,17,21,25,29,33,37,41,45"
N_STAGES = 47  # synthetic:tiny's taps (2 layers, GQA: k_rep and v_rep)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory, tiny_dir):
    """{name: path} of the clean export and faulted copies, with the clean structure map."""
    import onnx

    out = tmp_path_factory.mktemp("onnx_cmd")
    clean = E.export(tiny_dir, 12, "float32", out / "clean.onnx")
    model = onnx.load(str(clean))
    names = E.tap_map(model)
    paths = {"clean": clean}
    for fault in ("gate_up_swapped", "scale_over_head_dim"):
        paths[fault] = out / f"{fault}.onnx"
        onnx.save(E.faulted(model, names, fault), str(paths[fault]))
    # The act_fn nodes of layer 1 without their module path: the structure cannot find mlp.act there.
    blind = onnx.ModelProto()
    blind.CopyFrom(model)
    g = E.Graph(blind)
    for n in blind.graph.node:
        if g.in_scope(n, g.scopes("layers.1.mlp.act_fn")[0]):
            del n.metadata_props[:]
    paths["act_unscoped"] = out / "act_unscoped.onnx"
    onnx.save(blind, str(paths["act_unscoped"]))
    # No node keeps its module path (another exporter): everything is left to the value matching.
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    for n in bare.graph.node:
        del n.metadata_props[:]
    paths["no_scopes"] = out / "no_scopes.onnx"
    onnx.save(bare, str(paths["no_scopes"]))
    return out, paths


def _run(graphs, name, capfd, tiny_dir):
    out, paths = graphs
    js = out / f"{name}.json"
    rc, stdout, err = invoke(["onnx", "--model", paths[name], "--hf", tiny_dir, "--token-ids", IDS,
                              "--json", js], capfd)
    return rc, stdout, err, json.loads(js.read_text())


@needs_torch
def test_clean_export_matches_with_full_coverage(graphs, capfd, tiny_dir):
    rc, out, err, result = _run(graphs, "clean", capfd, tiny_dir)
    assert rc == 0, out[-2000:] + err[-2000:]
    assert result["status"] == "match"
    assert f"match: {N_STAGES}/{N_STAGES} stages" in out
    assert len(result["onnx_map"]["structure"]) == N_STAGES
    assert result["onnx_map"]["value"] == [] and result["onnx_map"]["unmapped"] == {}
    assert f"map: {N_STAGES} taps by structure, 0 by value, 0 not found" in err


@needs_torch
@pytest.mark.parametrize("fault", ["gate_up_swapped", "scale_over_head_dim"])
def test_graph_fault_diverges_at_its_stage(fault, graphs, capfd, tiny_dir):
    rc, out, err, result = _run(graphs, fault, capfd, tiny_dir)
    stage = E.FAULTS[fault][2]
    assert rc == 1, out[-2000:]
    assert result["status"] == "diverged"
    assert result["first_divergence"]["tap"] == stage, result["first_divergence"]
    assert f"diverged at {stage}" in out
    assert len(result["onnx_map"]["structure"]) == N_STAGES  # the fault leaves the structure: mapped whole


@needs_torch
def test_stage_the_structure_misses_is_matched_by_value_and_said(graphs, capfd, tiny_dir):
    rc, out, err, result = _run(graphs, "act_unscoped", capfd, tiny_dir)
    assert rc == 0, out[-2000:] + err[-2000:]
    m = result["onnx_map"]
    assert "layers.1.mlp.act" not in m["structure"] and "layers.0.mlp.act" in m["structure"]
    assert [(ln["tap"], ln["confidence"]) for ln in m["value"]] == [("layers.1.mlp.act", "match")]
    assert f"{N_STAGES - 1} taps by structure, 1 by value" in err and "by value:" in err
    assert f"match: {N_STAGES}/{N_STAGES} stages" in out


@needs_torch
def test_graph_without_module_paths_is_matched_by_value_and_never_a_false_alarm(graphs, capfd, tiny_dir):
    """A correct graph mapped by value only: the "match" lines are compared, a "likely" (closest but
    over tolerance, maybe another stage's value) is listed and not compared, and the verdict line
    says how many stages were not compared. (Before: a likely line at layers.0.attn.q, compared,
    made a correct graph "diverged".)"""
    rc, out, err, result = _run(graphs, "no_scopes", capfd, tiny_dir)
    m = result["onnx_map"]
    assert m["structure"] == {}
    assert rc == 0 and result["status"] == "match", out[-3000:]
    matched = [ln["tap"] for ln in m["value"] if ln["confidence"] == "match"]
    assert len(matched) >= 30 and "logits" in matched
    compared = result["verdict"]["compared"]
    assert compared == len(matched) < N_STAGES
    assert f"match: {compared}/{N_STAGES} stages; not compared" in out


@needs_torch
def test_structure_map_of_faulty_graph_leaves_unsettled_taps_unsettled(graphs):
    """The mask Add replaced (the field's causal_mask_removed): scores_masked, and probs found from
    it, are unsettled with a reason, not mapped onto a wrong value; everything else is mapped."""
    import onnx

    from mlx_tinyllama.onnx_engine import structure_map

    model = onnx.load(str(graphs[1]["clean"]))
    names, why = structure_map(E.faulted(model, E.tap_map(model), "causal_mask_removed"))
    assert set(why) == {"layers.0.attn.scores_masked", "layers.0.attn.probs"}, why
    assert "needs layers.0.attn.scores_masked" in why["layers.0.attn.probs"]
    assert len(names) == N_STAGES - 2


@needs_torch
def test_external_data_is_read_from_the_graphs_folder(graphs, capfd, tiny_dir, tmp_path):
    """Weights in external data (TinyLlama's are over protobuf's 2 GB), every tensor outside the
    graph (size_threshold=0: the axes and shapes too): run from the graph's folder, match; the data
    file gone: one line, exit 2."""
    import onnx

    d = tmp_path / "ext"
    d.mkdir()
    onnx.save_model(onnx.load(str(graphs[1]["clean"])), str(d / "m.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="m.onnx.data", size_threshold=0)
    rc, out, err = invoke(["onnx", "--model", d / "m.onnx", "--hf", tiny_dir, "--token-ids", IDS], capfd)
    assert rc == 0 and f"match: {N_STAGES}/{N_STAGES} stages" in out, out[-2000:] + err[-2000:]
    (d / "m.onnx.data").unlink()
    rc, out, err = invoke(["onnx", "--model", d / "m.onnx", "--hf", tiny_dir, "--token-ids", IDS], capfd)
    assert_one_error(rc, err, 2, "external data|cannot load")


@pytest.mark.parametrize("content", [b"hello, not a graph\n", b'{"a": 1}', bytes(range(256)) * 4, b""])
def test_not_onnx_is_one_line_exit_2(content, tmp_path, capfd, tiny_dir):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    rc, _, err = invoke(["onnx", "--model", bad, "--hf", tiny_dir, "--token-ids", IDS], capfd)
    assert_one_error(rc, err, 2, "not")
    assert "ONNX" in err


def test_missing_extra_names_it(tmp_path, capfd, tiny_dir, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == "onnxruntime" else real(m, *a))
    f = tmp_path / "m.onnx"
    f.write_bytes(b"x")
    rc, _, err = invoke(["onnx", "--model", f, "--hf", tiny_dir, "--token-ids", IDS], capfd)
    assert_one_error(rc, err, 2, re.escape("pip install mlx-tinyllama[onnx]"))

"""Field suite, ONNX Runtime with a fused q|k|v: the exported graph edited as an engine that fuses
its projections would run it (layer 0's q_proj, k_proj and v_proj MatMuls replaced by ONE MatMul
against their concatenated weight and a Split), ORT's fused output dumped under its ONNX name and
mapped with a list entry. Unlike tests/test_fused.py, the numbers are ORT's kernels' on a real
concatenated weight, and the other names come from the graph's structure map. Clean: exit 0 with
every stage compared; the packed weight's k block with KV head 1's columns taken from head 0's
(a wrong offset when packing): exit 1 at layers.0.attn.k, q and v within tolerance."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

_MISSING = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
if _MISSING:
    if os.environ.get("MLX_TINYLLAMA_REQUIRE_REFERENCE") == "1":
        raise ImportError(f"MLX_TINYLLAMA_REQUIRE_REFERENCE=1 but {', '.join(_MISSING)} missing: pip install -e '.[dev]'")
    pytest.skip(f"needs the dev extra ({', '.join(_MISSING)} missing)", allow_module_level=True)

import field_cases as C  # noqa: E402
from conftest import needs_torch  # noqa: E402

QKV = ("attn.q", "attn.k", "attn.v")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import onnx

    import onnx_engine as E
    from mlx_tinyllama.synthetic import materialize

    path = E.export(materialize("tiny", 0), len(C.IDS), "float32", tmp_path_factory.mktemp("fused") / "tiny.onnx")
    model = onnx.load(str(path))
    return model, E.tap_map(model)


def fuse_qkv(model, layer: int, wrong_kv_head: int | None = None) -> str:
    """Replace layer's q/k/v MatMuls by one MatMul against [W_q | W_k | W_v] and a Split into the
    original outputs (in place); returns the fused output's name. `wrong_kv_head`: that KV head's
    k columns of the packed weight are KV head 0's."""
    import onnx

    import onnx_engine as E

    g = E.Graph(model)
    nodes = [E._linear(g, f"layers.{layer}.self_attn.{p}_proj") for p in "qkv"]
    assert all(n.op_type == "MatMul" and n.input[0] == nodes[0].input[0] for n in nodes)
    weights = [E._const_value(model, n.input[1]) for n in nodes]  # [hidden, out] each
    packed = np.concatenate(weights, axis=1)
    if wrong_kv_head is not None:
        from mlx_tinyllama.synthetic import PRESETS

        d = weights[1].shape[1] // PRESETS["tiny"].num_key_value_heads
        start = weights[0].shape[1]
        packed[:, start + wrong_kv_head * d:start + (wrong_kv_head + 1) * d] = packed[:, start:start + d]
    w = E._const(model, f"fused_qkv_weight_{layer}", packed)
    sizes = E._const(model, f"fused_qkv_sizes_{layer}", np.array([x.shape[1] for x in weights], np.int64))
    out = f"fused_qkv_{layer}"
    at = min(list(model.graph.node).index(n) for n in nodes)
    for n in nodes:
        model.graph.node.remove(n)
    model.graph.node.insert(at, onnx.helper.make_node("Split", [out, sizes], [n.output[0] for n in nodes], axis=-1))
    model.graph.node.insert(at, onnx.helper.make_node("MatMul", [nodes[0].input[0], w], [out]))
    return out


def run_fused(exported, tmp_path, wrong_kv_head=None) -> tuple[int, dict]:
    import onnx
    from safetensors.numpy import save_file

    import onnx_engine as E
    from mlx_tinyllama.trace import main as cli

    base, names = exported
    model = onnx.ModelProto()
    model.CopyFrom(base)  # the module's export stays as it is
    fused = fuse_qkv(model, 0, wrong_kv_head)
    values = E.run(E.expose(model, list(names) + [fused]), C.IDS)
    qkv = {f"layers.0.{s}" for s in QKV}
    mapping = {v: t for v, t in names.items() if t not in qkv}
    mapping[fused] = [f"layers.0.{s}" for s in QKV]
    dump, map_path, out = tmp_path / "ort-fused.safetensors", tmp_path / "ort-fused.map.json", tmp_path / "r.json"
    save_file({v: np.ascontiguousarray(values[v][0]) for v in mapping}, str(dump))
    map_path.write_text(json.dumps(mapping))
    rc = cli(["compare", "--against", str(dump), "--map", str(map_path), "--model", "synthetic:tiny",
              "--token-ids", ",".join(map(str, C.IDS)), "--json", str(out)])
    return rc, json.loads(out.read_text())


@needs_torch
def test_ort_fused_qkv_matches_with_every_stage(exported, tmp_path):
    rc, result = run_fused(exported, tmp_path)
    assert rc == 0 and result["verdict"]["line"] == "match: 47/47 stages", result["verdict"]["line"]
    assert {f"layers.0.{s}" for s in QKV} <= set(result["coverage"]["compared"])


@needs_torch
def test_ort_fused_qkv_with_a_misplaced_kv_head_diverges_at_attn_k(exported, tmp_path):
    rc, result = run_fused(exported, tmp_path, wrong_kv_head=1)
    assert rc == 1 and result["first_divergence"]["tap"] == "layers.0.attn.k"
    ok = {s["tap"]: s["ok"] for s in result["stages"]}
    assert ok["layers.0.attn.q"] and ok["layers.0.attn.v"]
    assert result["first_divergence"]["pattern"]["evidence"]["wrong_heads"] == [1]
    assert "of their fused_qkv_0" in result["first_divergence"]["hint"]

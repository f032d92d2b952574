"""Field suite, ONNX Runtime: the synthetic Llama exported by torch's dynamo exporter, run by
onnxruntime at its default optimisation level in fp32 and in fp16 by both converters in common
use (onnxconverter-common's float16 conversion, and an fp16 export), compared as a user would
with `trace compare --against DUMP --map MAP --model M`: clean runs exit 0, graph faults exit 1
at the stage where each first shows (field_cases.py lists them with their expected stage)."""

from __future__ import annotations

import importlib.util
import os

import pytest

# CI sets MLX_TINYLLAMA_REQUIRE_REFERENCE=1: there a missing ONNX stack fails instead of skipping.
_MISSING = [m for m in ("onnx", "onnxruntime", "onnxscript", "onnxconverter_common") if importlib.util.find_spec(m) is None]
if _MISSING:
    if os.environ.get("MLX_TINYLLAMA_REQUIRE_REFERENCE") == "1":
        raise ImportError(f"MLX_TINYLLAMA_REQUIRE_REFERENCE=1 but {', '.join(_MISSING)} missing: pip install -e '.[dev]'")
    pytest.skip(f"needs the dev extra ({', '.join(_MISSING)} missing)", allow_module_level=True)

import field_cases as C  # noqa: E402
from conftest import needs_torch  # noqa: E402

CASES = C.onnx_cases()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("field_onnx")


def _param(case):
    marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
    return pytest.param(case, id=f"{case.name}[{case.settings}]", marks=marks)


@needs_torch
@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_onnx_case(case, work):
    got = C.outcome(case, work)
    assert not case.misses(got), "; ".join(case.misses(got)) + "\n" + got.output[-3000:]


@needs_torch
def test_map_is_read_from_structure_not_value_names(work):
    """Every value renamed (`v0`, `v1`, ...): the map finds the same values under their new names."""
    import onnx

    import onnx_engine as E

    model, names = C.onnx_graphs(work / "onnx", "tiny")["export-float32"]
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    made = [o for n in renamed.graph.node for o in n.output]
    new = {v: f"v{k}" for k, v in enumerate(made)}
    for n in renamed.graph.node:
        n.input[:] = [new.get(i, i) for i in n.input]
        n.output[:] = [new[o] for o in n.output]
    for o in renamed.graph.output:
        o.name = new.get(o.name, o.name)
    del renamed.graph.value_info[:]
    assert E.tap_map(renamed) == {new[v]: tap for v, tap in names.items()}


@needs_torch
def test_map_names_every_stage_once_and_matches_transformers(work):
    """The mapped ORT values are transformers' own taps (reference/hf.py): the map is right, not
    only self-consistent."""
    import numpy as np

    import onnx_engine as E
    from mlx_tinyllama.reference.hf import capture, load_hf_model
    from mlx_tinyllama.synthetic import materialize
    from mlx_tinyllama.taps import tap_names

    model, names = C.onnx_graphs(work / "onnx", "tiny")["export-float32"]
    assert sorted(names.values()) == sorted(tap_names(2))
    values = E.run(model, C.IDS)
    ref, _ = capture(load_hf_model(materialize("tiny", 0), "float32"), C.IDS)
    for v, tap in names.items():
        ours, theirs = values[v][0], ref[tap].numpy()
        if tap.endswith("scores_masked"):  # -inf/finfo.min above the diagonal on both sides
            ours, theirs = np.maximum(ours, -1e30), np.maximum(theirs, -1e30)
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5, err_msg=tap)


@needs_torch
def test_gqa_repeat_is_found_from_the_structure(work):
    """K and V after the GQA repeat ([H, T, D]): query head h reads KV head h // n_rep, found by
    following k_rope / v through the repeat's ops (mapped to attn.k_rep/v_rep where the tap table
    has those taps; left unmapped where it does not, as now)."""
    import numpy as np
    import onnx

    import onnx_engine as E

    model, names = C.onnx_graphs(work / "onnx", "tiny")["export-float32"]
    g = E.Graph(model)
    tap = {t: v for v, t in names.items()}
    reps = [g.repeated(tap[f"layers.{i}.attn.{w}"]) for i in (0, 1) for w in ("k_rope", "v")]
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # the shared graph stays as it is
    values = E.run(E.expose(copy, reps), C.IDS)
    for i in (0, 1):
        for w, rep in zip(("k_rope", "v"), reps[2 * i:2 * i + 2]):
            before = values[tap[f"layers.{i}.attn.{w}"]]
            assert values[rep].shape == (1, 4, len(C.IDS), 16)
            np.testing.assert_array_equal(values[rep], np.repeat(before, 2, axis=1))

"""Field suite, ONNX Runtime: the synthetic Llama exported by torch's dynamo exporter, run by
onnxruntime at its default optimisation level in fp32 and in fp16 by both converters in common
use (onnxconverter-common's float16 conversion, and an fp16 export), compared as a user would
with `trace compare --against DUMP --map MAP --model M`: clean runs exit 0, graph faults exit 1
at the stage where each first shows (cases.py lists them with their expected stage)."""

from __future__ import annotations

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxconverter_common")

import cases as C  # noqa: E402
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
    assert (got.exit, got.tap) == (case.want_exit, case.want_tap), got.output[-3000:]
    if case.want_exit == 0:
        assert got.coverage == "43/43 stages", got.coverage  # every stage of synthetic:tiny compared
        assert got.worst_ratio is not None and got.worst_ratio <= 1.0

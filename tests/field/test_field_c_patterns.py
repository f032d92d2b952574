"""Issue 22's "done when" on decode steps, on the C engine (one token a step, kit/tap_dump.h): the
hint of a kernel fault leads with the error's shape and the kernel, as on a prefill dump. The
engine's matmul that skips its last partial block of 16 output rows is read from a single token
row as columns ("columns 0-159 match, columns 160-171 are zero"), the GQA fault as heads."""

from __future__ import annotations

import pytest

import c_engine as CE
import field_cases as C
from conftest import require_tool


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    require_tool(CE.compiler(), "C compiler (cc)")
    return tmp_path_factory.mktemp("field_c_patterns")


@pytest.mark.parametrize("fault, tap, pattern, lead", [
    ("PARTIAL_ROWS", "layers.0.mlp.gate", "columns_from",
     "columns 0-159 match, columns 160-171 are zero: the gate_proj matmul stops at column 160"),
    ("KV_HEAD", "layers.1.attn.scores", "heads",
     "heads 1-2 of 4 differ, heads 0, 3 match: the GQA broadcast"),
])
def test_step_hint_leads_with_the_shape_and_the_kernel(fault, tap, pattern, lead, work):
    case = next(c for c in C.c_cases() if c.name == f"-DFAULT_{fault}")
    rc, data, _ = C.run_compare(case.build(work), work / f"{fault}.json")
    first = data["first_divergence"]
    assert rc == 1 and first["tap"] == tap, first
    assert first["pattern"]["name"] == pattern and first["hint"].startswith(lead), first["hint"][:300]


def test_clean_steps_have_no_shape(work):
    case = next(c for c in C.c_cases() if c.name == "clean")
    rc, data, _ = C.run_compare(case.build(work), work / "clean.json")
    assert rc == 0 and data["first_divergence"] is None

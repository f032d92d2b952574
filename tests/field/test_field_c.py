"""Field suite, a C engine that decodes one token at a time (tests/field/decode_engine.c, like
llama2.c's run.c) and dumps every step with kit/tap_dump.h, compared through `trace compare
--against-steps DIR --model M` (docs/localize.md): clean exit 0; each compile-time fault exit 1
at the (position, stage) where it first shows (field_cases.C_FAULTS)."""

from __future__ import annotations

import pytest

import c_engine as CE
import field_cases as C
from conftest import require_tool

CASES = C.c_cases()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    require_tool(CE.compiler(), "C compiler (cc)")
    return tmp_path_factory.mktemp("field_c")


def _param(case):
    marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
    return pytest.param(case, id=f"{case.name}[{case.settings}]", marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_c_case(case, work):
    got = C.outcome(case, work)
    assert not case.misses(got), "; ".join(case.misses(got)) + "\n" + got.output[-3000:]


@pytest.mark.xfail(strict=True, reason="issue 21: a step that reads one key too many is told the KV cache "
                                       "does not hold every past position")
def test_extra_key_note_names_the_extra_key(work):
    """The note of an engine that reads one key past the last position must not blame a cache that
    is missing positions (it has one too many)."""
    case = next(c for c in CASES if c.name == "-DFAULT_EXTRA_KEY")
    rc, data, _ = C.run_compare(case.build(work), work / "extra_key.json")
    note = data["first_divergence"]["note"]
    assert rc == 1 and "2 key positions, 1 expected" in note
    assert "does not hold every past position" not in note, note

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


def _first_note(work, fault: str) -> str:
    case = next(c for c in CASES if c.name == f"-DFAULT_{fault}")
    rc, data, _ = C.run_compare(case.build(work), work / f"{fault}.json")
    assert rc == 1
    return data["first_divergence"]["note"]


def test_ring_cache_note_names_the_missing_positions(work):
    """A 4-slot ring cache at position 4 holds 4 of 5 keys: the note says the cache lost positions."""
    note = _first_note(work, "RING4")
    assert "4 key positions, 5 expected" in note and "does not hold every past position" in note, note


def test_extra_key_note_names_the_extra_key(work):
    """An engine that reads one key past the last position has one key too many: the note must
    say so, not blame a cache that is missing positions."""
    note = _first_note(work, "EXTRA_KEY")
    assert "key" in note and "does not hold every past position" not in note, note


def test_field_table_refuses_an_empty_selection(capsys):
    """scripts/field_table.py with an --engine that matches nothing: exit 2 and the engines' names,
    not an empty table that reads as a pass."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "field_table.py"
    spec = importlib.util.spec_from_file_location("field_table", path)
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    assert table.main(["--engine", "no such engine"]) == 2
    err = capsys.readouterr().err
    assert "onnxruntime" in err and "C decode" in err

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


def _result(work, fault: str) -> dict:
    case = next(c for c in CASES if c.name == f"-DFAULT_{fault}" and "float16" not in c.settings)
    rc, data, _ = C.run_compare(case.build(work), work / f"{fault}.json")
    assert rc == 1
    return data


def _first_note(work, fault: str) -> str:
    return _result(work, fault)["first_divergence"]["note"]


def _keys(data: dict, position: int) -> str:
    return data["steps"][position]["localized"]["keys"]


def test_kv_late_is_localized_at_every_step_with_the_keys_it_read(work):
    """Layer 1 writes K/V one slot late: every step's scores, replayed from the keys its own step
    dumps hold, are localized, and the words say which key sits where (issue 22 item 3)."""
    data = _result(work, "KV_LATE")
    assert [s["localized"]["stage"] for s in data["steps"]] == ["layers.1.attn.scores"] * len(C.C_IDS)
    assert "do not hold this step's own key (position 0) in the last column, which is zeros" in _keys(data, 0)
    assert ("step 3's scores used the key of position 0 in column 1 where its own cache holds position 1 "
            "(columns 1-3 hold positions 0-2); column 0 is zeros (a slot never written); position 3 (this step's "
            "own key) is never read: the KV cache is written one position late") in _keys(data, 3)
    assert data["first_divergence"]["hint"].startswith(_keys(data, 0))


def test_ring_and_extra_key_are_localized_with_which_way(work):
    """A ring of 4 slots drops position 0 at position 4; an extra key is one past the current one."""
    ring = _result(work, "RING4")
    assert ring["localized"]["position"] == 4 and ring["localized"]["stage"] == "layers.0.attn.scores"
    assert "hold only the last 4 keys (positions 1-4): position 0 was dropped" in ring["localized"]["keys"]
    assert "hold only the last 4 keys (positions 2-5): positions 0-1 were dropped" in _keys(ring, 5)
    extra = _result(work, "EXTRA_KEY")
    assert "read one key past the current position 0: column 1 is zeros" in extra["localized"]["keys"]
    assert "read one key past the current position 5: column 6 is zeros" in _keys(extra, 5)
    assert {s["position"] for s in extra["not_replayed"]} == set(range(len(C.C_IDS)))  # their extra value: in no dump


def test_kv_head_is_localized_at_every_step(work):
    """Query head h reading KV head h % n_kv in layer 1: localized at every step (was: position 0
    only, whose one key a step dump holds), the diagnosis naming the mapping."""
    data = _result(work, "KV_HEAD")
    assert [s["localized"]["stage"] for s in data["steps"]] == ["layers.1.attn.scores"] * len(C.C_IDS)
    assert data["first_divergence"]["diagnosis"][0]["transform"] == "kv_head_mapping"


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

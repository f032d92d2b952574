"""Run every case of the field suite (tests/field/field_cases.py: ONNX Runtime, the C decode engine)
and print the table of docs/field.md: engine, case, settings, the verdict expected, the exit
code, the first divergence, the coverage, for clean runs the worst ratio to tolerance, and for
faults what `localize` made of them (the stage replay blames, the transform that explains it).

    PYTHONPATH=. python scripts/field_table.py                # every case
    PYTHONPATH=. python scripts/field_table.py --engine C     # engines whose name contains "C"

A case whose outcome differs from the expected one is marked; one marked `xfail` in the suite
(a verdict bug of issue 21 being fixed elsewhere) says which bug. Exit 1 when an outcome
differs and the case is not xfail (or a case could not run), 2 when --engine selects nothing, else 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "field"))

import field_cases as C  # noqa: E402


def _ratio(r: float | None) -> str:
    return "—" if r is None else f"{r:.3g}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", default="", help="only engines whose name contains this")
    args = ap.parse_args(argv)
    chosen = [c for c in C.all_cases() if args.engine in c.engine]
    if not chosen:  # an empty table would read as "nothing went wrong"
        engines = sorted({c.engine for c in C.all_cases()})
        print(f"error: no engine's name contains {args.engine!r}; engines: {', '.join(engines)}", file=sys.stderr)
        return 2
    rows, unexpected = [], 0
    with tempfile.TemporaryDirectory(prefix="field_table_") as tmp:
        work = Path(tmp)
        for case in chosen:
            try:
                got = C.outcome(case, work)
            except FileNotFoundError as e:  # no C compiler: say so, do not pass
                rows.append(f"| {case.engine} | {case.name} | {case.settings} | not run: {e} | | | | | | |")
                unexpected += 1
                continue
            want = f"exit {case.want_exit}" + (f" at {case.want_tap}" if case.want_tap else "")
            misses = case.misses(got)
            ok = not misses
            status = "as expected" if ok else (f"**xfail** ({'; '.join(misses)}): {case.xfail}" if case.xfail
                                               else f"**UNEXPECTED**: {'; '.join(misses)}")
            if case.xfail and ok:
                status = "as expected (**xfail no longer fails**: remove its mark)"
            unexpected += not ok and not case.xfail
            rows.append(f"| {case.engine} | {case.name} | {case.settings} | {want} | {got.exit} | "
                        f"{got.tap or '—'} | {got.coverage} | {_ratio(got.worst_ratio)} | {got.localized or '—'} | "
                        f"{got.diagnosis or '—'} | {status} |")
            print(rows[-1], file=sys.stderr, flush=True)
    print("| engine | case | settings | expected | exit | first divergence | coverage | worst ratio (clean) "
          "| localized | diagnosis | outcome |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    return 1 if unexpected else 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())

"""`vectors`: kernel conformance vectors, one op at a time (docs/vectors.md).

    vectors write DIR [--dtype float16] [--model M] [--quick]        inputs, golden outputs, manifest.json
    vectors run DIR --engine module:function --out RESULTS.safetensors   a Python engine's outputs
    vectors check DIR --results RESULTS.safetensors [--json OUT] [--report x.html]

`check` exits 0 when every op passes, 1 when one fails, 2 for bad input.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .. import cli_common, contracts, outputs
from ..cli_common import fmt
from ..contracts import READ_DIR, READ_FILE, WRITE_DIR, WRITE_FILE, PathOption
from ..errors import UserError
from ..results import ResultHeader


_VECTORS = PathOption("DIR", READ_DIR, implies=contracts.directory_files)
SPECS = {  # one per subcommand
    "write": contracts.Spec(paths=(PathOption("DIR", WRITE_DIR), cli_common.MODEL_PATH),
                            unused=cli_common.MODEL_UNUSED),
    "run": contracts.Spec(paths=(_VECTORS, PathOption("--engine", READ_FILE, implies=contracts.engine_file,
                                                      value_is_path=False),
                                 PathOption("--out", WRITE_FILE))),
    "check": contracts.Spec(paths=(_VECTORS, PathOption("--results", READ_FILE), cli_common.JSON_PATH,
                                   PathOption("--report", WRITE_FILE))),
}


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="vectors_command", metavar="SUBCOMMAND", required=True)
    w = sub.add_parser("write", help="write inputs, golden outputs and manifest.json into DIR",
                       description="Write one safetensors file per op family and manifest.json into DIR.")
    w.add_argument("dir", metavar="DIR", help="a new or empty directory (or an earlier vectors directory)")
    w.add_argument("--dtype", default="float16", help="dtype of the inputs: float16 (default), bfloat16, float32")
    w.add_argument("--model", default="synthetic",
                   help="model whose weights feed the inputs: directory, .gguf, HF repo id or "
                        "synthetic[:preset][:seed=N] (default: synthetic = TinyLlama-1.1B shape)")
    w.add_argument("--download", action="store_true", help="allow downloading a Hugging Face repo id")
    w.add_argument("--quick", action="store_true", help="a subset that runs in seconds on 2 CPU cores")
    w.set_defaults(_vectors=_write, _spec=SPECS["write"])

    r = sub.add_parser("run", help="run a Python engine on every case and write its results file",
                       description="Call ENGINE(op, inputs, params) once per case; write the outputs keyed by "
                                   "the manifest's output keys.")
    r.add_argument("dir", metavar="DIR")
    r.add_argument("--engine", required=True, metavar="MODULE:FUNCTION",
                   help="module:function or path/to/file.py:function (e.g. mlx_tinyllama.vectors.engine:fused)")
    r.add_argument("--out", required=True, metavar="RESULTS.safetensors", help="where to write the outputs")
    _add_filters(r)
    r.set_defaults(_vectors=_run, _spec=SPECS["run"])

    c = sub.add_parser("check", help="compare an engine's results with the golden outputs; name the failures",
                       description="Per op: pass/fail, the first failing shape and its failure pattern. "
                                   "Exit 0: all pass; 1: some op fails; 2: bad input.")
    c.add_argument("dir", metavar="DIR")
    c.add_argument("--results", required=True, metavar="RESULTS.safetensors",
                   help="the engine's outputs, keyed by the manifest's output keys")
    _add_filters(c)
    c.add_argument("--json", metavar="OUT.json", help="write the full result (every case) as JSON")
    c.add_argument("--report", metavar="PATH.html", help="write a self-contained HTML page of the result")
    c.add_argument("--all", action="store_true", help="list every case, not only the failing ones")
    c.set_defaults(_vectors=_check, _spec=SPECS["check"])


def main(args) -> int:
    return args._vectors(args)


def _list(text: str | None, option: str) -> list[str] | None:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UserError(f"{option}: give names, comma-separated, e.g. {option} "
                        + ("matmul,rope" if option == "--ops" else "'matmul.*.M33'"))
    return items


def _write(args) -> int:
    from ..vectors.write import write_vectors

    manifest = write_vectors(args.dir, args.model, args.dtype, args.quick, args.download)
    counts: dict[str, int] = {}
    for case in manifest["cases"]:
        counts[case["op"]] = counts.get(case["op"], 0) + 1
    size = sum(p.stat().st_size for p in Path(args.dir).iterdir())
    print(f"wrote {len(manifest['cases'])} cases ({manifest['dtype']}, model {args.model}"
          f"{', quick' if args.quick else ''}) to {args.dir} ({size / 1e6:.0f} MB): "
          + ", ".join(f"{op} {n}" for op, n in counts.items()))
    return 0


def _run(args) -> int:
    from ..vectors.runner import load_engine, run_engine, write_results
    from ..vectors.store import Vectors

    vectors = Vectors(args.dir)
    engine = load_engine(args.engine)
    results, skipped = run_engine(vectors, engine, _list(args.ops, "--ops"), _list(args.cases, "--cases"))
    write_results(args.out, results, vectors)
    print(f"wrote {len(results)} outputs of {args.engine} to {args.out}"
          + (f"; not implemented by the engine: {', '.join(skipped)}" if skipped else ""))
    if skipped:
        print(f"check them with: vectors check {args.dir} --results {args.out} --ops "
              + ",".join(sorted({c['op'] for c in vectors.cases} - set(skipped))), file=sys.stderr)
    return 0


def _check(args) -> int:
    from ..vectors.check import check, load_results
    from ..vectors.store import Vectors

    vectors = Vectors(args.dir)
    result = check(vectors, load_results(args.results), _list(args.ops, "--ops"), _list(args.cases, "--cases"))
    result["results"] = str(args.results)
    if args.json:
        header = ResultHeader.without_model("vectors", result.get("dtype"), None).as_dict()
        outputs.write_json(args.json, {**header, **result})  # the result's model: the vectors' own
    if args.report:
        from ..vectors.html import render

        outputs.write_text(args.report, render(result, str(args.results)))
    print_result(result, args.all)
    return 0 if result["pass"] else 1


def print_result(result: dict, show_all: bool = False) -> None:
    from rich.table import Table

    con = cli_common.console()
    t = Table(title=f"{result['vectors']} ({result['dtype']}, model {result['model']['spec']}): per op")
    numeric = ("cases", "failed", "worst NMSE/tol", "worst NMSE/u²")
    for col in ("op", "cases", "failed", "status", "first failing shape", "pattern", "detail") + numeric[2:]:
        t.add_column(col, justify="right" if col in numeric else "left")
    for s in result["ops"]:
        t.add_row(s["op"], str(s["cases"]), str(s["failed"]), "pass" if s["pass"] else "FAIL",
                  s["first_failing_shape"] or "", s["pattern"] or "", s["detail"] or "", fmt(s["worst_ratio"]),
                  fmt(s["worst_nmse_u2"]), style=None if s["pass"] else "bold red")
    con.print(t)
    rows = [c for c in result["cases"] if show_all or not c["pass"]]
    if rows:
        t = Table(title="every case" if show_all else "failing cases")
        for col in ("case", "shape", "NMSE", "tolerance", "status", "pattern", "detail"):
            t.add_column(col)
        for c in rows:
            t.add_row(c["name"], c["shape"], fmt(c["nmse"]), fmt(c["tolerance"]), "pass" if c["pass"] else "FAIL",
                      c.get("pattern") or "", c.get("detail") or "", style=None if c["pass"] else "red")
        con.print(t)
    if result["ignored_keys"]:
        con.print(f"ignored {len(result['ignored_keys'])} result keys the manifest does not name, "
                  f"e.g. {', '.join(result['ignored_keys'][:3])}")
    con.print("[bold]all ops pass[/bold]" if result["pass"] else
              "[bold red]FAIL[/bold red]: " + "; ".join(f"{s['op']} at {s['first_failing_shape']}: {s['pattern']}"
                                                       for s in result["ops"] if not s["pass"]))


def _add_filters(p) -> None:
    """--ops and --cases, the same for `run` and `check`."""
    p.add_argument("--ops", metavar="LIST", help="only these ops, comma-separated (e.g. matmul,rope)")
    p.add_argument("--cases", metavar="GLOBS", help="only cases whose names match, comma-separated "
                                                   "(e.g. 'matmul.*.M33,rope.*')")

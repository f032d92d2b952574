"""`gguf-check`: is this GGUF what its Hugging Face checkpoint holds?

    gguf-check --gguf FILE --hf HF_DIR [--json PATH] [--all]

Every tensor (names, shapes, values within the GGUF type's rounding), the Q/K permutation (a
tensor written in another row order is named as such), tied weights and the metadata
(gguf_check.py). A compare of a run against a log made from the same GGUF cannot see a
conversion fault: this command can.

Exit code 0: everything checked is equal; 1: a mismatch (the first ones named); 2: bad input.
"""

from __future__ import annotations

from pathlib import Path

from .. import cli_common, contracts
from ..contracts import MODEL, READ_FILE, PathOption
from ..errors import UserError

# --hf is read as a model directory: no output may land in it or on one of its files.
SPEC = contracts.Spec(paths=(PathOption("--gguf", READ_FILE), PathOption("--hf", MODEL), cli_common.JSON_PATH))

SHOWN = 8  # mismatches printed before "... and N more" (--all: every one)


def add_arguments(p) -> None:
    p.add_argument("--gguf", required=True, metavar="FILE", help="the GGUF to check")
    p.add_argument("--hf", required=True, metavar="HF_DIR",
                   help="the Hugging Face checkpoint it was converted from (config.json, *.safetensors)")
    p.add_argument("--json", metavar="PATH", help="write every check as JSON")
    p.add_argument("--all", action="store_true", help="print every mismatch, not only the first ones")


def _check_paths(args) -> None:
    """--json must not overwrite an input: neither the GGUF nor a file of the HF directory (the CLI
    checks the SPEC before this; these two stay as the command's own words)."""
    if args.json:
        out = Path(args.json).resolve()
        if out == Path(args.gguf).resolve():
            raise UserError(f"--json {args.json} is the --gguf input: choose another path")
        if Path(args.hf).resolve() in out.parents:
            raise UserError(f"--json {args.json} is inside the --hf checkpoint directory: choose another path")


def main(args) -> int:
    _check_paths(args)
    from ..gguf_check import check_gguf  # lazy: MLX loads here, after the arguments are checked

    report = check_gguf(args.gguf, args.hf)
    result = report.as_dict()
    if args.json:
        from ..results import ResultHeader

        cli_common.write_json(args.json, {**ResultHeader.without_model("gguf-check", None, None).as_dict(), **result})
    _print(report, show_all=args.all)
    return 0 if report.status == "equal" else 1


def _print(report, show_all: bool) -> None:
    counts = report.as_dict()["counts"]
    print(f"gguf-check: {report.gguf} against {report.hf}")
    print(f"tensors: {counts['tensors_equal']}/{counts['tensors']} equal within their type's rounding; "
          f"metadata: {counts['metadata_equal']}/{counts['metadata']} equal")
    if report.mismatches:
        shown = report.mismatches if show_all else report.mismatches[:SHOWN]
        print(f"differs: {len(report.mismatches)} mismatch(es)")
        for line in shown:
            print(f"  {line}")
        if len(shown) < len(report.mismatches):
            print(f"  ... and {len(report.mismatches) - len(shown)} more (--all, or --json)")
    else:
        print("equal: every checked tensor and metadata key matches the HF checkpoint")
    if report.not_checked:
        print(f"not checked ({len(report.not_checked)}):")
        for line in report.not_checked:
            print(f"  {line}")

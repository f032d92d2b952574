"""`onnx`: an ONNX Llama run by ONNX Runtime, every stage exposed, against this package's reference.

    onnx --model model.onnx --hf HF_DIR [prompt options] [--json x.json] [--report x.html]

Reads the graph, maps its values to taps by structure (onnx_engine.py: module paths, op types,
data flow), matches what the structure does not settle by value against the reference
(refs/suggest.py, as `compare --suggest-map`), adds the mapped values as graph outputs, runs ORT
at its default optimisation level on the prompt's ids, and compares stage by stage with the
verdict of `compare`. The map's lines say which came from the structure and which from values.

Exit code 0: every stage matches; 1: a stage diverges; 2: bad input (not ONNX, a missing extra).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .. import cli_common, contracts
from ..compare import compare, judging_basis, run_side
from ..contracts import READ_FILE, PathOption
from ..localize import localize
from ..refs.layout import expected_shape
from ..refs.side import Side
from ..results import ResultHeader
from ..taps import tap_names
from ..tolerances import Tolerances

# Values shape inference offers to the value matching, at most: a graph has a few per node, and
# each one matched costs a comparison with every unsettled tap of its size.
MAX_VALUE_CANDIDATES = 4096

SPEC = contracts.Spec(
    paths=(PathOption("--model", READ_FILE), PathOption("--hf", contracts.MODEL), cli_common.JSON_PATH,
           *cli_common.REPORT_PATHS, cli_common.PROMPT_PATH),
    unused=cli_common.REPORT_UNUSED,
)


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, metavar="FILE.onnx", help="the ONNX graph ONNX Runtime runs")
    p.add_argument("--hf", required=True, metavar="HF_DIR",
                   help="the reference weights (a Hugging Face checkpoint, or synthetic:NAME)")
    cli_common.add_engine_comparison_arguments(p, "write the comparison as JSON (with the map: onnx_map)")


def _batchless(x: np.ndarray) -> np.ndarray:
    return x[0] if x.ndim >= 2 and x.shape[0] == 1 else x  # ORT's leading batch axis of one


def _candidates(typed, names, unsettled, reference, cfg, n_tokens) -> list[str]:
    """The graph's float values (`typed`: onnx_engine.float_values) not mapped by structure whose
    size is that of an unsettled tap: what the value matching looks at."""
    sizes = {int(np.prod(expected_shape(t, cfg, n_tokens))) for t in unsettled if t in reference.tensors}
    out = []
    for v, shape in typed.items():
        if v not in names and shape is not None and int(np.prod(shape)) in sizes:
            out.append(v)
    return out[:MAX_VALUE_CANDIDATES]


def main(args) -> int:
    from ..onnx_engine import require_onnx

    require_onnx()  # before the model loads: one line naming the extra
    from ..onnx_engine import expose, float_values, load_graph, run, structure_map
    from ..refs.suggest import describe, suggest_map

    path = Path(args.model)
    graph = load_graph(path)
    tol = Tolerances.from_overrides(args.tol)
    names, unsettled = structure_map(graph)
    args.model, args.dtype, args.policy, args.kernels, args.download = args.hf, "float32", "hf", None, False
    lm = cli_common.load_model(args)
    tol.check_patterns(lm.config.num_hidden_layers)
    cfg = lm.config.as_dict()
    prompt = cli_common.prompt_for(args, lm)
    n = len(prompt.ids)
    typed = float_values(graph)  # a value shape inference cannot type cannot be made an output
    for v in [v for v in names if v not in typed]:
        unsettled[names.pop(v)] = f"its value {v} is not a float tensor ONNX shape inference can type"
    mapped = set(names.values())  # a graph without module paths finds no layers: its taps are all left to values
    for tap in tap_names(lm.config.num_hidden_layers):
        if tap not in mapped and tap not in unsettled:
            unsettled[tap] = "not found by structure (no module path of this stage in the graph)"
    reference = run_side(lm, prompt.ids)
    candidates = []
    if unsettled:
        candidates = _candidates(typed, names, unsettled, reference, cfg, n)
    values = run(expose(graph, list(names) + candidates), prompt.ids, path.resolve().parent)
    tensors = {tap: _batchless(values[v]) for v, tap in names.items()}
    dtype = str(values[next(iter(names))].dtype) if names else "float32"
    value_lines = []
    if candidates:
        theirs = {v: _batchless(values[v]).astype(np.float32) for v in candidates}
        ours = {t: x for t, x in reference.tensors.items() if t in unsettled}
        value_lines = [ln for ln in suggest_map(theirs, ours, cfg, n, dtype, lm.dtype, tol) if ln["tap"]]
        for ln in value_lines:
            # Only a value within tolerance of that one tap is compared: a "likely" (closest, but over
            # its tolerance) may be another stage's value, and judging it would be a false alarm on a
            # correct graph. It is listed, and the tap counts as not compared.
            if ln["confidence"] == "match":
                tensors[ln["tap"]] = theirs[ln["name"]]
    candidate = Side(name=f"ONNX Runtime ({path.name})", kind="dump", dtype=dtype, ids=list(prompt.ids),
                     n_tokens=n, config=cfg, provenance={"onnx": str(path)})
    for tap, x in tensors.items():
        candidate.tensors[tap] = np.asarray(x, np.float32)
        candidate.tensor_dtypes[tap] = str(x.dtype)
    by_value = {ln["tap"] for ln in value_lines if ln["confidence"] == "match"}
    onnx_map = {"structure": {t: v for v, t in names.items()},
                "value": [{k: ln[k] for k in ("name", "tap", "confidence", "ratio", "note")} for ln in value_lines],
                "unmapped": {t: r for t, r in sorted(unsettled.items()) if t not in by_value}}
    print(f"map: {len(names)} taps by structure, {len(by_value)} by value, "
          f"{len(onnx_map['unmapped'])} not found", file=sys.stderr)
    for ln in value_lines:
        print(("  by value: " if ln["confidence"] == "match" else "  not compared (value over tolerance): ")
              + describe(ln), file=sys.stderr)
    for tap, why in list(onnx_map["unmapped"].items())[:8]:
        print(f"  not mapped: {tap} ({why})", file=sys.stderr)
    basis = judging_basis(candidate)
    result = compare(candidate, [reference], tol, cfg, n, basis)
    localize(result, candidate, [reference], lm, tol, n, lm.config.num_hidden_layers)
    result["onnx_map"] = onnx_map
    return cli_common.finish_comparison(args, ResultHeader.of_run("onnx", lm, prompt), result, lm)

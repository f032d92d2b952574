"""`run` (the default command): one prefill with taps, a table of the stages in
forward order, and the top-k next tokens. `--json`, `--dump`, `--compare`,
`--report` write or check what a user's engine must reproduce."""

from __future__ import annotations


from .. import cli_common, contracts
from ..contracts import READ_FILE, WRITE_FILE, PathOption, Unused
from ..errors import UserError
from ..results import ResultHeader
from ..cli_common import fmt

SPEC = contracts.Spec(
    paths=(cli_common.MODEL_PATH, cli_common.PROMPT_PATH, cli_common.JSON_PATH,
           PathOption("--dump", WRITE_FILE, parts=contracts.dump_parts),
           PathOption("--compare", READ_FILE, implies=contracts.dump_files), *cli_common.REPORT_PATHS),
    unused=(Unused("--dump-shard-mb", lambda a: bool(a.dump), "without --dump"),
            Unused("--top-k", lambda a: not a.compare, "with --compare (a comparison shows no next tokens)"),
            *cli_common.MODEL_UNUSED, *cli_common.PROMPT_UNUSED, *cli_common.REPORT_UNUSED),
)

def add_arguments(p) -> None:
    cli_common.add_model_arguments(p)
    cli_common.add_prompt_arguments(p)
    p.add_argument("--taps", action="append", metavar="GLOB",
                   help="stages to record, by glob (repeatable): 'layers.0.*', '*.attn.probs', 'logits', '*' "
                        f"(default: {' '.join(cli_common.DEFAULT_TAPS)})")
    p.add_argument("--top-k", type=int, default=10, help="how many next-token candidates to show (default 10)")
    p.add_argument("--json", metavar="PATH", help="write tokens, per-tap stats and top-k as JSON")
    p.add_argument("--dump", metavar="PATH.safetensors", help="write the full tensors of the selected taps, "
                   "streamed layer by layer: beyond one shard as PATH-00001.safetensors, ... + PATH.index.json")
    p.add_argument("--dump-shard-mb", type=float, default=1024, metavar="MB",
                   help="--dump: start a new shard after a layer once this many MB are pending (default 1024); "
                        "bounds the memory the dump holds")
    p.add_argument("--compare", metavar="REF", help="compare this run with a reference (see the compare command)")
    p.add_argument("--tol", action="append", metavar="[TAP:]METRIC=V",
                   help="with --compare: override a tolerance (repeatable): nmse=1e-6, layers.0.attn.probs:nmse=1e-4")
    cli_common.add_report_arguments(p, "this run")


def main(args) -> int:
    if args.top_k < 1:
        raise UserError("--top-k must be at least 1")
    if args.dump and not args.dump.endswith(".safetensors"):
        raise UserError("--dump writes safetensors: give a path ending in .safetensors")
    _check_option_combinations(args)
    if args.dump and not args.dump_shard_mb > 0:
        raise UserError("--dump-shard-mb must be a positive number of MB")
    from ..tolerances import Tolerances

    Tolerances.from_overrides(args.tol)  # a malformed --tol fails before the model loads
    lm = cli_common.load_model(args)
    prompt = cli_common.prompt_for(args, lm)
    if args.compare:
        from ..compare import compare_run

        tolerances = Tolerances.from_overrides(args.tol, lm.config.num_hidden_layers)
        result = compare_run(lm, prompt.ids, args.compare, tolerances)
        return cli_common.finish_comparison(args, ResultHeader.of_run("compare", lm, prompt), result, lm)

    patterns = args.taps or list(cli_common.DEFAULT_TAPS)
    if args.dump:
        taps, logits, dumped = _forward_dump(lm, prompt.ids, patterns, args.dump, args.dump_shard_mb)
    else:
        taps, logits = cli_common.forward(lm, prompt.ids, patterns, mode="stats")
    tokenizer = cli_common.tokenizer_for(lm, args)
    result = {
        **ResultHeader.of_run("run", lm, prompt).as_dict(),
        "taps": taps.stats() if taps else {},
        "top_k": cli_common.top_k(logits[-1], args.top_k, tokenizer),
    }
    if args.dump:
        result["dump"] = [str(p) for p in dumped]
    if args.json:
        cli_common.write_json(args.json, result)
    if args.report or args.plots:
        from ..report import run_report

        run_report(result, lm, html_path=args.report, plots_dir=args.plots, **cli_common.report_options(args))
    print_result(result)
    return 0


def _check_option_combinations(args) -> None:
    """Options that cannot take effect together are refused, never silently ignored."""
    if args.compare:
        ignored = [o for o, v in (("--dump", args.dump), ("--taps", args.taps)) if v]
        if ignored:
            raise UserError(f"{' and '.join(ignored)} cannot be used with --compare (the comparison records every "
                            "stage of the reference and writes no dump): run them separately")
    elif args.tol:
        raise UserError("--tol sets comparison tolerances: it needs --compare REF")


def _forward_dump(lm, ids: list[int], patterns, path: str, shard_mb: float):
    """The forward pass with the taps streamed to `path` (dump.py: shards + index when they
    exceed one shard). Returns (recorder, logits [T, V], files written)."""
    import json

    import mlx.core as mx

    from ..dump import StreamingDump
    from ..taps import select

    lm.config.check_ids(ids)
    names = select(patterns, lm.config.num_hidden_layers)
    if not names:
        raise UserError("--dump needs at least one tap")
    meta = {"tokens": json.dumps(list(ids)), "dtype": lm.dtype, "policy": lm.ops.policy,
            "model": cli_common.model_header(lm)["spec"], "format": "mlx_tinyllama.dump/1"}
    taps = StreamingDump(names, path, meta, int(shard_mb * (1 << 20)))
    try:
        logits = lm.model(mx.array(ids), tap=taps)
        mx.eval(logits)
        return taps, logits[0], taps.finish()
    except BaseException:  # an interrupt or a failed write: no shard of this run is left behind
        taps.abort()
        raise


def print_result(result: dict) -> None:
    from rich.table import Table

    con = cli_common.console()
    m = result["model"]
    con.print(f"[bold]{m['spec']}[/] ({m['format']}, {m['origin']}) · {result['dtype']} · policy {result['policy']}"
              f" · {result['kernels']} kernels · {result['device']}")
    con.print(f"weights: {m['path']}" + (f" · {m['details']['layout']}" if "layout" in m["details"] else ""),
              markup=False)
    ids = result["prompt"]["ids"]
    con.print(f"prompt: {len(ids)} tokens ({result['prompt']['source']}): {ids}")
    if result["taps"]:
        t = Table(title="stages in forward order", show_lines=False)
        for col in ("stage", "shape", "min", "max", "mean", "std", "absmax", "nan", "inf", "row 0 [:3]",
                    "last row [:3]"):
            t.add_column(col, justify="left" if col in ("stage", "shape") else "right", no_wrap=True)
        for name, s in result["taps"].items():
            bad = s["nan"] or s["inf"]
            style = "bold red" if bad else None
            t.add_row(name, "×".join(map(str, s["shape"])), *(fmt(s[k]) for k in ("min", "max", "mean", "std", "absmax")),
                      str(s["nan"]), str(s["inf"]), ", ".join(fmt(v) for v in s["first"]),
                      ", ".join(fmt(v) for v in s["last"]), style=style)
        con.print(t)
    t = Table(title="next token (last position)")
    for col in ("rank", "id", "token", "logit", "prob"):
        t.add_column(col, justify="right")
    for r, e in enumerate(result["top_k"], 1):
        t.add_row(str(r), str(e["token_id"]), repr(e["token"]) if e["token"] is not None else "", fmt(e["logit"]),
                  f"{e['prob']:.3f}")
    con.print(t)

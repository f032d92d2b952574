"""`paths`: run the prompt as one prefill, token by token through the KV cache, and
in chunks; compare every tap of every position; report the first divergence.
Exit code 0 when every path agrees with the prefill, 1 when one does not."""

from __future__ import annotations

from .. import cli_common, contracts
from ..errors import UserError
from ..results import ResultHeader

SPEC = contracts.Spec(paths=(cli_common.MODEL_PATH, cli_common.PROMPT_PATH, cli_common.JSON_PATH,
                             *cli_common.REPORT_PATHS),
                      unused=(*cli_common.MODEL_UNUSED, *cli_common.PROMPT_UNUSED, *cli_common.REPORT_UNUSED))


def add_arguments(p) -> None:
    cli_common.add_model_arguments(p)
    cli_common.add_prompt_arguments(p)
    p.add_argument("--chunk", type=int, action="append", metavar="K",
                   help="also prefill in chunks of K tokens through the cache (repeatable; default: the smallest "
                        "K >= 2 that divides the prompt length and the smallest that does not)")
    p.add_argument("--continue", dest="continue_n", type=int, default=8, metavar="N",
                   help="greedy continuation check: N tokens through the cache vs N full prefills (default 8; 0: off)")
    p.add_argument("--fault", metavar="NAME",
                   help="inject a fault to see the check catch it: drop-kv[:P] (the cache loses position P; default T//2), "
                        "rope-decode-offset (RoPE one position late in cached steps), or a faults.py ops fault")
    p.add_argument("--tol", action="append", metavar="[TAP_GLOB:]nmse=V|scale=F",
                   help="override the derived tolerance (see docs/compare.md), e.g. nmse=1e-6 or scale=10")
    p.add_argument("--json", metavar="PATH", help="write the result (first_divergence, per-path differences) as JSON")
    cli_common.add_report_arguments(p, "the check")


def default_chunks(T: int) -> list[int]:
    """One chunk size that divides T and one that does not (when T allows them)."""
    sizes = range(2, T)
    divides = next((k for k in sizes if T % k == 0), None)
    not_divides = next((k for k in sizes if T % k), None)
    return [k for k in (divides, not_divides) if k is not None]


def main(args) -> int:
    from ..paths import check_paths
    from ..tolerances import Tolerances

    if args.continue_n < 0:
        raise UserError(f"--continue must be >= 0, got {args.continue_n}")
    options = cli_common.report_options(args)  # a malformed --attention-layers fails before the model loads
    tolerances = Tolerances.from_overrides(args.tol)
    lm = cli_common.load_model(args)
    tolerances.check_patterns(lm.config.num_hidden_layers)
    prompt = cli_common.prompt_for(args, lm)
    lm.config.check_ids(prompt.ids)
    room = lm.config.max_position_embeddings - len(prompt.ids)
    if args.continue_n > room:
        raise UserError(f"--continue {args.continue_n}: the prompt's {len(prompt.ids)} tokens leave room for "
                        f"{room} more within max_position_embeddings={lm.config.max_position_embeddings}")
    chunks = args.chunk if args.chunk else default_chunks(len(prompt.ids))
    check = check_paths(lm.model, prompt.ids, chunks, args.continue_n, lm.dtype, args.fault, tolerances)
    result = {**ResultHeader.of_run("paths", lm, prompt).as_dict(), **check}
    if args.json:
        cli_common.write_json(args.json, result)
    if args.report or args.plots:
        from ..report import paths_report

        paths_report(result, lm, args.report, args.plots, **options)
    print_result(result)
    return 0 if result["agree"] else 1


def _num(v: float) -> str:
    return f"{v:.3g}" if v == v else "nan"


def print_result(result: dict) -> None:
    from rich.table import Table

    con = cli_common.console()
    m = result["model"]
    con.print(f"[bold]{m['spec']}[/] · {result['dtype']} · policy {result['policy']} · {result['kernels']} kernels"
              f" · {result['device']}")
    con.print(f"prompt: {len(result['prompt']['ids'])} tokens ({result['prompt']['source']})")
    if result["fault"]:
        f = result["fault"]
        con.print(f"[yellow]fault injected: {f['name']}" + (f" at position {f['position']}" if f["position"] is not None
                                                             else "") + "[/]")
    t = Table(title="each path against the one-call prefill (rows compared tap by tap, in the order computed)")
    for col in ("path", "steps", "agree", "first divergence", "worst tap (NMSE / tolerance)", "logits max |Δ|",
                "logits max NMSE"):
        t.add_column(col, justify="right" if col in ("steps", "logits max |Δ|", "logits max NMSE") else "left")
    for p in result["paths"]:
        d = p["first_divergence"]
        where = f"{d['tap']} @ position {d['position']}" if d else "-"
        t.add_row(p["path"], str(p["steps"]), "[green]yes[/]" if p["agree"] else "[bold red]NO[/]", where,
                  f"{p['worst_tap']} ({_num(p['worst_tap_nmse'])} / {_num(p['worst_tap_tolerance'])})",
                  _num(p["logits_max_abs_diff"]), _num(p["logits_max_nmse"]))
    con.print(t)
    c = result["continuation"]
    if c:
        if c["agree"]:
            con.print(f"greedy continuation: {c['n']} tokens through the cache == {c['n']} full prefills "
                      f"[green]agree[/] (logits max |Δ| {_num(c['logits_max_abs_diff'])}): {c['cached_tokens']}")
        else:
            i = c["first_mismatch_step"]
            con.print(f"greedy continuation: [bold red]differs at generated token {i}[/]: cache "
                      f"{c['cached_tokens'][i]} vs prefill {c['recomputed_tokens'][i]} "
                      f"(cache: {c['cached_tokens']}, prefill: {c['recomputed_tokens']})")
    d = result["first_divergence"]
    if d:
        con.print(f"[bold red]first divergence[/]: path {d['path']}, tap {d['tap']}, position {d['position']} "
                  f"(step {d['step']}): {d['reason']}")
    elif result["agree"]:
        con.print("[green]all paths agree with the prefill at every tap and position[/]")

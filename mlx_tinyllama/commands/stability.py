"""`stability`: the prompt at fp16 (and/or bf16) under each precision policy and at
float32, side by side: headroom to the fp16 maximum, underflow, NaN/Inf, drift
from float32 per stage, where the first non-finite value comes from, and which
policy an engine needs. See docs/stability.md."""

from __future__ import annotations

import fnmatch

from .. import cli_common, contracts, stability
from ..errors import UserError
from ..taps import tap_names
from ..cli_common import fmt

SPEC = contracts.Spec(paths=(cli_common.MODEL_PATH, cli_common.PROMPT_PATH, cli_common.JSON_PATH,
                             *cli_common.REPORT_PATHS),
                      unused=(*cli_common.MODEL_UNUSED, *cli_common.PROMPT_UNUSED, *cli_common.REPORT_UNUSED))


def add_arguments(p) -> None:
    cli_common.add_model_arguments(p)
    p.set_defaults(dtype=None, policy=None)
    cli_common.add_prompt_arguments(p)
    p.add_argument("--dtypes", metavar="LIST",
                   help="low-precision dtypes to run, comma-separated: float16, bfloat16 (default: --dtype, "
                        "else float16)")
    p.add_argument("--policies", metavar="LIST",
                   help=f"precision policies to compare, comma-separated (default: --policy, else all: "
                        f"{','.join(stability.POLICY_ORDER)})")
    p.add_argument("--taps", action="append", metavar="GLOB",
                   help="stages to show in the per-tap tables (the JSON always has every stage; default: all)")
    p.add_argument("--json", metavar="PATH", help="write the full result as JSON")
    cli_common.add_report_arguments(p, "the stability run")


def selected_dtypes(args) -> list[str]:
    if args.dtypes is not None:
        return stability.check_low_dtypes(stability.parse_list(args.dtypes, "--dtypes"))
    return stability.check_low_dtypes([args.dtype or "float16"])


def selected_policies(args) -> list[str]:
    if args.policies is not None:
        return stability.check_policies(stability.parse_list(args.policies, "--policies"))
    if args.policy is not None:
        return stability.check_policies([args.policy])
    return list(stability.POLICY_ORDER)


def main(args) -> int:
    dtypes, policies = selected_dtypes(args), selected_policies(args)
    options = cli_common.report_options(args)  # a malformed --attention-layers fails before the models load

    result, prompt, lm = stability.run_stability(
        args.model, None, dtypes, policies, args.kernels, args.download, lambda lm: cli_common.prompt_for(args, lm),
        keep_model=bool(args.report or args.plots))
    if args.json:
        cli_common.write_json(args.json, result)
    if args.report or args.plots:
        from ..report import stability_report

        stability_report(result, lm, args.report, args.plots, **options)
    print_result(result, args.taps)
    return 0


# ---------------------------------------------------------------------------
# Tables


def _runs(result: dict):
    for dtype, by_policy in result["runs"].items():
        for policy, run in by_policy.items():
            yield f"{dtype} / {policy}", run


def print_result(result: dict, patterns=None) -> None:
    from rich.table import Table

    con = cli_common.console()
    n = result["model"]["config"]["num_hidden_layers"]
    con.print(f"[bold]{result['model']['spec']}[/bold]: {len(result['prompt']['ids'])} tokens; float32 reference vs "
              + ", ".join(label for label, _ in _runs(result)) + f" (kernels: {result['kernels']})")
    _print_tap_tables(con, result, n, patterns)
    _print_layers(con, result, n)

    t = Table(title="summary: first broken stage per run")
    for col in ("run", "first NaN/Inf", "first collapse", "smallest headroom", "logits NMSE"):
        t.add_column(col)
    for label, run in _runs(result):
        low = min((v["headroom"], k) for k, v in run["taps"].items())
        t.add_row(label, run["first_nonfinite"] or "-", run["first_collapse"] or "-",
                  f"{fmt(low[0])} at {low[1]}", fmt(run["taps"]["logits"]["nmse"]),
                  style=None if stability.sound(run) else "bold red")
    con.print(t)
    for label, run in _runs(result):
        if run["origin"]:
            o = run["origin"]
            con.print(f"[bold red]{label}[/bold red]: first {o['kind']} at [bold]{o['tap']}[/bold] "
                      f"({o['stage']}): {o['explanation']}")
    for dtype, text in result["recommendation"].items():
        con.print(f"[bold]{dtype}:[/bold] {text}")


def _print_tap_tables(con, result: dict, n: int, patterns) -> None:
    from rich.table import Table

    names = tap_names(n)
    if patterns:
        names = [m for m in names if any(fnmatch.fnmatchcase(m, p) for p in patterns)]
        if not names:
            raise UserError(f"--taps {' '.join(patterns)} matches no stage")
    ref = result["reference"]["taps"]
    for label, run in _runs(result):
        t = Table(title=f"{label} vs float32 (headroom = log2(65504 / absmax))")
        for col in ("tap", "fp32 absmax", "fp32 headroom", "absmax", "headroom", "NaN", "Inf", "underflow",
                    "zero rows", "NMSE", "max abs err"):
            t.add_column(col, justify="left" if col == "tap" else "right", no_wrap=True)
        for name in names:
            s = run["taps"][name]
            bad = s["nan"] or s["inf"] or s["collapsed_rows"]
            t.add_row(name, fmt(ref[name]["absmax"]), fmt(ref[name]["headroom"]), fmt(s["absmax"]),
                      fmt(s["headroom"]), str(s["nan"]), str(s["inf"]), str(s["underflow"]),
                      str(s["collapsed_rows"]), fmt(s["nmse"]), fmt(s["max_abs_err"]),
                      style="bold red" if bad else ("yellow" if s["headroom"] < 1 else None))
        con.print(t)


def _print_layers(con, result: dict, n: int) -> None:
    from rich.table import Table

    ref = result["reference"]["layers"]
    t = Table(title="per layer: float32 absmax by stage kind (headroom in doublings), then each run's worst NMSE")
    t.add_column("layer", justify="right")
    for kind in stability.LAYER_KINDS:
        t.add_column(kind, justify="right")
    for label, _ in _runs(result):
        t.add_column(label, justify="right")
    for i in range(n):
        cells = [f"{fmt(ref['absmax'][k][i])} ({fmt(ref['headroom'][k][i])})" for k in stability.LAYER_KINDS]
        worst = [fmt(max(run["layers"]["nmse"][k][i] for k in stability.LAYER_KINDS)) for _, run in _runs(result)]
        t.add_row(str(i), *cells, *worst)
    con.print(t)


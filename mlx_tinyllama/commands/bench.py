"""`bench`: prefill/decode throughput, tap overhead and per-stage cost, side by
side with mlx-lm's Llama on the same weights (see mlx_tinyllama/bench/timing.py for
the method and docs/benchmarks.md for figures)."""

from __future__ import annotations

import sys

from .. import bench, cli_common, contracts
from ..contracts import WRITE_DIR, PathOption, Unused
from ..errors import UserError

SPEC = contracts.Spec(
    paths=(cli_common.MODEL_PATH, cli_common.JSON_PATH, PathOption("--metal-capture", WRITE_DIR)),
    unused=(Unused("--tap-layer", lambda a: a.tap_overhead, "with --no-tap-overhead (it picks the dumped layer)"),
            *cli_common.MODEL_UNUSED,
            Unused("--tap-decode-tokens", lambda a: a.tap_overhead, "with --no-tap-overhead"),
            Unused("--tap-prompt-length", lambda a: a.tap_overhead or a.stages,
                   "with --no-tap-overhead and --no-stages")),
)


def add_arguments(p) -> None:
    cli_common.add_model_arguments(p)
    g = p.add_argument_group("what to measure")
    g.add_argument("--prompt-lengths", default="38,128,512,2048", metavar="T1,T2,...",
                   help="prefill lengths in tokens (synthetic ids; default 38,128,512,2048)")
    g.add_argument("--decode-tokens", type=int, default=64, metavar="N",
                   help="greedy tokens generated through the KV cache per decode sample (default 64)")
    g.add_argument("--decode-context", type=int, default=38, metavar="T",
                   help="prompt tokens prefilled before decoding (default 38, the seed prompt's length)")
    g.add_argument("--repeats", type=int, default=5, help="timed samples per measurement (default 5)")
    g.add_argument("--warmup", type=int, default=1, help="untimed samples first (default 1)")
    g.add_argument("--seed", type=int, default=0, help="seed of the synthetic token ids")
    g.add_argument("--no-mlx-lm", dest="with_mlx_lm", action="store_false",
                   help="skip mlx-lm's Llama side by side")
    g.add_argument("--with-transformers", action="store_true",
                   help="also time transformers (torch; CUDA if available) on the same weights")
    g.add_argument("--no-tap-overhead", dest="tap_overhead", action="store_false",
                   help="skip the taps off / stats on every stage / full dump of one layer comparison")
    g.add_argument("--no-stages", dest="stages", action="store_false", help="skip the per-stage cost")
    g.add_argument("--tap-layer", type=int, default=0, help="layer whose stages are fully dumped (default 0)")
    g.add_argument("--tap-prompt-length", type=int, default=None, metavar="T",
                   help="prefill length for tap overhead and per-stage cost (default: first --prompt-lengths)")
    g.add_argument("--tap-decode-tokens", type=int, default=16, metavar="N",
                   help="decode tokens per sample when measuring tap overhead (default 16)")
    g.add_argument("--peak-bandwidth", type=float, default=None, metavar="GB/s", dest="peak_bandwidth_gbs",
                   help="the device's peak memory bandwidth, if the built-in table does not know it")
    g.add_argument("--vs-dtype", choices=("float16", "bfloat16", "float32"), default=None,
                   help="also time our model loaded in this dtype, sample by sample with the --dtype one "
                        "(e.g. --dtype float16 --vs-dtype float32: what half precision costs on this device)")
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="PATH", help="write every measurement as JSON")
    o.add_argument("--metal-capture", metavar="PATH.gputrace",
                   help="on a Mac: record one decode step as an Xcode GPU trace (needs MTL_CAPTURE_ENABLED=1)")


def settings(args) -> bench.Settings:
    return bench.Settings(
        prompt_lengths=bench.parse_lengths(args.prompt_lengths), decode_tokens=args.decode_tokens,
        decode_context=args.decode_context, repeats=args.repeats, warmup=args.warmup, seed=args.seed,
        tap_layer=args.tap_layer, tap_prompt_length=args.tap_prompt_length,
        tap_decode_tokens=args.tap_decode_tokens, with_mlx_lm=args.with_mlx_lm,
        with_transformers=args.with_transformers, tap_overhead=args.tap_overhead, stages=args.stages,
        peak_bandwidth_gbs=args.peak_bandwidth_gbs, vs_dtype=args.vs_dtype,
    )


def main(args) -> int:
    s = settings(args)
    bench.check_metal_capture(args.metal_capture)  # before minutes of loading
    bench.validate(s)  # counts and lengths that need no model
    lm = cli_common.load_model(args)
    if s.with_transformers and lm.source.format == "hf":
        from ..sources import other_weight_files

        others = other_weight_files(lm.source.path)
        if others:
            raise UserError(f"--with-transformers: {lm.source.path} also holds {', '.join(others)}; transformers "
                            "might load those instead of the weights measured here: move them out first")
    result = bench.run(lm, s, args.metal_capture, argv=["bench", *sys.argv[2:]] if sys.argv[1:2] == ["bench"] else None)
    if args.json:
        cli_common.write_json(args.json, result)
    print_result(result)
    return 0


# --- printing ----------------------------------------------------------------------------


def _gb(n) -> str:
    return f"{n / 1e9:.2f} GB" if n else "-"


def _ratio_label(col: str) -> str:
    return col.replace("ratio_", "").replace("_over_", " / ") if col.startswith("ratio_") else col


def _ratio_cols(rows: list[dict]) -> list[str]:
    return sorted({k for r in rows for k in r if k.startswith("ratio_")})


def print_result(r: dict) -> None:
    from rich.table import Table

    con = cli_common.console()
    d, m, w = r["hardware"], r["model"], r["weights"]
    peak = f", peak {d['peak_bandwidth_gbs']:.0f} GB/s ({d['peak_bandwidth_source']})" if d["peak_bandwidth_gbs"] else ""
    blas = f", BLAS {d['blas']}" if d["blas"] else ""
    con.print(f"[bold]{m['spec']}[/] · {r['dtype']} · {r['kernels']} kernels · {w['parameters'] / 1e6:.1f}M parameters, "
              f"{_gb(w['per_decode_token_bytes'])} of weights read per decode token")
    con.print(f"device: {d['description']}{blas}{peak}")
    if "transformers" in r:
        con.print(f"transformers: {r['transformers']['device']}")

    rows = r["prefill"]
    t = Table(title="prefill (tokens/s, median; spread = (max-min)/median)")
    engines = list(rows[0]["engines"])
    for col in ["tokens", *engines, *_ratio_cols(rows), "peak memory (ours)"]:
        t.add_column(_ratio_label(col), justify="right")
    for row in rows:
        t.add_row(str(row["tokens"]),
                  *(f"{row['engines'][e]['tokens_per_s']:.1f} ±{100 * row['engines'][e]['spread']:.0f}%" for e in engines),
                  *(f"{row[c]:.2f}" for c in _ratio_cols(rows)), _gb(row["engines"]["ours"]["peak_memory_bytes"]))
    con.print(t)

    dec = r["decode"]
    t = Table(title=f"decode: {dec['tokens']} greedy tokens after {dec['context']} prompt tokens")
    for col in ("engine", "tokens/s", "ms/token", "spread", "weight GB/s", "of peak", "peak memory"):
        t.add_column(col, justify="right")
    for name, e in dec["engines"].items():
        frac = f"{100 * e['fraction_of_peak']:.0f}%" if e["fraction_of_peak"] else "-"
        t.add_row(name, f"{e['tokens_per_s']:.2f}", f"{e['ms_per_token']:.2f}", f"{100 * e['spread']:.0f}%",
                  f"{e['achieved_weight_gbs']:.1f}", frac, _gb(e["peak_memory_bytes"]))
    con.print(t)
    for col in _ratio_cols([dec]):
        con.print(f"decode {_ratio_label(col)}: {dec[col]:.3f} (tokens/s ratio)")

    if "tap_overhead" in r:
        to = r["tap_overhead"]
        t = Table(title=f"tap overhead (time / taps off): stats on all {to['stats_taps']} stages, "
                        f"full dump of layer {to['full_layer']}")
        for col in ("phase", "taps off", "stats, every stage", "full, one layer"):
            t.add_column(col, justify="right")
        for phase in ("prefill", "decode"):
            p = to[phase]
            t.add_row(f"{phase} ({to['prefill_tokens'] if phase == 'prefill' else to['decode_tokens']} tok)",
                      f"{1e3 * p['modes']['off']['median_s']:.1f} ms", f"x{p['ratios']['stats_all']:.2f}",
                      f"x{p['ratios']['full_layer']:.2f}")
        con.print(t)

    if "stages" in r:
        st = r["stages"]
        t = Table(title="per-stage cost (isolated sub-blocks, all layers)")
        t.add_column("stage kind")
        for phase in ("prefill", "decode"):
            t.add_column(f"{phase} ms", justify="right")
            t.add_column("share", justify="right")
        for kind in st["prefill"]["kinds"]:
            cells = []
            for phase in ("prefill", "decode"):
                k = st[phase]["kinds"][kind]
                cells += [f"{1e3 * k['seconds']:.2f}", f"{100 * k['share_of_parts']:.0f}%"]
            t.add_row(kind, *cells)
        t.add_row("sum / whole", *(c for ph in ("prefill", "decode") for c in
                                  (f"{1e3 * st[ph]['sum_of_parts_s']:.2f} / {1e3 * st[ph]['whole_forward_s']:.2f}",
                                   f"{st[ph]['coverage']:.2f}")))
        con.print(t)
    if "metal_capture" in r:
        con.print(f"Metal capture written to {r['metal_capture']['path']} (open it in Xcode)")

"""`compare`: check a run, or another engine's numbers, against a reference and name
the first stage that diverges.

    compare --ref refs/synthetic-tiny-fp32.json                 # this package's run vs a reference
    compare --against their_dump.safetensors --model synthetic:tiny   # their dump vs this package's run
    compare --against llama_eval_callback.log --ref REF          # their log vs a reference
    compare --against-steps steps/ --model synthetic:tiny       # their decode steps vs our KV-cache decode

With their full tensors and the model, the result also localizes the cause (replay, diagnosis)
and always says which stages were compared (coverage); see docs/localize.md. The verdict line
(verdict.py), printed last, states the outcome with that coverage.
Exit code 0: every compared stage within tolerance (and every --require'd stage compared);
1: something diverges or a required stage was not compared; 2: bad input, among it their names
that are not taps (--ignore-unmapped, --suggest-map) and a dump or log that stops early (--partial).
"""

from __future__ import annotations


from .. import cli_common, contracts
from ..contracts import READ_ANY, READ_FILE, WRITE_FILE, PathOption, Unused
from ..compare import compare, compared_ids, judging_basis, needs_shortcut, run_side
from ..errors import UserError
from ..formatting import fmt
from ..localize import localize
from ..localize.coverage import UNMAPPED_REASON, required_not_compared, unmapped_message, unmapped_names, where_it_stops
from ..refs.loaders import load, read_name_map, refuse_decode_step, refuse_fused
from ..refs.side import SHORTCUT_TAPS, Side, is_known_tap
from ..taps import split_name
from ..results import PromptRecord, ResultHeader
from ..tolerances import Tolerances
from ..verdict import steps_verdict


def _theirs(args) -> bool:
    return bool(args.against or args.against_steps)


def _runs_ours(args) -> bool:
    """Whether this package runs the prompt: not for a stored reference against their dump."""
    return not (args.ref and args.against)


_PROMPT_OPTIONS = ("--prompt", "--prompt-file", "--token-ids", "--chat", "--system", "--bos", "--tokenizer")

SPEC = contracts.Spec(
    paths=(PathOption("--ref", READ_FILE, implies=contracts.dump_files),
           PathOption("--against", READ_FILE, implies=contracts.dump_files),
           PathOption("--against-steps", READ_ANY, implies=contracts.directory_files),
           PathOption("--map", READ_FILE), PathOption("--suggest-map", WRITE_FILE), cli_common.JSON_PATH,
           *cli_common.REPORT_PATHS, cli_common.MODEL_PATH,
           cli_common.PROMPT_PATH),
    unused=(Unused("--layout", lambda a: bool(a.against), "without --against (the Q/K layout of their dump)"),
            Unused("--map", _theirs, "without --against or --against-steps (it names their tensors)"),
            Unused("--against-dtype", _theirs, "without --against or --against-steps"),
            Unused("--emulate", lambda a: bool(a.against) and not a.ref,
                   "without --against or with --ref (it emulates a llama.cpp log's engine in this package's run; "
                   "not implemented for --against-steps)"),
            Unused("--require", lambda a: not a.against_steps, "with --against-steps (not implemented for steps)"),
            Unused("--all", lambda a: not a.against_steps, "with --against-steps (every step is listed)"),
            *(Unused(o, _runs_ours, "with both --ref and --against (nothing is run: their dump is compared with "
                                    "the stored reference)") for o in _PROMPT_OPTIONS),
            *cli_common.MODEL_UNUSED, *cli_common.PROMPT_UNUSED, *cli_common.REPORT_UNUSED),
)


def add_arguments(p) -> None:
    p.add_argument("--ref", metavar="REF", help="reference: a refs/*.json manifest, a seed bundle (refs/*.seed.json, "
                                                "optionally #SOURCE), or one of the seed's JSON files")
    p.add_argument("--against", metavar="FILE", help="another engine's numbers: .safetensors/.npz tensors, a stats "
                                                     "JSON (run --json shape), or a llama.cpp eval-callback log")
    p.add_argument("--against-steps", nargs="+", metavar="DIR_OR_FILE",
                   help="another engine's decode-step dumps (safetensors/npz files, or directories of them), each "
                        "keyed by position (metadata 'position' or tensor names TAP@POSITION): compared with this "
                        "package's KV-cache decode and prefill rows; needs --model")
    p.add_argument("--require", action="append", metavar="GLOB",
                   help="exit 1 unless every stage matching GLOB was compared (repeatable), e.g. 'layers.*.attn.probs'")
    p.add_argument("--map", metavar="FILE.json", help="name mapping {their name: canonical tap} for --against")
    p.add_argument("--suggest-map", metavar="OUT.json",
                   help="write a starting --map for --against's tensors, matched to the taps by shape and value "
                        "against this package's run (with the confidence of each line), and compare nothing")
    p.add_argument("--ignore-unmapped", action="store_true",
                   help="compare the names that are known and leave the others out (default: names that are "
                        "not canonical taps nor in --map are an error, exit 2)")
    p.add_argument("--partial", action="store_true",
                   help="accept a dump or log that holds only part of the forward pass (only layer 0, or it "
                        "stops early): the verdict says so (default: one that stops early is exit 2)")
    p.add_argument("--layout", choices=("hf", "gguf", "meta"),
                   help="Q/K row order of --against: hf (rotate-half), gguf (llama.cpp's interleaved pairs) or meta "
                        "(Meta's checkpoints and llama2.c: the same pairs); default: gguf for llama.cpp logs, else "
                        "the dump's qk_layout metadata (kit), else hf")
    p.add_argument("--against-dtype", metavar="DTYPE", help="precision of --against for tolerances (default: "
                                                            "its tensors' dtype)")
    p.add_argument("--emulate", metavar="auto|fp32|matmul=f16,kv=f16,fa=on", default="auto",
                   help="compute the reference with the other engine's precision (llama.cpp logs): auto (default) "
                        "reads it from the log (KV cache type, flash attention) and the weights' type (the log's "
                        "loader lines or --model THE.gguf); fp32 turns it off")
    p.add_argument("--tol", action="append", metavar="[TAP:]METRIC=V",
                   help="override a tolerance (repeatable): nmse=1e-6, layers.0.attn.probs:nmse=1e-4, scale=10")
    p.add_argument("--json", metavar="PATH", help="write the comparison (status, first_divergence, entries) as JSON")
    p.add_argument("--all", action="store_true", help="list every entry, not only the stages around a divergence")
    cli_common.add_report_arguments(p, "the comparison (divergence map, table)")
    cli_common.add_model_arguments(p)
    # model None: the reference's own model (full-tensor references), else synthetic;
    # dtype None: float32 against a llama.cpp log (its precision is emulated), else float16
    p.set_defaults(model=None, dtype=None)
    cli_common.add_prompt_arguments(p)


def main(args) -> int:
    if args.against_steps:
        if args.ref or args.against:
            raise UserError("--against-steps compares decode steps with this package's run: without --ref or --against")
        if args.suggest_map or args.partial:
            raise UserError("--suggest-map and --partial apply to --against FILE, not --against-steps")
        return _steps(args)
    if not args.ref and not args.against:
        raise UserError("compare needs --ref REF and/or --against FILE (or --against-steps DIR)")
    if not args.against and (args.suggest_map or args.ignore_unmapped or args.partial):
        raise UserError("--suggest-map, --ignore-unmapped and --partial apply to --against FILE")
    if args.suggest_map and args.ref:
        raise UserError("--suggest-map matches --against's tensors with this package's run (--model): without --ref")
    if args.suggest_map and any((args.json, args.report, args.plots, args.require, args.partial, args.ignore_unmapped)):
        raise UserError("--suggest-map writes the map and compares nothing: give --json/--report/--plots/--require/"
                        "--partial/--ignore-unmapped to the compare that uses it (--map)")
    cli_common.report_options(args)  # a malformed --attention-layers fails before the model loads
    tol = Tolerances.from_overrides(args.tol)
    name_map = read_name_map(args.map)
    references = _load_ref(args.ref) if args.ref else None
    if args.against:
        candidate = load(args.against, name_map, args.layout)
        if len(candidate) != 1:
            raise UserError(f"--against {args.against}: holds {len(candidate)} sources; give one dump")
        candidate = candidate[0]
        refuse_decode_step(candidate)
        basis = judging_basis(candidate, args.against_dtype)  # the dtype that sets the tolerances, and why
        if args.against_dtype:
            candidate.dtype = basis.dtype
        if args.suggest_map:
            if args.dtype is None:
                args.dtype = basis.reference_dtype  # the reference at the candidate's precision, as a compare
            return _suggest(args, candidate, name_map, tol)
        unknown = unmapped_names(candidate)
        if unknown and not args.ignore_unmapped:
            raise UserError(unmapped_message(unknown, args.against))
        _stops(args, candidate, None)  # what can be told before the model loads (the layer count completes it)
    if references is not None and not args.against:  # this package's run against the reference
        lm, prompt = _load_run(args, references)
        candidate = run_side(lm, prompt.ids, shortcut=needs_shortcut(references))
        cfg = lm.config.as_dict()
        tol.check_patterns(lm.config.num_hidden_layers)  # a glob for a layer this model lacks
        result = compare(candidate, references, tol, cfg, len(prompt.ids))
        _localize(args, result, candidate, references, None, tol, len(prompt.ids), cfg)  # coverage: no replay of ours
        return _finish(args, ResultHeader.of_run("compare", lm, prompt), result, lm)
    if references is None:  # their dump against this package's run
        if args.dtype is None and candidate.kind == "llama.cpp-log":
            args.dtype = "float32"  # the emulation rounds like the engine, from an fp32 computation
        elif args.dtype is None:
            args.dtype = basis.reference_dtype  # the reference computes at the candidate's precision
        lm, prompt = _load_run(args, [candidate])
        engine = cli_common.emulate_engine(args, candidate, lm)
        references = [run_side(lm, prompt.ids)]
        if engine is not None:
            cli_common.mark_emulated(references[0], engine)
        cfg = lm.config.as_dict()
        tol.check_patterns(lm.config.num_hidden_layers)  # a glob for a layer this model lacks
        result = compare(candidate, references, tol, cfg, len(prompt.ids), basis)
        _localize(args, result, candidate, references, lm, tol, len(prompt.ids), cfg)
        return _finish(args, ResultHeader.of_run("compare", lm, prompt), result, lm)
    cfg = _config(args, references)  # their dump against a stored reference
    tol.check_patterns(int(cfg["num_hidden_layers"]))
    n_tokens = next((r.n_tokens for r in references if r.n_tokens), None) or candidate.n_tokens
    if not n_tokens:
        raise UserError("cannot tell the number of tokens: neither the reference nor the dump records it")
    result = compare(candidate, references, tol, cfg, n_tokens, basis)
    if args.model and args.dtype is None:
        args.dtype = "float32"  # the weights for the replay, which computes in float32 (was: unknown dtype None)
    lm = cli_common.load_model(args) if args.model else None  # the weights, for the replay
    _localize(args, result, candidate, references, lm, tol, n_tokens, cfg)
    ids = compared_ids(candidate, references)
    prompt = PromptRecord(ids, source="the compared files' token ids") if ids else None
    return _finish(args, ResultHeader.without_model("compare", candidate.dtype, prompt), result)


def _localize(args, result, candidate, references, lm, tol, n_tokens, cfg) -> None:
    """Coverage (always), replay and diagnosis (with the model), and the --require check, into result."""
    n_layers = int(cfg["num_hidden_layers"])
    localize(result, candidate, references, lm, tol, n_tokens, n_layers)
    if args.against:
        result["coverage"]["partial"] = _stops(args, candidate, n_layers)
        result["coverage"]["ignored_unmapped"] = bool(unmapped_names(candidate))
    if args.require:
        result["required"] = {"patterns": list(args.require),
                              "not_compared": required_not_compared(result["coverage"], args.require, n_layers)}


def _stops(args, candidate, n_layers: int | None) -> str | None:
    """Where their dump or log stops early: exit 2, or with --partial what the verdict line says.
    n_layers None: the layers they hold (a cut is seen, not yet missing last layers)."""
    taps = {t for t in candidate.taps() if is_known_tap(t) and t not in SHORTCUT_TAPS}
    if n_layers is None:
        n_layers = 1 + max((split_name(t)[0] for t in taps if split_name(t)[0] is not None), default=-1)
    stops = where_it_stops(taps, n_layers)
    if stops and not args.partial:
        what = "log" if candidate.kind == "llama.cpp-log" else "dump"
        raise UserError(f"{args.against}: the {what} {stops[0]}: {stops[1]}. Nothing was judged: a verdict over "
                        "the stages before it would pass an engine that never finished. Give --partial if it holds "
                        "only these stages by design")
    return stops[0] if stops else None


def _suggest(args, candidate, name_map, tol) -> int:
    """`--suggest-map OUT.json`: their tensors matched to taps against this package's run, written as a map."""
    from ..outputs import write_json
    from ..refs.suggest import describe, read_raw_tensors, suggest_map

    if candidate.kind != "dump":
        raise UserError(f"--suggest-map needs full tensors (.safetensors/.npz): {args.against} is a {candidate.kind}")
    lm, prompt = _load_run(args, [candidate])
    reference = run_side(lm, prompt.ids)
    raw = read_raw_tensors(args.against)
    lines = suggest_map(raw, reference.tensors, lm.config.as_dict(), len(prompt.ids), candidate.dtype or lm.dtype,
                        lm.dtype, tol, candidate.layout, name_map, fused=True)
    mapping = {ln["name"]: ln["tap"] for ln in lines if ln["tap"] and ln["name"] != ln["tap"]}
    write_json(args.suggest_map, mapping)
    for ln in lines:
        print(describe(ln))
    n_sure = sum(ln["confidence"] == "match" for ln in lines)
    n_fused = sum(ln["confidence"] == "match" and bool(ln.get("taps")) for ln in lines)
    print(f"wrote {args.suggest_map}: {len(mapping)} name(s) mapped ({n_sure} of {len(lines)} tensors within "
          f"tolerance of one tap{f', {n_fused} of them fused (one block per tap)' if n_fused else ''}); check the "
          f"lines that are not `match`, then give --map {args.suggest_map}")
    return 0


def _finish(args, header, result, lm=None) -> int:
    return cli_common.finish_comparison(args, header, result, lm)


def _steps(args) -> int:
    """`--against-steps`: their decode-step dumps against this package's decode of the same tokens."""
    from ..localize.steps import compare_steps, load_steps
    from ..outputs import write_json
    from ..prompt import Prompt

    if not args.model:
        raise UserError("--against-steps needs --model: the model whose decode is the reference")
    if args.report or args.plots:
        raise UserError("--report/--plots are not drawn for --against-steps yet: use --json")
    tol = Tolerances.from_overrides(args.tol)
    name_map = read_name_map(args.map)
    refuse_fused(name_map, "--against-steps")
    dumps = load_steps(args.against_steps, name_map)
    unknown = [n["key"] for n in dumps.not_comparable if n.get("reason") == UNMAPPED_REASON]
    if unknown and not args.ignore_unmapped:
        raise UserError(unmapped_message(unknown, args.against_steps[0]))
    if args.dtype is None:  # the reference decodes at their precision (the rule of --against)
        args.dtype = dumps.basis(args.against_dtype).reference_dtype
    lm = cli_common.load_model(args)
    tol.check_patterns(lm.config.num_hidden_layers)
    ids = cli_common.prompt_for(args, lm).ids if _prompt_given(args) else None
    result = compare_steps(dumps, lm, ids, tol, args.against_dtype)
    all_ids = result.pop("tokens")  # schema 1: the ids are prompt.ids
    prompt = Prompt(ids=all_ids, text=None, source="--token-ids" if ids else "the step dumps' token ids")
    result = {**ResultHeader.of_run("compare", lm, prompt).as_dict(), **result}
    result["verdict"] = steps_verdict(result)
    result["status"] = result["verdict"]["status"]
    if args.json:
        write_json(args.json, result)
    print_steps(result)
    return result["verdict"]["exit_code"]


def _load_ref(spec: str) -> list[Side]:
    path, _, source = spec.partition("#")
    sides = load(path)
    if source:
        chosen = [s for s in sides if s.name.endswith("#" + source)]
        if not chosen:
            raise UserError(f"{path} has no source {source!r}; sources: "
                            + ", ".join(s.name.split("#", 1)[-1] for s in sides))
        return chosen
    return sides


def _prompt_given(args) -> bool:
    return any(getattr(args, k, None) is not None for k in ("prompt", "prompt_file", "token_ids", "chat"))


def _load_run(args, sides: list[Side]):
    """Load --model (default: a full-tensor reference's own model spec) and resolve the prompt."""
    from ..prompt import Prompt

    if args.model is None:
        specs = [s.provenance.get("model") for s in sides if s.kind == "full-tensors"]
        args.model = next((m for m in specs if m), "synthetic")
    if args.dtype is None:
        args.dtype = "float16"
    lm = cli_common.load_model(args)
    ids_from_dump = next((s.ids for s in sides if s.kind not in ("full-tensors", "seed-json") and s.ids), None)
    if ids_from_dump and not _prompt_given(args):
        lm.config.check_ids(ids_from_dump)
        return lm, Prompt(ids=list(ids_from_dump), text=None, source="the dump's token ids")
    prompt = cli_common.prompt_for(args, lm)
    for side in sides:
        cli_common.check_tokens(side, prompt.ids, lm)
    return lm, prompt


def _config(args, references) -> dict:
    for r in references:
        cfg = r.config or {}
        if all(cfg.get(k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                    "intermediate_size", "vocab_size")):
            return cfg
    from .. import sources
    from ..config import load_config

    spec = args.model or "synthetic"
    if spec == "synthetic" or spec.startswith("synthetic:"):
        from ..synthetic import PRESETS, parse_spec

        return PRESETS[parse_spec(spec)[0]].as_dict()
    src = sources.resolve(spec)
    if src.format == "gguf":
        raise UserError("give --model as an HF directory or synthetic preset to tell the model shape")
    return load_config(src.path).as_dict()


# ---------------------------------------------------------------------------
# Printing decode steps


def print_steps(result: dict) -> None:
    """One line per step, then the first (position, stage) that diverges and what explains it."""
    from rich.markup import escape
    from rich.table import Table

    con = cli_common.console()
    t = Table(title=f"decode steps against {result['reference']['model']} ({result['reference']['dtype']}), "
                    f"their dtype {result['dtype']}")
    basis = result.get("tolerance_basis")
    if basis:
        con.print(f"tolerance: {basis['dtype']} ({basis['reason']})", markup=False, highlight=False)
    for col in ("position", "tokens", "vs our decode", "vs prefill row", "localized"):
        t.add_column(col, no_wrap=True)
    for s in result["steps"]:
        loc = s.get("localized")
        t.add_row(str(s["position"]), str(s["n_tokens"]), s["first_divergence"] or "match",
                  s["prefill_row"]["first_divergence"] or "match", loc["stage"] if loc else "",
                  style=None if s["status"] == "match" else "red")
    con.print(t)
    f = result["first_divergence"]
    if f is not None:
        con.print(f"[bold red]first divergence: position {f['position']}, {f['tap']}[/] ({f['metric']}, "
                  f"{fmt(f['ratio'])}x tolerance)" + (f": {escape(f['note'])}" if f["note"] else ""))
        if f.get("hint"):
            con.print(f"[bold]hint[/]: {escape(f['hint'])}")
        for d in f["diagnosis"]:
            con.print(f"[bold]diagnosis[/]: matches after [bold]{d['transform']}[/]: {escape(d['words'])}")
    # the keys the next steps read show how the fault goes on (the first step's are in the hint)
    told = (f or {}).get("hint") or ""
    later = [s for s in result["steps"] if (s.get("localized") or {}).get("keys") and s["localized"]["keys"] not in told]
    for s in later[:2]:
        con.print(f"[bold]keys read[/] (position {s['position']}, {s['localized']['stage']}): "
                  f"{escape(s['localized']['keys'])}")
    lines = [(s["position"], tap, why) for s in result.get("not_replayed") or [] for tap, why in s["stages"].items()]
    for pos, tap, why in lines[:4]:  # the first few; --json's not_replayed has them all
        con.print(f"[yellow]not replayed[/]: position {pos}, {tap}: {escape(why)}")
    if len(lines) > 4:
        con.print(f"[yellow]not replayed[/]: {len(lines) - 4} more stage(s) of later steps (--json: not_replayed)")
    cli_common.print_verdict(result)  # the outcome, with the steps and stages it covers: the last line

"""Options and steps that several commands share: which model, which dtype and
policy, loading with progress, running a tapped forward pass, writing JSON."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import contracts, outputs, runtime, sources
from .contracts import MODEL, READ_FILE, WRITE_DIR, WRITE_FILE, PathOption, Unused
from .outputs import write_json  # noqa: F401  (re-exported)
from .errors import UserError
from .ops import KERNELS, POLICIES
from .stages import GLOBAL_HEAD, GLOBAL_TAIL, split_name
from .tokenizer import KINDS as TOKENIZER_KINDS
from .formatting import fmt  # noqa: F401  (re-exported: commands print with it)
from .runtime import device_description, forward, model_header, top_k, versions  # noqa: F401  (re-exported)


# The seed's bisection plan: embedding, every sub-stage of layer 0, each layer's
# output, the final norm and the logits. A glob's `*` also matches dots, so
# `layers.*.out` would add every layer's attn.out too; `*[0-9].out` is the layer output only.
DEFAULT_TAPS = (tuple(s.name for s in GLOBAL_HEAD) + ("layers.0.*", "layers.*[0-9].out")
                + tuple(s.name for s in GLOBAL_TAIL))


def add_model_arguments(parser, default_dtype: str = "float16") -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", default="synthetic",
                   help="model directory, .gguf file, Hugging Face repo id, or synthetic[:preset][:seed=N] "
                        "(presets: tiny, small, medium, tinyllama; default: synthetic = TinyLlama-1.1B shape)")
    g.add_argument("--dtype", default=default_dtype, help="float16 (default, as the reference), bfloat16, float32")
    g.add_argument("--policy", default="hf", choices=POLICIES,
                   help="precision policy: hf (RMSNorm statistics and softmax in fp32, as transformers), "
                        "mixed (attention scores in fp32 too), fp16-pure (everything in the model dtype)")
    g.add_argument("--kernels", default=None, choices=KERNELS,
                   help="fused mx.fast kernels or explicit sub-operations (default: fused for --policy hf, "
                        "explicit otherwise)")
    g.add_argument("--download", action="store_true",
                   help="allow downloading a Hugging Face repo id that is not in the local cache")


def _progress():
    """A rich progress bar on a terminal (generating or reading big weights); silent otherwise."""
    if not sys.stderr.isatty():
        return None, None
    from rich.progress import Progress

    prog = Progress(transient=True, console=_console(stderr=True))
    task = prog.add_task("loading", total=None)
    started = [False]

    def update(done, total, label="loading"):
        if not started[0]:
            prog.start()
            started[0] = True
        prog.update(task, completed=done, total=total, description=label)

    return prog, update


def load_model(args) -> sources.LoadedModel:
    prog, update = _progress()
    if sys.stderr.isatty():
        print(f"loading {args.model} ({sources.dtype_name(args.dtype)}) ...", file=sys.stderr)
    try:
        return sources.load(args.model, args.dtype, args.policy, args.kernels,
                            allow_download=args.download, progress=update)
    finally:
        if prog is not None:
            prog.stop()


# Pieces of the commands' specs (contracts.py) that several commands share.
MODEL_PATH = PathOption("--model", MODEL)
PROMPT_PATH = PathOption("--prompt-file", READ_FILE)
JSON_PATH = PathOption("--json", WRITE_FILE)
REPORT_PATHS = (PathOption("--report", WRITE_FILE), PathOption("--plots", WRITE_DIR))


def _reports(args) -> bool:
    return bool(getattr(args, "report", None) or getattr(args, "plots", None))


def _may_download(args) -> bool:
    """Whether --model could be a Hugging Face repo id (not synthetic, no such local path)."""
    spec = getattr(args, "model", None)
    return spec is None or not (str(spec).startswith("synthetic") or Path(spec).expanduser().exists())


MODEL_UNUSED = (Unused("--download", _may_download,
                       "with a synthetic or local --model (it fetches a Hugging Face repo id)"),)
PROMPT_UNUSED = (Unused("--bos", lambda a: getattr(a, "token_ids", None) is None,
                        "with --token-ids (the ids are taken as given, with or without BOS)"),)
REPORT_UNUSED = tuple(Unused(o, _reports, "without --report or --plots (it chooses what they show)")
                      for o in ("--attention-layers", "--attention-heads"))


def check_outputs(args) -> None:
    """The paths of this run against its command's declared spec (contracts.py): every output
    writable, none an input (declared or implied: a manifest's tensors, a dump's shards, a step
    directory's files, the llama.cpp binary), none inside the model directory or the synthetic
    cache, no two the same. The CLI runs it before each command; a bad output path costs nothing."""
    spec = getattr(args, "_spec", None)
    if spec is None:
        raise AssertionError("a command without a contracts.Spec: declare its paths (SPEC in its module)")
    contracts.check_paths(spec, args)


check_writable = outputs.check_file  # the older name, for callers on other branches


def prompt_for(args, lm: sources.LoadedModel):
    """The prompt options in `args`, tokenized with the model's tokenizer and chat template."""
    from .prompt import resolve_prompt

    location = lm.source.path
    return resolve_prompt(args, location, location if location.is_dir() else None)


def add_prompt_arguments(parser) -> None:
    group = parser.add_argument_group("prompt (default: the seed's chat prompt, 38 ids)")
    which = group.add_mutually_exclusive_group()
    which.add_argument("--prompt", metavar="TEXT", help="raw prompt text (no chat template)")
    which.add_argument("--prompt-file", metavar="PATH", help="raw prompt text from a UTF-8 file, taken byte for byte")
    which.add_argument("--token-ids", metavar="1,2,3",
                       help="token ids given directly, not tokenized (BOS, id 1, is in them or not: --bos is refused)")
    which.add_argument("--chat", metavar="USER", help="user message, rendered with the model's chat template")
    group.add_argument("--system", metavar="TEXT", help="system message for --chat")
    group.add_argument("--bos", action=argparse.BooleanOptionalAction, default=False,
                       help="prepend BOS (id 1); the reference did not (default: --no-bos)")
    group.add_argument("--tokenizer", choices=TOKENIZER_KINDS, default="auto",
                       help="auto (default): tokenizer.model where the model has one, else tokenizer.json; "
                            "sentencepiece: tokenizer.model, the ground truth of Llama 2 checkpoints; "
                            "hf: the model's tokenizer.json through `tokenizers`, as transformers does")


def add_engine_comparison_arguments(parser, json_help: str = "write the comparison as JSON") -> None:
    """What a command that runs another engine and compares it (llamacpp, onnx) shares with compare:
    tolerance overrides, the JSON and the table's length, the report and the prompt."""
    parser.add_argument("--tol", action="append", metavar="[TAP:]METRIC=V", help="override a tolerance (repeatable)")
    parser.add_argument("--json", metavar="PATH", help=json_help)
    parser.add_argument("--all", action="store_true", help="list every entry, not only the stages around a divergence")
    add_report_arguments(parser, "the comparison (divergence map, table)")
    add_prompt_arguments(parser)


def add_report_arguments(parser, what: str = "this run") -> None:
    """`--report`, `--plots` and the attention-map options, for every command that reports."""
    g = parser.add_argument_group("report")
    g.add_argument("--report", metavar="PATH.html", help=f"write a self-contained HTML report of {what}")
    g.add_argument("--plots", metavar="DIR", help="save the report's plots as PNG files in DIR")
    g.add_argument("--attention-layers", metavar="0,21", help="layers whose attention maps the report shows "
                   "(default: the first and the last)")
    g.add_argument("--attention-heads", metavar="0,1", help="query heads to show per layer (default: 0,1)")


def report_options(args) -> dict:
    """The keyword options of the *_report functions from parsed `add_report_arguments` options."""
    from .report import parse_int_list

    return {"attention_layers": parse_int_list(getattr(args, "attention_layers", None), "--attention-layers"),
            "attention_heads": parse_int_list(getattr(args, "attention_heads", None), "--attention-heads")}


def tokenizer_for(lm: sources.LoadedModel, args=None):
    """The tokenizer that `--tokenizer` names (sentencepiece when the command has no such option)."""
    return runtime.tokenizer_for(lm, getattr(args, "tokenizer", None))


def _console(stderr: bool = False):
    import os

    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Piped output (logs, CI, diffs against another engine) gets wide tables, not 80 columns.
    width = None if stream.isatty() or os.environ.get("COLUMNS") else 200
    return Console(stderr=stderr, highlight=False, width=width)


def console():
    return _console()


# ---------------------------------------------------------------------------
# A comparison's output: `compare` and `run --compare`


def emulate_engine(args, candidate, lm):
    """Make lm compute with the llama.cpp log's precision (or --emulate's); returns what it emulates."""
    from .emulation import EnginePrecision, emulate, engine_from_log

    info = candidate.provenance.get("llama.cpp")
    if info is None or args.emulate == "fp32":
        if args.emulate not in ("auto", "fp32"):
            raise UserError("--emulate applies to llama.cpp logs only")
        return None
    if args.emulate == "auto":
        engine, notes = engine_from_log(info, lm.source.details.get("tensor_types"), lm.config)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    else:
        engine = EnginePrecision.parse(args.emulate)
    if engine.is_fp32:
        return engine
    if lm.dtype != "float32":
        raise UserError(f"emulating {engine.describe()} needs --dtype float32 (the reference is {lm.dtype})")
    emulate(lm.model, engine)
    print(f"reference computed with llama.cpp's precision: {engine.describe()}", file=sys.stderr)
    return engine


def check_tokens(candidate, ids: list[int], lm) -> None:
    """A log made for other token ids is a prompt problem, not a divergence: say which ids differ."""
    if candidate.kind != "llama.cpp-log" or candidate.ids is None or list(candidate.ids) == list(ids):
        return  # (other references say so through compare's incompatibility check)
    from .tokendiff import compare_ids
    from .tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(lm.source.path, "auto")
    except UserError:
        tokenizer = None
    alignment = compare_ids(list(ids), list(candidate.ids), tokenizer)
    raise UserError(f"{candidate.name} was made for different token ids than this prompt ({alignment.summary()}): "
                    + "; ".join(d.message for d in alignment.differences)
                    + ". Nothing was compared: fix the prompt (--bos, --prompt-file ...) or let compare take the "
                      "log's own ids (give no prompt option)")


def mark_emulated(reference, engine) -> None:
    """The reference side computed with `engine`'s precision: say so, and take its tolerance class."""
    reference.provenance["emulated_engine_precision"] = engine.describe()
    reference.dtype = engine.tolerance_class


def finish_comparison(args, header, comparison: dict, lm=None) -> int:
    """`header` (results.ResultHeader) + the comparison: settle the verdict (verdict.py: status,
    exit code and the verdict line, the one statement of the outcome), write --json and
    --report/--plots (compare's own or run's), print the table, the coverage and the verdict line
    last; return the verdict's exit code (0 match, 1 diverged or incomplete)."""
    from .verdict import shared_input, verdict

    result = {**header.as_dict(), **comparison}
    if lm is not None and result["candidate"]["kind"] != "run":  # another engine's numbers vs our run of lm
        result["shared_input"] = shared_input(lm.source, result["candidate"]["kind"])
    result["verdict"] = verdict(result)
    result["status"] = result["verdict"]["status"]
    if getattr(args, "json", None):
        write_json(args.json, result)
    if getattr(args, "report", None) or getattr(args, "plots", None):
        from .report import compare_report

        compare_report(result, lm, html_path=getattr(args, "report", None),
                       plots_dir=getattr(args, "plots", None), **report_options(args))
    print_comparison(result, show_all=bool(getattr(args, "all", False)))
    print_localization(result)
    print_verdict(result)
    return result["verdict"]["exit_code"]


def print_verdict(result: dict) -> None:
    """The notes that qualify the outcome, then the verdict line: the last line printed."""
    from rich.markup import escape

    con = console()
    shared = result.get("shared_input")
    if shared:
        con.print(f"[yellow]note[/]: {escape(shared['note'])}", soft_wrap=True)
    v = result["verdict"]
    colour = {"match": "bold green", "diverged": "bold red"}.get(v["status"], "bold yellow")
    status, _, rest = v["line"].partition(":")
    con.print(f"[{colour}]{status}[/]:{escape(rest)}", soft_wrap=True)  # one line, whatever the width


def print_comparison(result: dict, show_all: bool = False) -> None:
    from rich.table import Table

    con = console()
    def named(side):  # a run's name already ends with its dtype ("this package (M, float32)")
        dtype = side['dtype'] or '?'
        return side['name'] if side['name'].endswith(f", {dtype})") else f"{side['name']} ({dtype})"

    refs_ = ", ".join(named(r) for r in result["references"])
    con.print(f"[bold]compare[/] {named(result['candidate'])} against {refs_}")
    basis = result.get("tolerance_basis")
    if basis:
        con.print(f"tolerance: {basis['dtype']} ({basis['reason']})", markup=False, highlight=False)
    for s in result["skipped"]:
        con.print(f"[yellow]skipped[/] {s['source']}: {s['reason']}")
    entries = result["entries"]
    d = result["first_divergence"]
    if not show_all and d:
        keep = {d["tap"]} | {x["tap"] for x in (d["before"], d["after"]) if x}
        entries = [e for e in entries if e["tap"] in keep or not e["ok"]][:60]
    t = Table(title="stages in forward order" + ("" if show_all or not d else
                                                  " (around the first divergence; --all for every entry)"))
    for col in ("stage", "index", "metric", "value", "tolerance", "ok"):
        t.add_column(col, justify="left" if col in ("stage", "index", "metric") else "right", no_wrap=True)
    for e in entries:
        style = None if e["ok"] else "bold red"
        t.add_row(e["tap"], e["index"], e["metric"], fmt(e["value"]), fmt(e["tolerance"]),
                  "yes" if e["ok"] else "NO", style=style)
    con.print(t)
    n_ok = sum(e["ok"] for e in result["entries"])
    con.print(f"{n_ok}/{len(result['entries'])} entries within tolerance over {len(result['stages'])} stages")
    if result["not_compared"]:
        con.print(f"not compared: {len(result['not_compared'])} item(s), e.g. "
                  f"{result['not_compared'][0]['key']}: {result['not_compared'][0]['reason']}")
    nf = result["first_nonfinite"]
    if nf:
        con.print(f"[red]first non-finite value[/]: {nf['tap']}{nf['index']} = {nf['value']} ({nf['count']} in that tap)")
    if result.get("partial_rows"):  # what a verdict on these stages covers: the rows they hold
        con.print("compared on some token rows only: " + ", ".join(f"{t}: {n}" for t, n in result["partial_rows"].items()),
                  markup=False, highlight=False)
    if not d:  # the outcome itself is the verdict line, printed last (print_verdict)
        return
    err = d["error"]
    con.print(f"[bold red]first divergence: {d['tap']}[/] ({d['what']}): {err['metric']} = {fmt(err['value'])}, "
              f"tolerance {fmt(err['tolerance'])} ({fmt(err['ratio'])}x) at {err['index']}")
    if d["before"]:
        con.print(f"  before: {d['before']['tap']} {'matches' if d['before']['ok'] else 'differs'}")
    if d["after"]:
        con.print(f"  after:  {d['after']['tap']} {'matches' if d['after']['ok'] else 'differs'}"
                  f" ({d['after']['metric']} {fmt(d['after']['value'])})")
    con.print(f"  hint: {d['hint']}")


def print_localization(result: dict) -> None:
    """Coverage (grid and summary), the localized stage, the diagnosis, the --require check."""
    from rich.markup import escape

    from .localize.coverage import grid_lines, summary

    con = console()
    cov = result.get("coverage")
    if cov:
        n_layers = len({split_name(t)[0] for t in cov["cells"]} - {None})
        ok = {s["tap"]: s["ok"] for s in result["stages"]}
        con.print("coverage (✓ matches, ✗ diverges, · missing from their dump, ? not comparable, S shape mismatch):",
                  markup=False)
        for line in grid_lines(cov, ok, n_layers):
            con.print("  " + line, markup=False, highlight=False)
        con.print(summary(cov), markup=False)
    loc = result.get("localized")
    first = result.get("first_divergence")
    if loc:
        text = (f"[bold red]localized: {loc['stage']}[/]: its own error, from their inputs, is "
                f"{fmt(loc['local_ratio'])}x its tolerance (inherited from its inputs: {fmt(loc['inherited_ratio'])}x)")
        if first and first["tap"] != loc["stage"]:
            local = next((s.get("local_ratio") for s in result["stages"] if s["tap"] == first["tap"]), None)
            text += (f"; {first['tap']}, the first stage over tolerance, is within tolerance locally "
                     f"({fmt(local)}x): it amplifies what it inherited" if local is not None else
                     f"; {first['tap']}, the first stage over tolerance, could not be replayed")
        con.print(text)
    elif result.get("replay", {}).get("note") and result["status"] == "diverged":
        con.print(f"[yellow]localized: none[/]: {escape(result['replay']['note'])}")
    for d in result.get("diagnosis", []):
        con.print(f"[bold]diagnosis[/] {d['stage']}: matches after [bold]{d['transform']}[/] "
                  f"(ratio {fmt(d['ratio_after'])}): {escape(d['words'])}")
    req = result.get("required")
    if req and req["not_compared"]:
        con.print(f"[bold red]required but not compared[/] ({', '.join(req['patterns'])}): "
                  f"{', '.join(req['not_compared'][:8])}" + (" ..." if len(req["not_compared"]) > 8 else ""))

"""`compare`: check a run, or another engine's numbers, against a reference and name
the first stage that diverges.

    compare --ref refs/synthetic-tiny-fp32.json                 # this package's run vs a reference
    compare --against their_dump.safetensors --model synthetic:tiny   # their dump vs this package's run
    compare --against llama_eval_callback.log --ref REF          # their log vs a reference

Exit code 0: every compared stage within tolerance; 1: something diverges; 2: bad input.
"""

from __future__ import annotations


from .. import cli_common
from ..compare import compare, compared_ids, needs_shortcut, run_side
from ..errors import UserError
from ..refs.loaders import load, read_name_map
from ..refs.side import Side
from ..results import PromptRecord, ResultHeader
from ..tolerances import Tolerances


def add_arguments(p) -> None:
    p.add_argument("--ref", metavar="REF", help="reference: a refs/*.json manifest, a seed bundle (refs/*.seed.json, "
                                                "optionally #SOURCE), or one of the seed's JSON files")
    p.add_argument("--against", metavar="FILE", help="another engine's numbers: .safetensors/.npz tensors, a stats "
                                                     "JSON (run --json shape), or a llama.cpp eval-callback log")
    p.add_argument("--map", metavar="FILE.json", help="name mapping {their name: canonical tap} for --against")
    p.add_argument("--layout", choices=("hf", "gguf"), help="Q/K layout of --against (default: gguf for llama.cpp "
                                                           "logs, hf otherwise)")
    p.add_argument("--against-dtype", metavar="DTYPE", help="precision of --against for tolerances (default: "
                                                            "its tensors' dtype)")
    p.add_argument("--tol", action="append", metavar="[TAP:]METRIC=V",
                   help="override a tolerance (repeatable): nmse=1e-6, layers.0.attn.probs:nmse=1e-4, scale=10")
    p.add_argument("--json", metavar="PATH", help="write the comparison (status, first_divergence, entries) as JSON")
    p.add_argument("--all", action="store_true", help="list every entry, not only the stages around a divergence")
    cli_common.add_report_arguments(p, "the comparison (divergence map, table)")
    cli_common.add_model_arguments(p)
    p.set_defaults(model=None)  # None: the reference's own model (full-tensor references), else synthetic
    cli_common.add_prompt_arguments(p)


def main(args) -> int:
    if not args.ref and not args.against:
        raise UserError("compare needs --ref REF and/or --against FILE")
    cli_common.check_outputs(args)
    cli_common.report_options(args)  # a malformed --attention-layers fails before the model loads
    tol = Tolerances.from_overrides(args.tol)
    name_map = read_name_map(args.map)
    references = _load_ref(args.ref) if args.ref else None
    if args.against:
        candidate = load(args.against, name_map, args.layout)
        if len(candidate) != 1:
            raise UserError(f"--against {args.against}: holds {len(candidate)} sources; give one dump")
        candidate = candidate[0]
        if args.against_dtype:
            from ..tolerances import dtype_key

            candidate.dtype = dtype_key(args.against_dtype)
    if references is not None and not args.against:  # this package's run against the reference
        lm, prompt = _load_run(args, references)
        candidate = run_side(lm, prompt.ids, shortcut=needs_shortcut(references))
        result = compare(candidate, references, tol, lm.config.as_dict(), len(prompt.ids))
        return cli_common.finish_comparison(args, ResultHeader.of_run("compare", lm, prompt), result, lm)
    if references is None:  # their dump against this package's run
        lm, prompt = _load_run(args, [candidate])
        references = [run_side(lm, prompt.ids)]
        result = compare(candidate, references, tol, lm.config.as_dict(), len(prompt.ids))
        return cli_common.finish_comparison(args, ResultHeader.of_run("compare", lm, prompt), result, lm)
    cfg = _config(args, references)  # their dump against a stored reference
    n_tokens = next((r.n_tokens for r in references if r.n_tokens), None) or candidate.n_tokens
    if not n_tokens:
        raise UserError("cannot tell the number of tokens: neither the reference nor the dump records it")
    result = compare(candidate, references, tol, cfg, n_tokens)
    ids = compared_ids(candidate, references)
    prompt = PromptRecord(ids, source="the compared files' token ids") if ids else None
    return cli_common.finish_comparison(args, ResultHeader.without_model("compare", candidate.dtype, prompt), result)


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
    lm = cli_common.load_model(args)
    ids_from_dump = next((s.ids for s in sides if s.kind not in ("full-tensors", "seed-json") and s.ids), None)
    if ids_from_dump and not _prompt_given(args):
        lm.config.check_ids(ids_from_dump)
        return lm, Prompt(ids=list(ids_from_dump), text=None, source="the dump's token ids")
    return lm, cli_common.prompt_for(args, lm)


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

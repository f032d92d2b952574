"""`generate`: prefill the prompt, then generate through the KV cache, streaming the
text to stdout as tokens come. Greedy by default; --temperature/--top-p/--top-k
sample with mlx-lm's samplers, --seed makes sampling reproducible. --tap-step N
--taps GLOB records the stages of step N (0 = the prefill, n = the decode step
that consumes generated token n-1)."""

from __future__ import annotations

import sys
import time

from .. import cli_common, contracts
from ..contracts import Unused
from ..errors import UserError
from ..results import ResultHeader
from ..cli_common import fmt

SPEC = contracts.Spec(
    paths=(cli_common.MODEL_PATH, cli_common.PROMPT_PATH, cli_common.JSON_PATH),
    unused=tuple(Unused(o, lambda a: a.temperature > 0, "with greedy decoding (--temperature 0; it shapes sampling)")
                 for o in ("--top-p", "--top-k", "--seed")) + cli_common.MODEL_UNUSED + cli_common.PROMPT_UNUSED,
)


def add_arguments(p) -> None:
    cli_common.add_model_arguments(p)
    cli_common.add_prompt_arguments(p)
    g = p.add_argument_group("generation")
    g.add_argument("--max-tokens", type=int, default=64, help="generate at most N tokens (default 64)")
    g.add_argument("--temperature", "--temp", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens with "
                                                             "probability >= P, in (0, 1] (default 1 = off)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the K most likely tokens (default 0 = off)")
    g.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at EOS (id 2)")
    g.add_argument("--tap-step", type=int, metavar="N",
                   help="record the stages of step N (0 = the prompt's prefill, n >= 1 = the n-th decode step)")
    g.add_argument("--taps", action="append", metavar="GLOB",
                   help=f"stages to record at --tap-step (repeatable; default: {' '.join(cli_common.DEFAULT_TAPS)})")
    g.add_argument("--json", metavar="PATH", help="write token_ids, text, stop reason (and the taps) as JSON")


def _sampling(args):
    from ..generate import Sampling

    s = Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    s.check()
    return s


def main(args) -> int:
    from ..generate import TextStream, generate_tokens
    from ..taps import select

    sampling = _sampling(args)
    if args.max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.taps and args.tap_step is None:
        raise UserError("--taps needs --tap-step N (which step to record)")
    if args.tap_step is not None and not 0 <= args.tap_step < args.max_tokens:
        raise UserError(f"--tap-step must be in 0..{args.max_tokens - 1} (--max-tokens {args.max_tokens})")
    lm = cli_common.load_model(args)
    prompt = cli_common.prompt_for(args, lm)
    lm.config.check_ids(prompt.ids)
    names = select(args.taps or cli_common.DEFAULT_TAPS, lm.config.num_hidden_layers) if args.tap_step is not None else []
    tokenizer = cli_common.tokenizer_for(lm, args)
    stream = TextStream(tokenizer, _write_stdout)
    stamps: list[float] = []  # when each token was chosen: prefill and decode rates apart

    def on_token(token: int) -> None:
        stamps.append(time.perf_counter())
        stream(token)

    # Taps on: the eager path, whose cache is made outside the clock (its first use imports
    # mlx-lm). Taps off: generate makes the fixed-capacity cache of the compiled decode.
    cache = lm.model.make_cache() if names else None
    started = time.perf_counter()
    gen = generate_tokens(lm.model, prompt.ids, args.max_tokens, sampling, stop_at_eos=not args.ignore_eos,
                          on_token=on_token, tap_step=args.tap_step, tap_names=names, cache=cache)
    seconds = time.perf_counter() - started
    text = stream.finish()
    _write_stdout("\n")
    result = _result(args, lm, prompt, sampling, gen, text, tokenizer, seconds)
    result["prefill_seconds"] = stamps[0] - started if stamps else None
    result["decode_tokens_per_s"] = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None
    _summary(result)
    if args.json:
        cli_common.write_json(args.json, result)
    return 0


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _result(args, lm, prompt, sampling, gen, text, tokenizer, seconds) -> dict:
    return {
        **ResultHeader.of_run("generate", lm, prompt).as_dict(),
        "sampling": {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
                     "seed": sampling.seed, "greedy": sampling.greedy},
        "token_ids": gen.token_ids, "text": text, "pieces": tokenizer.pieces(gen.token_ids),
        "stop_reason": gen.stop_reason, "max_position_embeddings": lm.config.max_position_embeddings,
        "seconds": seconds, "decode": gen.decode, "tap_step": gen.tap_step,
        "taps": gen.taps.stats() if gen.taps is not None else {},
    }


STOP_MESSAGES = {
    "eos": "stopped at EOS (id 2)",
    "max_tokens": "stopped at --max-tokens",
    "max_position": "stopped: the sequence reached max_position_embeddings={max_pos} "
                    "(prompt {prompt} + {generated} generated); positions beyond it were never trained",
}


def _summary(result: dict) -> None:
    from rich.table import Table

    con = cli_common._console(stderr=True)
    n = len(result["token_ids"])
    msg = STOP_MESSAGES[result["stop_reason"]].format(max_pos=result["max_position_embeddings"],
                                                      prompt=len(result["prompt"]["ids"]), generated=n)
    rate = ""
    if result.get("prefill_seconds") is not None:
        rate = f", prefill of {len(result['prompt']['ids'])} tokens {1e3 * result['prefill_seconds']:.0f} ms"
    if result.get("decode_tokens_per_s"):
        rate += f", decode {result['decode_tokens_per_s']:.1f} tokens/s"
    con.print(f"[dim]{n} tokens{rate}; {msg}[/]" if result["stop_reason"] != "max_position" else f"[yellow]{msg}[/]")
    if result["tap_step"] is not None and not result["taps"]:
        con.print(f"[yellow]step {result['tap_step']} was not reached: generation stopped after {n} steps[/]")
    if result["taps"]:
        t = Table(title=f"stages of step {result['tap_step']}")
        for col in ("stage", "shape", "min", "max", "mean", "std", "nan", "inf", "last row [:3]"):
            t.add_column(col, justify="left" if col in ("stage", "shape") else "right", no_wrap=True)
        for name, s in result["taps"].items():
            t.add_row(name, "×".join(map(str, s["shape"])), *(fmt(s[k]) for k in ("min", "max", "mean", "std")),
                      str(s["nan"]), str(s["inf"]), ", ".join(fmt(v) for v in s["last"]),
                      style="bold red" if s["nan"] or s["inf"] else None)
        con.print(t)

"""`python -m mlx_tinyllama.trace [COMMAND] ...`: the command-line tool.

Each command lives in `mlx_tinyllama/commands/<name>.py` with `add_arguments(parser)`
and `main(args) -> int`. `run` is the default command. A `UserError` anywhere
becomes one `error: ...` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import UserError

# name -> one-line help; the module is mlx_tinyllama.commands.<name>
COMMANDS = {
    "run": "run the forward pass and record its stages (default)",
    "tokens": "tokenize a prompt, show ids and pieces, diff against another engine's ids",
    "compare": "compare a run or another engine's dump against a reference; find the first divergence",
    "paths": "check prefill, token-by-token decode and chunked prefill agree, stage by stage",
    "generate": "generate tokens through the KV cache (greedy or sampled), optionally tapped",
    "stability": "fp16/bf16 vs fp32 side by side: headroom, non-finite origin, precision policies",
    "bench": "prefill/decode throughput, tap overhead, per-stage cost, side by side with mlx-lm",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_tinyllama.trace",
        description="Instrumented TinyLlama forward pass in MLX: see, stage by stage, what correct numbers look like.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"mlx_tinyllama.commands.{name}")
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["run", *argv]
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "_main"):
        parser.print_help()
        return 2
    try:
        return int(args._main(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`python -m mlx_tinyllama.trace [COMMAND] ...`: the command-line tool.

Each command lives in `mlx_tinyllama/commands/<name>.py` with `add_arguments(parser)`,
`main(args) -> int` and `SPEC` (contracts.py: its paths and the options a mode does not
use), checked here before `main` runs, with repeated and empty options. `run` is the
default command. A `UserError` anywhere becomes one `error: ...` line on stderr and exit
code 2; a failed write (disk full, read-only) exit 1; Ctrl-C or SIGTERM exit 130; any
other exception is a bug: one line and exit 3, with the traceback under `--debug`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import errno

from .errors import OutputError, UserError

# Errors of the machine rather than of the input or the code: exit 1 like a failed write.
_MACHINE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EIO, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}

# name -> one-line help; the module is mlx_tinyllama.commands.<name> ("-" written "_")
COMMANDS = {
    "run": "run the forward pass and record its stages (default)",
    "tokens": "tokenize a prompt, show ids and pieces, diff against another engine's ids",
    "compare": "compare a run or another engine's dump against a reference; find the first divergence",
    "llamacpp": "run llama.cpp's llama-eval-callback on a GGUF and find its first divergence from this reference",
    "onnx": "run an ONNX Llama with ONNX Runtime, every stage exposed, and find its first divergence from this reference",
    "paths": "check prefill, token-by-token decode and chunked prefill agree, stage by stage",
    "generate": "generate tokens through the KV cache (greedy or sampled), optionally tapped",
    "stability": "fp16/bf16 vs fp32 side by side: headroom, non-finite origin, precision policies",
    "bench": "prefill/decode throughput, tap overhead, per-stage cost, side by side with mlx-lm",
    "vectors": "kernel conformance vectors: golden inputs/outputs per op, check another engine's kernels",
    "gguf-check": "check a GGUF against the Hugging Face checkpoint it came from: tensors, Q/K permutation, metadata",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_tinyllama.trace",
        description="Instrumented TinyLlama forward pass in MLX: see, stage by stage, what correct numbers look like. "
                    "Every command takes --debug: the traceback of an internal error.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"mlx_tinyllama.commands.{name.replace('-', '_')}")
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.add_argument("--debug", action="store_true", help="show the traceback of an internal error")
        p.set_defaults(_main=module.main)
        if getattr(module, "SPEC", None) is not None:  # (vectors: each subcommand sets its own)
            p.set_defaults(_spec=module.SPEC)
        _track(p)
    return parser


# --- options mean one thing -----------------------------------------------------------------


def _track(parser) -> None:
    """Every option of `parser` (and of its subcommands) records, when given, (action, flag, value)
    in the namespace's `_given`: argparse itself keeps only the last value of a repeated option."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _track(sub)
        elif action.option_strings and not isinstance(action, (argparse._HelpAction, _Tracked)):
            action.__class__ = type(f"Tracked{type(action).__name__}", (_Tracked, type(action)), {})


class _Tracked(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(namespace, "_given", None)
        if given is None:
            given = []
            setattr(namespace, "_given", given)
        given.append((self, option_string, values))
        super().__call__(parser, namespace, values, option_string)


# Options whose repetition is their meaning (each adds a value) or harmless (a flag set twice).
_REPEATABLE = (argparse._AppendAction, argparse._AppendConstAction, argparse._CountAction, argparse._ExtendAction,
               argparse._StoreTrueAction, argparse._StoreFalseAction)


def check_given(args) -> set[str]:
    """A single-valued option given twice, or an option given an empty value, is refused (argparse
    would keep the last value without a word). Returns the dests given explicitly."""
    given = getattr(args, "_given", [])
    seen: dict = {}
    for action, flag, value in given:
        dest = action.dest
        if dest in seen and not isinstance(action, _REPEATABLE):
            first_flag, first = seen[dest]
            if isinstance(action, argparse.BooleanOptionalAction):
                if first_flag != flag:
                    raise UserError(f"{first_flag} and {flag} both given: they contradict each other; give one")
            else:
                raise UserError(f"{flag} given twice ({first_flag} {_shown(first)}, then {flag} {_shown(value)}): "
                                "it takes one value; give it once")
        seen.setdefault(dest, (flag, value))
    spec = getattr(args, "_spec", None)
    empty_ok = spec.empty_ok if spec is not None else ()
    for action, flag, value in given:
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, str) and not v.strip() for v in values) and flag not in empty_ok:
            raise UserError(f"{flag}: an empty value; give one, or leave {flag} out for its default")
    return set(seen)


def _shown(value) -> str:
    text = " ".join(map(str, value)) if isinstance(value, list) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."  # a 2 MB --prompt stays one short line


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the command line itself (not a test calling main): OpenBLAS on Linux, before MLX loads
        from .blas import ensure_fast_blas

        ensure_fast_blas()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--debug"] and argv[1:2] and argv[1] in COMMANDS:  # `--debug COMMAND ...` too
        argv = [argv[1], "--debug", *argv[2:]]
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["run", *argv]
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "_main"):
        parser.print_help()
        return 2
    debug = args.debug
    try:
        with _sigterm_as_interrupt():
            given = check_given(args)
            # The command's declared contract, before anything loads: options it would not use,
            # outputs that would land on an input, a model or the cache (contracts.py)
            spec = getattr(args, "_spec", None)
            if spec is None:  # a bug of a new command, caught by tests/test_robustness.py too
                raise RuntimeError(f"command {args.command!r} declares no SPEC (contracts.py)")
            spec.check(args, given)
            return int(args._main(args) or 0)
    except UserError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OutputError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if debug or e.errno not in _MACHINE_ERRNOS:
            if debug:
                raise
            return _internal(e)
        # The machine's fault (disk full, I/O error), not the input's and not a bug.
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"error: cannot write{where}: {e.strerror or e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001: a bug; the user gets one line and a way to see more
        if debug:
            raise
        return _internal(e)


def _internal(e: BaseException) -> int:
    print(f"error: internal error {type(e).__name__}: {_one_line(e)}; rerun with --debug for the traceback "
          "and please report it", file=sys.stderr)
    return 3


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


class _sigterm_as_interrupt:
    """SIGTERM (a killed job, a timeout) unwinds like Ctrl-C, so writers clean up their temporary files."""

    def __enter__(self):
        import signal
        import threading

        self._old = None
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGTERM"):
            self._old = signal.signal(signal.SIGTERM, _raise_interrupt)
        return self

    def __exit__(self, *exc):
        import signal

        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())

"""`llamacpp`: from a GGUF to llama.cpp's first divergence in one command.

    llamacpp --gguf model.gguf [--llama-cpp BIN_OR_DIR] [prompt options] [--report x.html] [--json x.json]

Runs llama.cpp's `llama-eval-callback` on the GGUF with the prompt, reads its log, runs this
package's reference on the same GGUF with llama.cpp's precision (read from the log), and compares
stage by stage. The prompt goes to llama.cpp through `-f FILE` with one extra trailing newline
(`-f` strips one); llama.cpp adds BOS when the GGUF says so and parses special tokens, so the
reference's ids are encoded the same way, and a mismatch is reported as such (exit 2).

Exit code 0: every stage matches; 1: a stage diverges; 2: bad input, a missing binary, a token mismatch.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from .. import cli_common, contracts, outputs
from ..child import run_bounded
from ..contracts import READ_ANY, READ_FILE, WRITE_FILE, PathOption
from ..compare import compare, run_side
from ..errors import UserError
from ..localize.coverage import coverage
from ..refs.llamacpp import parse_llamacpp_log
from ..results import ResultHeader
from ..tolerances import Tolerances

BINARY = "llama-eval-callback"
DEFAULT_TIMEOUT_S = 600  # TinyLlama's 39-token prompt takes seconds on 2 cores; a 2,048-token one minutes
DEFAULT_MAX_LOG_MB = 128  # TinyLlama's log of a 39-token prompt is 1.3 MB; `compare` reads logs up to this too
BUILD_HINT = "build it with `bash scripts/llamacpp/build.sh` (llama.cpp from the llama-cpp-python sdist, ~17 min on 2 cores)"


def _binary(value, args) -> dict:
    """The binary this run would start (given, on $PATH or built here): an input like the GGUF."""
    try:
        return {f"the {BINARY} binary": find_binary(value)}
    except UserError:
        return {}  # main() says how to build it


SPEC = contracts.Spec(
    paths=(PathOption("--gguf", READ_FILE), PathOption("--llama-cpp", READ_ANY, implies=_binary, always=True),
           PathOption("--log", WRITE_FILE), cli_common.JSON_PATH, *cli_common.REPORT_PATHS, cli_common.PROMPT_PATH),
    unused=cli_common.REPORT_UNUSED,  # (--token-ids is refused outright: llama.cpp takes text)
    empty_ok=("--llama-args",),  # '' is its default: no extra arguments
)


def add_arguments(p) -> None:
    p.add_argument("--gguf", required=True, metavar="FILE", help="the GGUF both engines run")
    p.add_argument("--llama-cpp", metavar="BIN_OR_DIR",
                   help=f"{BINARY}, or a folder holding it (or its build/bin); default: $PATH, then .llamacpp/build/bin")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads (-t)")
    p.add_argument("--llama-args", metavar="ARGS", default="",
                   help="more llama-eval-callback arguments, e.g. \"-fa off -ctk f32 -ctv f32\"")
    p.add_argument("--log", metavar="PATH", help="also keep llama.cpp's log here")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help=f"stop llama.cpp (its whole process group) after this long (default {DEFAULT_TIMEOUT_S})")
    p.add_argument("--max-log-mb", type=float, default=DEFAULT_MAX_LOG_MB, metavar="MB",
                   help=f"stop llama.cpp once its output exceeds this (default {DEFAULT_MAX_LOG_MB})")
    p.add_argument("--emulate", default="auto", metavar="auto|fp32|matmul=f16,kv=f16,fa=on",
                   help="the reference's precision: auto (default) reads llama.cpp's from its log and the GGUF")
    cli_common.add_engine_comparison_arguments(p, "write the comparison as JSON")


def find_binary(given: str | None, repo_root: Path | None = None) -> Path:
    """The llama-eval-callback to run, or one UserError line that says how to build it."""
    if given:
        p = Path(given)
        for c in (p, p / BINARY, p / "bin" / BINARY, p / "build" / "bin" / BINARY):
            if c.is_file() and os.access(c, os.X_OK):
                return c
        raise UserError(f"--llama-cpp {given}: no executable {BINARY} there (nor in its bin/ or build/bin/); "
                        + BUILD_HINT)
    found = shutil.which(BINARY)
    if found:
        return Path(found)
    root = repo_root or Path(__file__).resolve().parents[2]
    local = root / ".llamacpp" / "build" / "bin" / BINARY
    if local.is_file():
        return local
    raise UserError(f"{BINARY} not found (not on $PATH, not in {local.parent}): {BUILD_HINT}, "
                    "or pass --llama-cpp BIN_OR_DIR")


def run_eval_callback(binary: Path, gguf: Path, text: str, threads: int, extra: list[str],
                      timeout_s: float = DEFAULT_TIMEOUT_S, max_log_mb: float = DEFAULT_MAX_LOG_MB) -> str:
    """llama.cpp's log (stdout and stderr, as a user would save it) for `text`; the child is
    bounded in time and output (child.py)."""
    with tempfile.TemporaryDirectory(prefix="mlx_tinyllama_llamacpp_") as tmp:
        prompt_file = Path(tmp) / "prompt.txt"
        prompt_file.write_text(text + "\n", encoding="utf-8")  # -f strips one trailing newline
        cmd = [str(binary), "-m", str(gguf), "-f", str(prompt_file), "-t", str(threads), *extra]
        print("running: " + " ".join(cmd), file=sys.stderr)
        r = run_bounded(cmd, timeout_s, int(max_log_mb * (1 << 20)), binary.name,
                        timeout_hint="--timeout SECONDS gives it longer", size_hint="--max-log-mb MB allows more")
    if r.returncode != 0:
        tail = " | ".join(line.strip() for line in r.output.strip().splitlines()[-3:])
        died = f"was killed by signal {-r.returncode}" if r.returncode < 0 else f"exited with {r.returncode}"
        raise UserError(f"{binary.name} {died}: {tail[-300:]}")
    return r.output


def main(args) -> int:
    gguf = Path(args.gguf)
    if not gguf.is_file():
        raise UserError(f"--gguf {gguf}: no such file")
    if args.token_ids is not None:
        raise UserError("--token-ids cannot be given to llama-eval-callback (it takes text): use --prompt, "
                        "--prompt-file or --chat")
    if not (args.timeout > 0 and args.max_log_mb > 0):  # NaN fails both
        raise UserError("--timeout and --max-log-mb must be positive")
    binary = find_binary(args.llama_cpp)
    tol = Tolerances.from_overrides(args.tol)
    args.model, args.dtype, args.policy, args.kernels, args.download = str(gguf), "float32", "hf", None, False
    lm = cli_common.load_model(args)
    tol.check_patterns(lm.config.num_hidden_layers)  # a glob for a layer this model lacks
    if args.bos is False and lm.source.details.get("add_bos_token") is not False:
        args.bos = True  # llama.cpp adds BOS when the GGUF says so (tokenizer.ggml.add_bos_token)
    prompt = cli_common.prompt_for(args, lm)
    extra = args.llama_args.split()
    if not {"-v", "--verbose", "-lv", "--log-verbosity"} & set(extra):
        # Only a verbose log names the buffers the weights went to (AMX or not: f32 or f16 matmul
        # inputs; docs/llamacpp.md); without them the emulation falls back to a wider tolerance.
        extra.append("-v")
    log = run_eval_callback(binary, gguf, prompt.text, args.threads, extra, args.timeout, args.max_log_mb)
    if args.log:
        outputs.write_text(args.log, log)  # atomic: a full disk leaves the earlier log whole
    candidate = parse_llamacpp_log(log, f"llama.cpp ({binary.name}, {gguf.name})")
    cli_common.check_tokens(candidate, prompt.ids, lm)
    engine = cli_common.emulate_engine(args, candidate, lm)
    reference = run_side(lm, prompt.ids)
    if engine is not None:
        cli_common.mark_emulated(reference, engine)
    result = compare(candidate, [reference], tol, lm.config.as_dict(), len(prompt.ids))
    # what was compared, for the verdict line ("match: 71/83 stages"), as compare --against says it
    result["coverage"] = coverage(result, candidate, [reference], lm.config.num_hidden_layers)
    return cli_common.finish_comparison(args, ResultHeader.of_run("llamacpp", lm, prompt), result, lm)

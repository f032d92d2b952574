"""A fast first run on Linux: MLX's CPU wheel for Linux links its own reference BLAS, which
runs the README's first command (the synthetic 1.1B model) about 8x slower than OpenBLAS
does (docs/benchmarks.md, "The first run"). When Debian/Ubuntu's OpenBLAS is
installed and not already preloaded, the CLI runs itself again with it in LD_PRELOAD, once,
before MLX is imported; where it is not installed it says in one line how to get it (on a
terminal only: captured stderr stays the command's own).

Never on macOS (MLX uses Accelerate there). Off with MLX_TINYLLAMA_BLAS=0 (nothing done,
nothing said); MLX_TINYLLAMA_BLAS=/path/to/libblas.so names another BLAS library. The
decision is a pure function of the environment, the platform and which files exist, so it is
tested without OpenBLAS installed.
"""

from __future__ import annotations

import os
import sys

# The OpenBLAS that Debian/Ubuntu's libopenblas0-pthread installs, per machine.
OPENBLAS = {
    "x86_64": "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "aarch64": "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
}
SWITCH = "MLX_TINYLLAMA_BLAS"  # "0": neither preload nor hint; a path: that library instead of OPENBLAS
GUARD = "_MLX_TINYLLAMA_BLAS_REEXEC"  # set in the re-executed process: never a second re-exec
# Measured with the README's first command (docs/benchmarks.md, "The first run").
SPEEDUP = "8x"
HINT = (f"note: MLX's CPU build on Linux runs this about {SPEEDUP} faster with OpenBLAS: "
        "`sudo apt-get install libopenblas0-pthread` (then it is used automatically; {switch}=0 silences this)")


def plan(env: dict, platform: str, machine: str, exists=os.path.exists) -> tuple[str, str | None]:
    """What to do: ("preload", library path), ("hint", None), ("missing", the path named in
    MLX_TINYLLAMA_BLAS that does not exist) or ("none", None)."""
    if not platform.startswith("linux") or env.get(SWITCH, "") == "0" or env.get(GUARD):
        return "none", None
    lib = env.get(SWITCH) or OPENBLAS.get(machine)
    if not lib:
        return "none", None
    preloaded = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if p]
    if lib in preloaded or any("blas" in os.path.basename(p).lower() for p in preloaded):
        return "none", None  # the user chose a BLAS (this one or another)
    if not exists(lib):
        return ("missing", lib) if env.get(SWITCH) else ("hint", None)
    return "preload", lib


def preloaded_env(env: dict, lib: str) -> dict:
    """The environment of the re-executed process: `lib` first in LD_PRELOAD, the guard set."""
    new = dict(env)
    new["LD_PRELOAD"] = " ".join(p for p in (lib, env.get("LD_PRELOAD", "").strip()) if p)
    new[GUARD] = "1"
    return new


def command_line() -> list[str] | None:
    """This process's own command line, to run again (None where Python cannot tell)."""
    argv = getattr(sys, "orig_argv", None)  # Python >= 3.10: the interpreter's own arguments included
    if not argv or not sys.executable:
        return None
    return [sys.executable, *argv[1:]]


def ensure_fast_blas(env=None, platform: str | None = None, machine: str | None = None, execv=os.execve,
                     exists=os.path.exists, stderr=None) -> None:
    """Re-execute this process with OpenBLAS preloaded when `plan` says so (the process is
    replaced: its exit code and signals are the re-executed one's), or print the hint.
    Call only from the CLI's entry point, before MLX is imported."""
    env = dict(os.environ if env is None else env)
    platform = sys.platform if platform is None else platform
    machine = os.uname().machine if machine is None and hasattr(os, "uname") else (machine or "")
    action, lib = plan(env, platform, machine, exists)
    stderr = stderr or sys.stderr
    if action == "hint":
        if stderr.isatty():  # a note for a person at a terminal, never in a script's or a test's captured output
            print(HINT.format(switch=SWITCH), file=stderr)
    elif action == "missing" and stderr.isatty():
        print(f"note: {SWITCH}={lib} does not exist; running with MLX's own BLAS", file=stderr)
    elif action == "preload" and "mlx.core" not in sys.modules:  # too late once MLX is loaded
        argv = command_line()
        if argv is not None:
            try:
                execv(argv[0], argv, preloaded_env(env, lib))
            except OSError:
                pass  # could not re-execute: run as is, slower

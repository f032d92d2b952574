"""The fast first run (issue 24 item 8): the CLI re-executes itself with OpenBLAS preloaded on
Linux. The decision is tested on fake paths (no OpenBLAS needed); the re-exec itself, with a
harmless library in place of OpenBLAS, on Linux only (LD_PRELOAD is Linux's)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO

from mlx_tinyllama import blas

LIB = blas.OPENBLAS["x86_64"]


def present(*paths):
    return lambda p: p in paths


@pytest.mark.parametrize("env,platform,machine,exists,expected", [
    ({}, "linux", "x86_64", present(LIB), ("preload", LIB)),
    ({}, "linux", "aarch64", present(blas.OPENBLAS["aarch64"]), ("preload", blas.OPENBLAS["aarch64"])),
    ({}, "linux", "x86_64", present(), ("hint", None)),  # not installed: say how
    ({}, "darwin", "arm64", present(LIB), ("none", None)),  # never on macOS
    ({}, "win32", "AMD64", present(LIB), ("none", None)),
    ({}, "linux", "riscv64", present(LIB), ("none", None)),  # no known path: nothing to say
    ({"MLX_TINYLLAMA_BLAS": "0"}, "linux", "x86_64", present(LIB), ("none", None)),  # switched off
    ({"MLX_TINYLLAMA_BLAS": "0"}, "linux", "x86_64", present(), ("none", None)),  # ... the hint too
    ({blas.GUARD: "1"}, "linux", "x86_64", present(LIB), ("none", None)),  # already re-executed: no loop
    ({"LD_PRELOAD": LIB}, "linux", "x86_64", present(LIB), ("none", None)),  # already preloaded
    ({"LD_PRELOAD": "/opt/mkl/libmkl_rt.so /x/libopenblas.so.0"}, "linux", "x86_64", present(LIB), ("none", None)),
    ({"LD_PRELOAD": "/x/libasan.so"}, "linux", "x86_64", present(LIB), ("preload", LIB)),  # not a BLAS
    ({"MLX_TINYLLAMA_BLAS": "/fake/libblas.so"}, "linux", "x86_64", present("/fake/libblas.so"),
     ("preload", "/fake/libblas.so")),  # another library named
    ({"MLX_TINYLLAMA_BLAS": "/fake/libblas.so"}, "linux", "x86_64", present(LIB),
     ("missing", "/fake/libblas.so")),  # ... that does not exist: said, not replaced by the default
])
def test_plan(env, platform, machine, exists, expected):
    assert blas.plan(env, platform, machine, exists) == expected


def test_preloaded_env_keeps_the_users_preload_and_sets_the_guard():
    env = blas.preloaded_env({"LD_PRELOAD": "/x/libasan.so", "A": "b"}, "/fake/libblas.so")
    assert env["LD_PRELOAD"] == "/fake/libblas.so /x/libasan.so" and env["A"] == "b" and env[blas.GUARD] == "1"
    assert blas.plan(env, "linux", "x86_64", present("/fake/libblas.so")) == ("none", None)  # never twice


class Tty(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_ensure_execs_once_with_the_library_or_hints_on_a_terminal_only(monkeypatch):
    calls = []
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-m", "mlx_tinyllama.trace", "run"], raising=False)
    monkeypatch.delitem(sys.modules, "mlx.core", raising=False)
    blas.ensure_fast_blas({}, "linux", "x86_64", execv=lambda *a: calls.append(a), exists=present(LIB))
    assert len(calls) == 1
    exe, argv, env = calls[0]
    assert argv == [sys.executable, "-m", "mlx_tinyllama.trace", "run"] and env["LD_PRELOAD"] == LIB
    for tty, lines in ((True, 1), (False, 0)):
        err = Tty(tty)
        blas.ensure_fast_blas({}, "linux", "x86_64", execv=lambda *a: calls.append(a), exists=present(), stderr=err)
        assert len(err.getvalue().splitlines()) == lines and len(calls) == 1
    assert "libopenblas0-pthread" in blas.HINT


def test_no_reexec_once_mlx_is_loaded(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "mlx.core", object())
    blas.ensure_fast_blas({}, "linux", "x86_64", execv=lambda *a: calls.append(a), exists=present(LIB))
    assert calls == []


def test_main_with_arguments_never_reexecs(monkeypatch, capfd):
    """Tests and embedders call trace.main([...]): only the command line itself re-executes."""
    from mlx_tinyllama import trace

    monkeypatch.setattr(blas, "ensure_fast_blas", lambda *a, **k: pytest.fail("re-exec from main(argv)"))
    with pytest.raises(SystemExit):
        trace.main(["tokens", "--help"])


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")


def _libc_path() -> str:
    """A harmless library to preload in OpenBLAS's place: the libc this process runs on."""
    try:
        with open("/proc/self/maps") as f:
            return next(ln.split()[-1] for ln in f if "/libc.so" in ln or "/libc-" in ln)
    except (OSError, StopIteration):
        return ""


HARMLESS = _libc_path() if sys.platform.startswith("linux") else ""


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", blas.GUARD)}
    env.update(PYTHONPATH=str(REPO), MLX_TINYLLAMA_BLAS=HARMLESS, **extra)
    return env


PROBE = ("import os, sys, time\n"
         "from mlx_tinyllama import blas\n"
         "blas.ensure_fast_blas()\n"
         "print(os.getpid(), os.environ.get('LD_PRELOAD'), os.environ.get(blas.GUARD), flush=True)\n"
         "time.sleep(float(sys.argv[1]))\n"
         "sys.exit(int(sys.argv[2]))\n")


@linux_only
def test_reexec_runs_once_in_the_same_process_and_passes_exit_codes(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    r = subprocess.run([sys.executable, str(script), "0", "7"], env=_env(), capture_output=True, text=True, timeout=60)
    pid, preload, guard = r.stdout.split()
    assert r.returncode == 7 and preload == HARMLESS and guard == "1", (r.stdout, r.stderr)
    assert r.stdout.count("\n") == 1 and r.stderr == ""  # once, silently


@linux_only
def test_signals_reach_the_reexecuted_process(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    p = subprocess.Popen([sys.executable, str(script), "60", "0"], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        pid, preload, _ = p.stdout.readline().split()
        assert int(pid) == p.pid and preload == HARMLESS  # execve: the same process, now preloaded
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == -signal.SIGTERM
    finally:
        if p.poll() is None:
            p.kill()


@linux_only
def test_cli_exit_codes_pass_through_the_reexec(tmp_path):
    """The real CLI re-executed with the preload: a bad input is still one line and exit 2; a
    SIGTERM while it works is still exit 130 ("interrupted")."""
    cmd = [sys.executable, "-m", "mlx_tinyllama.trace", "run", "--model", str(tmp_path / "missing")]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error:"), r.stderr
    cmd = [sys.executable, "-m", "mlx_tinyllama.trace", "generate", "--model", "synthetic:tiny", "--prompt", "hi",
           "--max-tokens", "100000"]
    p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        time.sleep(8)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 130 and "interrupted" in err, err
    finally:
        if p.poll() is None:
            p.kill()

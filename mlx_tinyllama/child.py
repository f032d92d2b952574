"""Running another program with bounds: a time limit, its output (stdout and stderr together,
as a user would save it) streamed to a temporary file up to a size limit, and its whole
process group ended on timeout, on overflow, on Ctrl-C/SIGTERM and on any exit of ours, so a
hung or flooding child costs at most the limits and never outlives the command.

On POSIX the child leads a new session (its own process group: killing the group reaches its
children too); elsewhere only the child itself is ended.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass

from .errors import UserError

POLL_S = 0.05  # how often the time and size limits are checked
GRACE_S = 2.0  # between SIGTERM and SIGKILL


@dataclass
class Finished:
    returncode: int
    output: str  # stdout and stderr interleaved, decoded as UTF-8 (bad bytes replaced)
    seconds: float


def run_bounded(cmd: list[str], timeout_s: float, max_bytes: int, what: str, timeout_hint: str = "",
                size_hint: str = "", cwd=None) -> Finished:
    """Run `cmd` to its end within `timeout_s` seconds and `max_bytes` of output. A child that
    runs longer or writes more is ended (its process group) and reported as a UserError that
    names `what` and the limit (`*_hint`: the option that raises it). A child that cannot start
    is a UserError too. Its exit code is returned, not judged."""
    start = time.monotonic()
    with tempfile.TemporaryFile(prefix="mlx_tinyllama_child_") as out:
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                    start_new_session=os.name == "posix")
        except OSError as e:
            raise UserError(f"cannot run {cmd[0]}: {e.strerror or e}") from None
        try:
            while True:
                rc = proc.poll()
                size = os.fstat(out.fileno()).st_size
                if size > max_bytes:
                    raise UserError(f"{what} wrote more than {_size(max_bytes)} of output; it was stopped"
                                    + (f" ({size_hint})" if size_hint else ""))
                if rc is not None:
                    break
                if time.monotonic() - start > timeout_s:
                    raise UserError(f"{what} ran longer than {timeout_s:g} s; it was stopped"
                                    + (f" ({timeout_hint})" if timeout_hint else ""))
                time.sleep(POLL_S)
        finally:
            _end(proc)  # also on Ctrl-C, SIGTERM (raised as KeyboardInterrupt) and our own errors
        out.seek(0)
        data = out.read(max_bytes + 1)
    return Finished(rc, data.decode("utf-8", errors="replace"), time.monotonic() - start)


def _end(proc: subprocess.Popen) -> None:
    """End the child and everything it started (its process group): SIGTERM, then SIGKILL.
    After a normal exit this ends what the child left running in its group."""
    if os.name != "posix":
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)  # the child leads its group: its own children too
        except (ProcessLookupError, PermissionError):
            proc.poll()
            return
        deadline = time.monotonic() + GRACE_S
        while time.monotonic() < deadline:
            proc.poll()  # reaps the leader, so the group empties
            if not _group_alive(proc.pid):
                return
            time.sleep(0.02)
    proc.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError, OSError):
        return False


def _size(n: int) -> str:
    return f"{n / (1 << 20):g} MB" if n >= 1 << 20 else f"{n} bytes"

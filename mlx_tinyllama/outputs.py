"""Writing results: the one check that an output path can be written and clobbers
nothing (made before any model loads, so a bad path costs nothing), atomic writes
(a temporary file in the same directory, renamed into place: a full disk, Ctrl-C or
SIGTERM leaves the earlier file intact and no partial one), and JSON that stays
valid when a number is NaN or infinite."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from pathlib import Path

from .errors import OutputError, UserError


@contextlib.contextmanager
def atomic_path(path, suffix: str = ""):
    """Yields a temporary path beside `path` to write to; on success it replaces `path` in one rename.
    On any failure (an exception, KeyboardInterrupt, SIGTERM turned into one) the temporary file is
    removed and `path` keeps what it had. OSError (disk full, read-only, I/O) becomes OutputError."""
    path = Path(path).expanduser()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=(suffix or ".tmp"), dir=path.parent)
        os.close(fd)
        os.chmod(tmp, _mode(path))  # mkstemp's 0600 would make every output private
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except Exception as e:  # noqa: BLE001: a failed write from any library is exit 1; anything else re-raised
        reason = write_failure(e)
        if reason is None:
            raise
        raise OutputError(f"cannot write {path}: {reason}; the earlier file (if any) is unchanged") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


# What the libraries we write with raise for a failed write, other than OSError: MLX's RuntimeError
# ("[write] Unable to write ...", "[save_safetensors] Failed to open file ..."), safetensors' Rust
# SafetensorError ("Error while serializing: IoError(...)"), a matplotlib/PIL error that wraps one.
_WRITE_FAILURE = re.compile(r"^\[(write|save\w*)\]|unable to write|failed to open file|ioerror|no space left|"
                            r"disk quota|read-only file system|input/output error", re.IGNORECASE)


def write_failure(e: BaseException) -> str | None:
    """Why writing failed, when `e` is a failed write raised by any library (OSError: numpy, json,
    Python's own files; MLX; safetensors); None when it is something else (a bug, an interrupt)."""
    if isinstance(e, OSError):
        return e.strerror or str(e) or type(e).__name__
    if isinstance(e, Exception) and _WRITE_FAILURE.search(str(e)):
        return " ".join(str(e).split())
    return None


@contextlib.contextmanager
def writing(path, what: str = ""):
    """Any write to `path` inside: a failed write, whichever library raised it, becomes OutputError
    (exit 1) naming the path."""
    try:
        yield
    except Exception as e:  # noqa: BLE001: see write_failure
        reason = write_failure(e)
        if reason is None:
            raise
        raise OutputError(f"cannot write {what + ' ' if what else ''}{path}: {reason}") from None


def _mode(path: Path) -> int:
    """The mode the file would get from a plain open(): the existing file's, else 0666 less the umask."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0o022)
        os.umask(umask)
        return 0o666 & ~umask


def write_bytes(path, data: bytes) -> None:
    """`data` to `path`, atomically (see atomic_path), flushed to disk before the rename."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def check_file(path, option: str = "") -> None:
    """A file we are about to write: its directory exists and it is not itself a directory."""
    if not path:
        return
    what = f"{option} {path}" if option else str(path)
    p = Path(path).expanduser()
    if not p.resolve().parent.is_dir():
        raise UserError(f"cannot write {what}: its directory does not exist")
    if p.is_dir():
        raise UserError(f"cannot write {what}: it is a directory; give a file path")
    if p.exists() and not p.is_file():  # a device (/dev/full), FIFO or socket: a rename would replace it
        raise UserError(f"cannot write {what}: it is not a regular file; give a file path")


def check_run(files: dict, dirs: dict, inputs: dict, protected: dict) -> None:
    """The outputs of one run, all together: `files` and `dirs` ({option: path}, None = not asked for)
    are each writable (check_file / check_dir), none is an input of the run (`inputs`, {what: path}),
    none lies inside a `protected` directory ({what: dir}: the model directory, the synthetic cache)
    and no two outputs are the same file."""
    files = {k: v for k, v in files.items() if v}
    dirs = {k: v for k, v in dirs.items() if v}
    for option, path in files.items():
        check_file(path, option)
    for option, path in dirs.items():
        check_dir(path, option)
    real_inputs = {what: real_path(p) for what, p in inputs.items() if p}
    seen: dict = {}
    for option, path in [*files.items(), *dirs.items()]:
        real = real_path(path)
        for what, inp in real_inputs.items():
            if real == inp or _same_file(path, inp) or (option in dirs and _inside(inp, real)):
                raise UserError(f"{option} {path} is an input of this run ({what}); outputs never overwrite inputs: "
                                "give another path")
        for what, d in protected.items():
            if d and _inside(real, real_path(d)):
                raise UserError(f"{option} {path} is inside {what} {d}; outputs never go there (they would "
                                "change the model): give a path outside it")
        for other, other_real in seen.items():
            if real == other_real or _inside(real, other_real) or _inside(other_real, real):
                raise UserError(f"{option} {path} is the same path as {other}; each output needs its own path")
        seen[option] = real
        parent = real if option in dirs and Path(real).is_dir() else Path(real).parent
        if parent.is_dir() and not os.access(parent, os.W_OK):
            raise UserError(f"cannot write {option} {path}: its directory {parent} is not writable")


def real_path(path) -> Path:
    """The path with symlinks resolved (a symlink to an input is that input)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def _same_file(a, b) -> bool:
    try:
        return os.path.samefile(Path(a).expanduser(), b)  # hard links too
    except OSError:
        return False


def check_dir(path, option: str = "") -> None:
    """A directory we are about to fill (made if missing): not a file, and its parent exists."""
    if not path:
        return
    what = f"{option} {path}" if option else str(path)
    d = Path(path).expanduser()
    if d.exists() and not d.is_dir():
        raise UserError(f"cannot write {what}: it exists and is not a directory")
    if not d.exists() and not d.resolve().parent.is_dir():
        raise UserError(f"cannot write {what}: its parent directory does not exist")


def json_safe(obj):
    """JSON has no NaN/Inf: write them as strings ("nan", "inf", "-inf") so files stay valid
    JSON; numpy scalars become Python numbers, tuples lists, keys strings."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, float) or _is_numpy(obj, "floating"):
        f = float(obj)
        return f if math.isfinite(f) else ("nan" if math.isnan(f) else ("inf" if f > 0 else "-inf"))
    if _is_numpy(obj, "integer"):
        return int(obj)
    return obj


def _is_numpy(obj, kind: str) -> bool:
    import numpy as np

    return isinstance(obj, getattr(np, kind))


def number(v) -> float:
    """A JSON number back to float: `json_safe` stores NaN/Inf as strings, None is NaN."""
    if v is None:
        return float("nan")
    if isinstance(v, str):
        return {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}.get(v.lower(), math.nan)
    return float(v)


def write_json(path: str | Path, obj) -> None:
    check_file(path)
    write_text(path, json.dumps(json_safe(obj), indent=1) + "\n")

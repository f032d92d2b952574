"""Writing results: the one check that an output path can be written (made before any
model loads, so a bad path costs nothing and leaves nothing half-written), and JSON
that stays valid when a number is NaN or infinite."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import UserError


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
    Path(path).expanduser().write_text(json.dumps(json_safe(obj), indent=1) + "\n")

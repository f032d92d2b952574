"""`vectors write`: inputs in the requested dtype, golden outputs in float32, and the manifest."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from .. import sources
from ..errors import OutputError, UserError
from ..outputs import write_text
from ..ops import mask_value
from ..tolerances import MASKED_BELOW, describe_kernel_rule, kernel_nmse_budget
from . import cases as case_list
from .engine import MX_DTYPES, golden
from .inputs import activations, load_weights
from .store import FORMAT, MANIFEST, VERSION, load_manifest, save_safetensors, to_numpy


def check_directory(directory, protected: dict | None = None) -> Path:
    """A new or empty directory, or one this tool wrote (a vectors manifest naming every file in it):
    only such a directory is replaced, as a whole. Never one inside `protected` ({what: dir}: the
    synthetic cache, the model's directory)."""
    directory = Path(directory).expanduser()
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory} is a file; give a directory for the vectors")
    if not directory.exists() and not directory.parent.is_dir():
        raise UserError(f"cannot create {directory}: its parent directory does not exist")
    real = Path(os.path.realpath(directory))
    for what, d in (protected or {}).items():
        d = Path(os.path.realpath(d)) if d else None
        if d and (real == d or d in real.parents or real in d.parents):
            raise UserError(f"{directory} is inside {what} {d} (or holds it); vectors never go there: give a "
                            "directory outside it")
    if directory.is_dir() and any(directory.iterdir()):
        if not (directory / MANIFEST).is_file():
            raise UserError(f"{directory} is not empty and holds no {MANIFEST}: choose a new or empty directory")
        try:
            earlier = load_manifest(directory)
        except UserError as e:
            raise UserError(f"{directory} is not empty and is not a vectors directory this tool wrote ({e}): "
                            "choose a new or empty directory") from None
        ours = {MANIFEST} | {c["file"] for c in earlier["cases"]}
        foreign = sorted(p.name for p in directory.iterdir() if p.name not in ours)
        if foreign:
            raise UserError(f"{directory} holds files the vectors do not ({', '.join(foreign[:3])}); replacing the "
                            "directory would delete them: choose a new or empty directory")
    return directory


@contextlib.contextmanager
def staged_directory(directory: Path):
    """A fresh hidden directory beside `directory` to fill; on success it takes `directory`'s place
    (the earlier one is swapped out and then deleted), so a reader sees one write's files or the
    other's, never a mix. On any failure (disk full, Ctrl-C, SIGTERM) it is deleted and
    `directory` keeps what it had."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".new", dir=directory.parent))
    except OSError as e:
        raise OutputError(f"cannot write {directory}: {e.strerror or e}") from None
    old = None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would make the vectors private
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".old", dir=directory.parent))
            os.replace(directory, old / "d")  # two renames: the directory is absent between them, never mixed
            try:
                os.replace(tmp, directory)
            except BaseException:
                os.replace(old / "d", directory)  # put the earlier one back
                raise
        else:
            os.replace(tmp, directory)
    except OSError as e:
        raise OutputError(f"cannot write {directory}: {e.strerror or e}; the earlier vectors (if any) are "
                          "unchanged") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def amplification(case: case_list.Case, inputs: dict[str, np.ndarray]) -> float:
    """kappa of the tolerance rule: SDPA's largest unmasked |scaled score|, 0 for other ops."""
    if case.op != "sdpa":
        return 0.0
    s = golden("scores", {"q": inputs["q"], "k": inputs["k"]}, case.params)
    return float(np.abs(s[s > MASKED_BELOW]).max())


def write_vectors(directory, spec: str, dtype: str, quick: bool, allow_download: bool = False,
                  progress=None) -> dict:
    """Write the vectors of model `spec` into `directory` (as a set: staged_directory); returns the manifest."""
    from ..synthetic import cache_root

    dtype = sources.dtype_name(dtype)
    model_dir = Path(spec).expanduser() if Path(spec).expanduser().is_dir() else None
    directory = check_directory(directory, {"the synthetic model cache": cache_root(),
                                            "the model's directory": model_dir})
    weights = load_weights(spec, allow_download)
    act = activations(weights, case_list.positions_needed(), case_list.mlp_rows(quick))
    dt = MX_DTYPES[dtype]
    built = case_list.build(weights, act, quick, mask_value(dt))
    files: dict[str, dict[str, mx.array]] = {}
    entries = []
    for i, case in enumerate(built):
        family = files.setdefault(case.family, {})
        rounded = {}
        for role, (key, values) in case.inputs.items():
            if key not in family:  # a shared input (a weight, the embedding table) is stored once
                arr = mx.array(values)
                family[key] = arr if values.dtype.kind in "iu" else arr.astype(dt)
            rounded[role] = to_numpy(family[key])
        params = dict(case.params, dtype=dtype)
        y = golden(case.op, rounded, params)
        family[case.output] = mx.array(y)
        kappa = amplification(case, rounded)
        shapes = {role: list(v.shape) for role, v in rounded.items()} | {"y": list(y.shape)}
        entries.append({
            "name": case.name, "op": case.op, "shape": case.label, "semantics": case_list.SEMANTICS[case.op],
            "shapes": shapes, "dtype": dtype, "params": params,
            "inputs": {role: key for role, (key, _) in case.inputs.items()}, "output": case.output,
            "file": f"{case.family}.safetensors",
            "tolerance": {"nmse": kernel_nmse_budget(dtype, case.reduction, kappa), "n": case.reduction,
                          "kappa": kappa},
        })
        if progress:
            progress(i + 1, len(built), f"computing golden outputs ({case.name})")
    manifest = {"format": FORMAT, "version": VERSION, "dtype": dtype, "quick": quick, "model": weights.description,
                "golden": "float32 (matmul: float64 product rounded to float32), from the inputs as stored",
                "tolerance_rule": describe_kernel_rule(), "ops": case_list.SEMANTICS, "cases": entries}
    with staged_directory(directory) as staged:
        for family, tensors in files.items():
            save_safetensors(staged / f"{family}.safetensors", tensors, {"format": FORMAT, "dtype": dtype})
        write_text(staged / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest

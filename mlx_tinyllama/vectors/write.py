"""`vectors write`: inputs in the requested dtype, golden outputs in float32, and the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from .. import sources
from ..errors import UserError
from ..outputs import write_text
from ..ops import mask_value
from ..tolerances import MASKED_BELOW, describe_kernel_rule, kernel_nmse_budget
from . import cases as case_list
from .engine import MX_DTYPES, golden
from .inputs import activations, load_weights
from .store import FORMAT, MANIFEST, VERSION, save_safetensors, to_numpy


def check_directory(directory) -> Path:
    """A new or empty directory, or an earlier vectors directory (its files are replaced)."""
    directory = Path(directory).expanduser()
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory} is a file; give a directory for the vectors")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / MANIFEST).is_file():
        raise UserError(f"{directory} is not empty and holds no {MANIFEST}: choose a new or empty directory")
    if not directory.exists() and not directory.parent.is_dir():
        raise UserError(f"cannot create {directory}: its parent directory does not exist")
    return directory


def amplification(case: case_list.Case, inputs: dict[str, np.ndarray]) -> float:
    """kappa of the tolerance rule: SDPA's largest unmasked |scaled score|, 0 for other ops."""
    if case.op != "sdpa":
        return 0.0
    s = golden("scores", {"q": inputs["q"], "k": inputs["k"]}, case.params)
    return float(np.abs(s[s > MASKED_BELOW]).max())


def write_vectors(directory, spec: str, dtype: str, quick: bool, allow_download: bool = False,
                  progress=None) -> dict:
    """Write the vectors of model `spec` into `directory`; returns the manifest."""
    dtype = sources.dtype_name(dtype)
    directory = check_directory(directory)
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
    directory.mkdir(exist_ok=True)
    for family, tensors in files.items():
        save_safetensors(directory / f"{family}.safetensors", tensors, {"format": FORMAT, "dtype": dtype})
    manifest = {"format": FORMAT, "version": VERSION, "dtype": dtype, "quick": quick, "model": weights.description,
                "golden": "float32 (matmul: float64 product rounded to float32), from the inputs as stored",
                "tolerance_rule": describe_kernel_rule(), "ops": case_list.SEMANTICS, "cases": entries}
    write_text(directory / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest

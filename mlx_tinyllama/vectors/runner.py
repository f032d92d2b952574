"""`vectors run`: call a Python engine once per case and write its outputs as a results file.

The engine is `module:function` (an importable module) or `path/to/file.py:function`, called
as `function(op, inputs, params) -> array` (engine.py documents the arguments). An engine that
raises NotImplementedError for an op skips that op's cases; any other exception names the case.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import UserError
from .store import Vectors, save_safetensors, to_numpy


def load_engine(spec: str):
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"--engine {spec!r}: expected module:function or path/to/file.py:function")
    if module_name.endswith(".py"):
        path = Path(module_name).expanduser()
        if not path.is_file():
            raise UserError(f"--engine: {path} does not exist")
        loader_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(loader_spec)
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:  # the user's file: say which and why, in one line
            raise UserError(f"--engine: importing {path} failed: {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise UserError(f"--engine: cannot import {module_name}: {e}") from None
        except Exception as e:  # a syntax error or a failing import in the user's module
            raise UserError(f"--engine: importing {module_name} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"--engine: {module_name} has no function {attr}")
    return fn


def _stored(out, case: dict) -> mx.array:
    """An engine's output as it will be stored: its own float dtype (float64 as float32)."""
    if isinstance(out, mx.array):
        return out
    try:
        arr = to_numpy(out) if not hasattr(out, "detach") else out.detach().float().cpu().numpy()
        arr = np.asarray(arr)
        if arr.dtype.kind not in "fiub" or arr.ndim == 0:
            raise TypeError(f"{type(out).__name__}")
        return mx.array(arr.astype(np.float32) if arr.dtype == np.float64 else arr)
    except Exception:  # None, a string, a ragged list, a scalar: not an array of numbers
        raise UserError(f"the engine returned {type(out).__name__} for {case['name']} ({case['op']}); "
                        "it must return an array of numbers") from None


def run_engine(vectors: Vectors, engine, ops: list[str] | None = None, names: list[str] | None = None,
               progress=None) -> tuple[dict, list[str]]:
    """Outputs keyed by the manifest's output keys, and the ops the engine does not implement."""
    results: dict[str, mx.array] = {}
    skipped: list[str] = []
    cases = vectors.select(ops, names)
    for i, case in enumerate(cases):
        if case["op"] in skipped:
            continue
        try:
            out = engine(case["op"], vectors.inputs(case), dict(case["params"]))
        except NotImplementedError:
            skipped.append(case["op"])
            continue
        except Exception as e:  # the engine's own failure: name the case it failed on
            raise UserError(f"the engine failed on {case['name']} ({case['op']}): {type(e).__name__}: {e}") from None
        results[case["output"]] = _stored(out, case)
        mx.eval(results[case["output"]])
        if progress:
            progress(i + 1, len(cases), f"running {case['name']}")
    if not results:
        raise UserError("the engine implemented none of the ops checked")
    return results, skipped


def write_results(path, results: dict[str, mx.array], vectors: Vectors) -> None:
    save_safetensors(Path(path), results, {"format": "mlx_tinyllama.vectors.results",
                                           "vectors": str(vectors.dir)})

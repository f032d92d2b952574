"""The on-disk form of the vectors: manifest.json plus one safetensors file per op family.

Every file is written to a temporary name in its directory and renamed into place, so a
reader never sees a half-written file. Reading checks what a user can get wrong (no
manifest, not a vectors directory, a file that is not safetensors, a missing key, a wrong
shape) and says so in one line (UserError).
"""

from __future__ import annotations

import fnmatch
import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import UserError
from ..outputs import atomic_path

MANIFEST = "manifest.json"
FORMAT = "mlx_tinyllama.vectors"
VERSION = 1
CASE_FIELDS = ("name", "op", "semantics", "shapes", "dtype", "params", "inputs", "output", "file", "tolerance")
# The parameters each op reads (engine.run_op); a case without one would fail inside the golden op.
OP_PARAMS = {"rms_norm": ("eps",), "rope": ("head_dim", "theta", "offset"), "scores": ("scale",),
             "sdpa": ("scale",)}
# An all-zero result has NMSE 1: a tolerance near it passes anything. The loosest the rule gives
# (bfloat16 SDPA with a large |score|) is ~1e-2.
MAX_NMSE_TOLERANCE = 0.1
MAX_MANIFEST_BYTES = 64 << 20  # the full vectors' manifest is ~0.2 MB


def save_safetensors(path: Path, tensors: dict[str, mx.array], metadata: dict[str, str] | None = None) -> None:
    with atomic_path(path, suffix=".safetensors") as tmp:  # MLX appends .safetensors to other names
        mx.save_safetensors(str(tmp), tensors, metadata or {})


def read_safetensors(path: Path, what: str) -> dict[str, mx.array]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what}: {path} does not exist" if not path.exists() else f"{what}: {path} is not a file")
    try:
        return mx.load(str(path), format="safetensors")
    except Exception as e:  # truncated, or another format: MLX raises several types here
        raise UserError(f"{what}: cannot read {path} as safetensors ({str(e).splitlines()[0][:120]})") from None


def to_numpy(a) -> np.ndarray:
    """An MLX or NumPy array as NumPy: float16/float32/int as they are; MLX bfloat16 as float32
    (exact: NumPy has no bfloat16)."""
    if isinstance(a, mx.array):
        return np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a)
    return np.asarray(a)


def load_manifest(directory) -> dict:
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"vectors directory {directory} does not exist" if not directory.exists()
                        else f"{directory} is not a directory")
    path = directory / MANIFEST
    if not path.is_file():
        raise UserError(f"{directory} has no {MANIFEST}: write one with `vectors write {directory}`")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise UserError(f"{path} is {path.stat().st_size} bytes; a vectors manifest is read up to {MAX_MANIFEST_BYTES}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path} is not a vectors manifest (no \"format\": \"{FORMAT}\")")
    if manifest.get("version") != VERSION:
        raise UserError(f"{path} has version {manifest.get('version')!r}; this tool reads version {VERSION}")
    cases = manifest.get("cases")
    if not isinstance(cases, list) or not cases:
        raise UserError(f"{path} lists no cases")
    for i, case in enumerate(cases):
        missing = [f for f in CASE_FIELDS if not isinstance(case, dict) or f not in case]
        if not missing and not (isinstance(case["tolerance"], dict)
                                and all(k in case["tolerance"] for k in ("nmse", "n", "kappa"))):
            missing = ["tolerance.nmse/n/kappa"]
        if missing:
            raise UserError(f"{path}: case {i} lacks {', '.join(missing)}")
        problem = case_problem(case)
        if problem:
            raise UserError(f"{path}: case {i} ({str(case.get('name'))[:60]}): {problem}")
    return manifest


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _plain_name(f) -> bool:
    """A file name inside the directory: no folder part, not absolute, not `..`."""
    return isinstance(f, str) and f not in ("", ".", "..") and "/" not in f and "\\" not in f and ":" not in f


def case_problem(case: dict) -> str | None:
    """What is wrong with one case of a manifest, in words (None: nothing)."""
    for key in ("name", "op", "output", "dtype"):
        if not isinstance(case[key], str):
            return f"{key} must be a string, not {json.dumps(case[key])[:40]}"
    if not _plain_name(case["file"]):
        return f"file {json.dumps(case['file'])[:60]} must be a file name inside the vectors directory"
    inputs, shapes, params, tol = case["inputs"], case["shapes"], case["params"], case["tolerance"]
    if not isinstance(inputs, dict) or not all(isinstance(k, str) for k in inputs.values()):
        return "inputs must be an object {role: tensor key}"
    if not isinstance(shapes, dict) or not all(
            isinstance(v, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v)
            for v in shapes.values()):
        return "shapes must be an object {role: [dims]} of non-negative integers"
    lacking = [r for r in [*inputs, "y"] if r not in shapes]
    if lacking:
        return f"shapes lacks {', '.join(lacking)}"
    if not isinstance(params, dict):
        return "params must be an object"
    lacking = [p for p in OP_PARAMS.get(case["op"], ()) if p not in params]
    if lacking:
        return f"params lacks {', '.join(lacking)} (needed by {case['op']})"
    nmse = tol["nmse"]
    if not _number(nmse) or not 0 <= nmse <= MAX_NMSE_TOLERANCE:
        return (f"tolerance.nmse {json.dumps(nmse)[:40]} must be a number in [0, {MAX_NMSE_TOLERANCE}] "
                "(an all-zero result has NMSE 1)")
    if not _number(tol["n"]) or tol["n"] < 0 or not _number(tol["kappa"]) or tol["kappa"] < 0:
        return "tolerance.n and tolerance.kappa must be finite numbers >= 0"
    return None


class Vectors:
    """A vectors directory: its manifest, and its family files read on first use."""

    def __init__(self, directory):
        self.dir = Path(directory)
        self.manifest = load_manifest(self.dir)
        self.cases = self.manifest["cases"]
        self._files: dict[str, dict[str, mx.array]] = {}

    def paths(self) -> list[Path]:
        return [self.dir / MANIFEST] + [self.dir / f for f in sorted({c["file"] for c in self.cases})]

    def _file(self, name: str) -> dict[str, mx.array]:
        if name not in self._files:
            self._files[name] = read_safetensors(self.dir / name, "vectors file")
        return self._files[name]

    def _tensor(self, case: dict, key: str, expected_shape) -> mx.array:
        data = self._file(case["file"])
        if key not in data:
            raise UserError(f"{self.dir / case['file']} lacks {key} (case {case['name']}): rewrite the vectors")
        if list(data[key].shape) != list(expected_shape):
            raise UserError(f"{self.dir / case['file']}: {key} has shape {list(data[key].shape)}, "
                            f"the manifest says {list(expected_shape)}")
        return data[key]

    def inputs(self, case: dict) -> dict[str, np.ndarray]:
        return {role: to_numpy(self._tensor(case, key, case["shapes"][role])) for role, key in case["inputs"].items()}

    def golden(self, case: dict) -> np.ndarray:
        return to_numpy(self._tensor(case, case["output"], case["shapes"]["y"])).astype(np.float32)

    def select(self, ops: list[str] | None = None, names: list[str] | None = None) -> list[dict]:
        """The cases of `ops` (all if None) whose names match one of the globs `names` (all if None)."""
        cases = list(self.cases)
        if ops:
            known = {c["op"] for c in self.cases}
            unknown = [o for o in ops if o not in known]
            if unknown:
                raise UserError(f"--ops: {', '.join(unknown)} not in the manifest; ops: {', '.join(sorted(known))}")
            cases = [c for c in cases if c["op"] in ops]
        if names:
            cases = [c for c in cases if any(fnmatch.fnmatchcase(c["name"], g) for g in names)]
            if not cases:
                raise UserError(f"--cases {','.join(names)} matches no case (names look like matmul.q_proj.M33)")
        return cases

"""What each command reads and writes, declared once (issue 24).

A command module holds `SPEC`, a `Spec`: the options that name files or directories it reads or
writes, the files that a named path brings with it (a manifest's tensors, a sharded dump's shards
and index, a step directory's files, the binary `llamacpp` runs, the shards `run --dump` may
write), and the options that a mode of the command does not use. From it come, for every run:

- the output check (`check_paths`: outputs.check_run on the declared outputs against every declared
  and implied input, the model directory and the synthetic cache), made before anything loads;
- the refusal of options that would be ignored (`check_unused`);
- the robustness suite's probes (tests/test_robustness.py walks every spec).

`Spec.check` needs the explicitly given options (`given`, from the CLI's parser); it works on
any object with the options as attributes, so this module does not know argparse.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import outputs
from .errors import UserError

READ_FILE, READ_DIR, READ_ANY, WRITE_FILE, WRITE_DIR = "read-file", "read-dir", "read-any", "write-file", "write-dir"
READS = (READ_FILE, READ_DIR, READ_ANY)
WRITES = (WRITE_FILE, WRITE_DIR)
MODEL = "model"  # a model spec: a directory (protected, its files inputs), a .gguf file, a repo id or synthetic

# An index or manifest read only to learn which files come with it: larger ones are left to the loader
# (which refuses them with its own message); the check then protects the file itself.
MAX_INDEX_BYTES = 16 << 20
MAX_LISTED = 100_000  # files of a directory named as an input (a step directory, vectors)


@dataclass(frozen=True)
class PathOption:
    """One option that names a path. `option` is the flag ("--json") or a positional's dest ("dir").
    `implies(value, args)` gives the other files that come with it ({what: path}); it never raises:
    what it cannot read is the loader's to report. `always`: implies is asked even when the option
    is absent (the binary found on $PATH). `parts(output_path, candidate)`: for an output, whether
    `candidate` is one of the extra files it may write (a dump's shards and index)."""

    option: str
    role: str
    implies: Callable | None = None
    always: bool = False
    parts: Callable | None = None
    value_is_path: bool = True  # False: only what it implies is a path (--engine module:function)

    @property
    def dest(self) -> str:  # "--prompt-file" -> prompt_file; a positional ("DIR") -> dir
        return self.option.lstrip("-").replace("-", "_").lower()


@dataclass(frozen=True)
class Unused:
    """`option`, when given explicitly, is refused where `applies(args)` is false: `why` says what it needs."""

    option: str
    applies: Callable
    why: str

    @property
    def dest(self) -> str:
        return self.option.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class Spec:
    paths: tuple[PathOption, ...] = ()
    unused: tuple[Unused, ...] = ()
    # Strings that an option may be given empty ('' means something for these, e.g. no extra arguments)
    empty_ok: tuple[str, ...] = field(default=())

    def option(self, name: str) -> PathOption | None:
        return next((p for p in self.paths if p.option == name), None)

    def inputs(self, args) -> dict:
        """{what: path} of everything this run reads: declared inputs and the files they imply."""
        found: dict = {}
        for p in self.paths:
            if p.role not in READS and p.role != MODEL:
                continue
            values = _values(getattr(args, p.dest, None))
            for v in values:
                if p.role != MODEL and p.value_is_path:
                    path = Path(v).expanduser()
                    if not path.exists() and "#" in v:  # --ref BUNDLE#SOURCE
                        path = Path(v.partition("#")[0]).expanduser()
                    found[f"{p.option} {v}" if len(values) > 1 else p.option] = path
            if p.implies and (values or p.always):
                for v in values or [None]:
                    found.update(_safe(p.implies, v, args))
        return found

    def outputs(self, args) -> tuple[dict, dict]:
        files = {p.option: getattr(args, p.dest, None) for p in self.paths if p.role == WRITE_FILE}
        dirs = {p.option: getattr(args, p.dest, None) for p in self.paths if p.role == WRITE_DIR}
        return files, dirs

    def check(self, args, given: set[str]) -> None:
        """Every declared rule for this run: options it would not use, then the paths (before any load)."""
        check_unused(self, args, given)
        check_paths(self, args)


def _values(v) -> list:
    if v is None or v == "":
        return []
    return [str(x) for x in v] if isinstance(v, (list, tuple)) else [str(v)]


def _safe(implies, value, args) -> dict:
    try:
        return {k: Path(p) for k, p in (implies(value, args) or {}).items() if p}
    except (OSError, ValueError, UserError):
        return {}


# ---------------------------------------------------------------------------
# The checks


def check_unused(spec: Spec, args, given: set[str]) -> None:
    for rule in spec.unused:
        if rule.dest in given and not rule.applies(args):
            raise UserError(f"{rule.option} is not used {rule.why}: it would be ignored; leave it out")


def check_paths(spec: Spec, args) -> None:
    """The declared outputs against the declared and implied inputs (outputs.check_run), a model
    directory and the synthetic cache; then each output's extra files (a dump's shards and index)
    against the inputs and the other outputs."""
    from . import synthetic

    files, dirs = spec.outputs(args)
    inputs = spec.inputs(args)
    protected = {"the synthetic model cache": synthetic.cache_root()}
    for p in spec.paths:
        if p.role == MODEL:
            inputs.update(model_inputs(getattr(args, p.dest, None), protected, p.option))
    outputs.check_run(files, dirs, inputs, protected)
    others = {**{k: v for k, v in files.items() if v}, **{k: v for k, v in dirs.items() if v}}
    for p in spec.paths:
        target = getattr(args, p.dest, None)
        if p.parts is None or not target:
            continue
        for what, other in [*inputs.items(), *((k, v) for k, v in others.items() if k != p.option)]:
            if p.parts(Path(target), Path(other)):
                kind = "an input of this run" if what in inputs else "another output"
                raise UserError(f"{p.option} {target} would also write {other}, {kind} ({what}): "
                                "give another path")


def model_inputs(spec: str | None, protected: dict, option: str = "--model") -> dict:
    """A model spec's files: a directory is protected and each file in it is an input (a hard link
    elsewhere to one of them is that file); a file (a GGUF) is an input."""
    if not spec or str(spec).startswith("synthetic"):
        return {}
    model = Path(spec).expanduser()
    if model.is_dir():
        protected["the model directory"] = model
        try:
            return {f"{option}'s {f.name}": f for f in model.iterdir() if f.is_file()}
        except OSError as e:
            raise UserError(f"{option} {spec}: cannot read the directory: {e.strerror or e}") from None
    return {option: model} if model.exists() else {}


# ---------------------------------------------------------------------------
# Files that a path brings with it


def tensors_beside(value, args=None) -> dict:
    """A reference manifest (.json) reads the tensors beside it (same name, .safetensors)."""
    path = Path(str(value).partition("#")[0]).expanduser()
    sibling = path.with_suffix(".safetensors")
    return {f"{path.name}'s tensors": sibling} if path.suffix == ".json" and sibling.exists() else {}


def dump_files(value, args=None) -> dict:
    """A dump named by its .safetensors path or its index: the index and every shard it names, and the
    tensors beside a manifest. Shards are the index's weight_map values, inside its directory."""
    from .dump import INDEX_SUFFIX, index_path

    path = Path(str(value).partition("#")[0]).expanduser()
    found = tensors_beside(path)
    index = path if path.name.endswith(INDEX_SUFFIX) else index_path(path)
    if not index.is_file():
        return found
    found[f"{path.name}'s index"] = index
    if index.stat().st_size > MAX_INDEX_BYTES:
        return found
    try:
        weight_map = json.loads(index.read_bytes()).get("weight_map", {})
        names = set(weight_map.values()) if isinstance(weight_map, dict) else set()
    except (ValueError, AttributeError):
        return found
    for name in sorted(n for n in names if isinstance(n, str)):
        shard = index.parent / name
        if shard.parent == index.parent:  # a name with a directory part is the loader's to refuse
            found[f"{index.name}'s shard {name}"] = shard
    return found


def directory_files(value, args=None) -> dict:
    """A directory named as an input: every file in it (a step directory, a vectors directory)."""
    path = Path(value).expanduser()
    if not path.is_dir():
        return {}
    found = {}
    with os.scandir(path) as it:
        for k, entry in enumerate(it):
            if k >= MAX_LISTED:
                break
            if entry.is_file():
                found[f"{path.name}/{entry.name}"] = Path(entry.path)
    return found


def engine_file(value, args=None) -> dict:
    """`path/to/file.py:function`: the file."""
    path, _, _ = str(value).rpartition(":")
    return {"the engine's file": Path(path)} if path.endswith(".py") else {}


def dump_parts(target: Path, candidate: Path) -> bool:
    """Whether `candidate` is a file `run --dump target` may write besides target: its shards
    (target's stem + -NNNNN + suffix, beside it) and its index."""
    from .dump import index_path

    real, cand = outputs.real_path(target), outputs.real_path(candidate)
    if cand == outputs.real_path(index_path(target)):
        return True
    return cand.parent == real.parent and re.fullmatch(re.escape(real.stem) + r"-\d{5}" + re.escape(real.suffix),
                                                       cand.name) is not None

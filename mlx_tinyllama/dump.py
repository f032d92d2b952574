"""Full-tensor dumps streamed to disk layer by layer, sharded safetensors with an index.

`run --taps '*' --dump taps.safetensors` at 2,048 tokens records ~26 GB of fp16
tensors for TinyLlama (the attention scores alone are 256 MB per tap and layer):
more than a 24 GB machine holds. `StreamingDump` is a full-mode tap recorder that
writes the taps out while the forward pass runs: when a layer's taps are complete
and at least `shard_bytes` are pending, it saves them as one shard, records their
statistics and lets them go. Each tap is evaluated as it is recorded, so memory
holds the weights, the pending shard (one layer or more) and one stage's
intermediates, whatever the number of layers.

Files (the layout of Hugging Face's sharded checkpoints):
- one shard in all: `taps.safetensors`, exactly the in-memory form;
- more: `taps-00001.safetensors`, ... plus `taps.safetensors.index.json`,
  {"metadata": {...}, "weight_map": {tap name: shard file name}}.
Every shard carries the same metadata (tokens, dtype, ...), so one shard alone is
a valid dump of its taps. `read_index` lists the shards for `compare`.

Nothing is half-written: shards go to hidden temporary files beside `path` and take
their names only in `finish()` (the index last); `abort()` (or an interrupted run)
removes them, so an earlier dump at `path` stays as it was.

Two writes are never mixed: every dump carries a generation id in its metadata (each
shard's and the index's); the index, written last, names it, and `read_index` refuses a
shard of another generation (a run stopped between renaming its shards and writing its
index). A write removes the other form of the same path afterwards (a single file removes
an earlier index and its shards; a sharded dump an earlier single file), and a reader given
`path` while both forms exist refuses instead of guessing which one is stale.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import uuid
from pathlib import Path

import mlx.core as mx

from .errors import OutputError, UserError
from .outputs import atomic_path, write_failure
from .taps import Taps, split_name, stage_of, tensor_stats

INDEX_SUFFIX = ".index.json"
DEFAULT_SHARD_BYTES = 1 << 30
GENERATION = "generation"  # the metadata key of a dump's write id
MAX_INDEX_BYTES = 64 << 20  # an index lists one line per tap: ~30 KB for TinyLlama's 1,500 taps


def index_path(path: str | Path) -> Path:
    return Path(str(path) + INDEX_SUFFIX)


def shard_path(path: str | Path, k: int) -> Path:
    p = Path(path)
    return p.with_name(f"{p.stem}-{k:05d}{p.suffix}")


class StreamingDump(Taps):
    """Records the full tensors of `names` into shards of about `shard_bytes` (whole layers
    per shard) next to `path`; `stats()` gives the statistics of every tap, as `Taps` does.
    Call `finish()` after the forward pass."""

    def __init__(self, names, path: str | Path, metadata: dict[str, str], shard_bytes: int = DEFAULT_SHARD_BYTES):
        super().__init__(names, "full")
        self.path, self.shard_bytes = Path(path), shard_bytes
        self.metadata = {**metadata, GENERATION: uuid.uuid4().hex}
        self.shards: list[tuple[Path, list[str]]] = []
        self._pending: list[Path] = []  # temporary files of the shards, renamed in finish()
        self._layer: int | None = None
        self._bytes = 0
        self._done: dict[str, dict] = {}  # stats of the taps already written

    def __call__(self, name: str, x: mx.array) -> mx.array:
        if name in self.names:
            layer = split_name(name)[0]
            if layer != self._layer and self._bytes >= self.shard_bytes:  # the previous layer is complete
                self._write()
            self._layer = layer
            self._bytes += x.nbytes
            super().__call__(name, x)
            # Evaluated tap by tap: MLX would otherwise schedule a whole layer's graph at once, and
            # its allocations run ahead of the computation (3.9 GB above the weights for one
            # 2,048-token layer, against 2.2 GB evaluated tap by tap; docs/benchmarks.md).
            mx.eval(self.tensors[name])
            return x
        return super().__call__(name, x)

    def _write(self) -> None:
        if not self.tensors:
            return
        mx.eval(list(self.tensors.values()))  # the forward pass up to here
        path = shard_path(self.path, len(self.shards) + 1)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".safetensors", dir=path.parent)
            os.close(fd)
            self._pending.append(Path(tmp))
            mx.save_safetensors(tmp, self.tensors, metadata=self.metadata)
        except Exception as e:  # noqa: BLE001: MLX raises RuntimeError for a failed write, not OSError
            reason = write_failure(e)
            if reason is None:
                raise
            self.abort()
            raise OutputError(f"cannot write {self.path} (its shard {path.name}): {reason}; the earlier dump (if any) "
                              "is unchanged") from None
        self.shards.append((path, list(self.tensors)))
        for n, x in self.tensors.items():
            self._done[n] = tensor_stats(x, stage_of(n).token_axis)
        self.tensors, self._bytes = {}, 0  # released: memory holds one shard at a time

    def finish(self) -> list[Path]:
        """Write the last shard; one shard becomes `path` itself, several get an index.
        Returns the files written (the index last)."""
        self._write()
        if len(self.shards) == 1:
            self.shards[0] = (self.path, self.shards[0][1])
        try:
            for tmp, (final, _) in zip(self._pending, self.shards):
                os.chmod(tmp, 0o644)
                os.replace(tmp, final)
        except OSError as e:
            self.abort()
            raise OutputError(f"cannot write {self.path}: {e.strerror or e}") from None
        self._pending = []
        if len(self.shards) == 1:
            _remove_sharded(self.path)  # an earlier sharded dump of this path is stale now
            return [self.path]
        index = {"metadata": {**self.metadata, "shards": len(self.shards)},
                 "weight_map": {n: p.name for p, names in self.shards for n in names}}
        with atomic_path(index_path(self.path)) as tmp:
            tmp.write_text(json.dumps(index, indent=1))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # an earlier single-file dump of this path is stale now
        ours = {p.name for p, _ in self.shards}
        for k in range(len(self.shards) + 1, 100000):  # an earlier, longer sharded dump's last shards
            extra = shard_path(self.path, k)
            if not extra.exists() or extra.name in ours:
                break
            extra.unlink()
        return [p for p, _ in self.shards] + [index_path(self.path)]

    def abort(self) -> None:
        """Remove the shards not yet renamed into place (an interrupted or failed run)."""
        for tmp in self._pending:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self._pending = []

    def stats(self) -> dict[str, dict]:
        return {n: self._done[n] for n in self.order}


def _remove_sharded(path: Path) -> None:
    """Remove the sharded dump of `path` (its index, then the shards it names that carry this path's
    shard names: nothing else an index could name is deleted)."""
    index = index_path(path)
    try:
        names = json.loads(index.read_text()).get("weight_map", {}).values()
    except (OSError, ValueError, AttributeError):
        names = []
    with contextlib.suppress(FileNotFoundError):
        os.unlink(index)
    pattern = re.compile(re.escape(path.stem) + r"-\d{5}" + re.escape(path.suffix))
    for name in {n for n in names if isinstance(n, str)}:
        if pattern.fullmatch(name):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path.parent / name)


def read_index(path: str | Path) -> tuple[list[Path], dict]:
    """A dump's index -> (its shard files, in order; its metadata). Shard names must be plain file
    names beside the index; an index of more than MAX_INDEX_BYTES is refused."""
    path = Path(path)
    if path.exists() and not path.is_file():  # a FIFO would block the read, a device never end it
        raise UserError(f"{path} is not a regular file; a dump index is a JSON file")
    try:
        if path.stat().st_size > MAX_INDEX_BYTES:
            raise UserError(f"{path} is {path.stat().st_size} bytes; a dump index is read up to {MAX_INDEX_BYTES}")
        index = json.loads(path.read_text())
        weight_map = index["weight_map"]
        names = list(weight_map.values())
        meta = index.get("metadata", {})
        if not isinstance(meta, dict):
            raise TypeError("metadata is not an object")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise UserError(f"{path} is not a dump index (JSON with a weight_map): {e}") from None
    bad = [n for n in names if not isinstance(n, str) or n in ("", ".", "..") or "/" in n or "\\" in n or ":" in n]
    if bad:
        raise UserError(f"{path} names a shard outside its directory ({json.dumps(bad[0])[:60]}): shard names are "
                        "file names beside the index")
    shards = list(dict.fromkeys(path.parent / f for f in names))
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        raise UserError(f"{path} names shards that do not exist: {', '.join(missing[:3])}")
    return shards, meta


def check_generation(shard: Path, shard_meta: dict, index: Path, index_meta: dict) -> None:
    """A shard read through an index must be of the index's write (dumps written before generation
    ids existed carry none and are not checked)."""
    want = index_meta.get(GENERATION)
    if want is not None and shard_meta.get(GENERATION) != want:
        raise UserError(f"{shard} is not of the dump that {index.name} describes (another run's shard: the run "
                        "that wrote it was stopped, or files were copied over): rerun the dump")


def check_single(path: Path) -> None:
    """A single-file dump read by its name while a sharded dump of the same name exists: one of the
    two is stale (a write removes the other form), and which one is not guessed."""
    if index_path(path).is_file():
        raise UserError(f"both {path.name} and {index_path(path).name} exist in {path.parent}: two dumps of one "
                        "path, one of them stale; delete the one you did not mean (or give the index)")

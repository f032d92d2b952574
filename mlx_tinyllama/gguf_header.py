"""The GGUF header: metadata and tensor table of a little-endian GGUF v2/v3 file, every
count, size, offset, alignment and type checked against the format and the file before
anything is read or allocated (a corrupt header is one UserError, never a division by
zero, a wrong offset or a huge allocation)."""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

# GGUF value types (gguf spec): id -> struct format; 8 is string, 9 is array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NP = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
       7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


class _Truncated(Exception):
    pass


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (rows first), i.e. GGUF's ne reversed
    type_id: int
    type_name: str
    offset: int  # absolute, in bytes
    n_bytes: int


@dataclass
class Header:
    version: int
    fields: dict  # key -> python value (numeric arrays as lists)
    tensors: dict  # name -> TensorInfo, file order


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise _Truncated(f"needs byte {self.pos + n}, the file has {len(self.buf)}")
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))[0]

    def string(self) -> str:
        return self.take(self.unpack("Q")).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype == 6:
            # GGUF stores float32: read 1e-05, not 9.99999974e-06 (the shortest decimal
            # that round-trips in float32 is what the writer meant).
            return float(str(np.float32(self.unpack("f"))))
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            sub, n = self.unpack("I"), self.unpack("Q")
            least = np.dtype(_NP[sub]).itemsize if sub in _NP else 8 if sub == 8 else 12
            if n * least > len(self.buf) - self.pos:
                raise _Truncated(f"an array of {n} values at byte {self.pos} does not fit in the file")
            if sub in _NP:  # numeric arrays in one read: the vocabulary's scores and types
                a = np.frombuffer(self.take(n * np.dtype(_NP[sub]).itemsize), dtype=np.dtype(_NP[sub]).newbyteorder("<"))
                return a.tolist()
            return [self.value(sub) for _ in range(n)]
        raise ValueError(f"unknown GGUF value type {vtype}")


def parse(path: Path, buf) -> Header:
    """The GGUF header (metadata and tensor table) of a little-endian GGUF v2/v3 file.

    Our own small parser: gguf-py's GGUFReader builds numpy views per string and takes
    ~2 s on a 32000-token vocabulary; this takes tens of milliseconds."""
    import gguf

    size = len(buf)
    if size < 4:
        raise UserError(f"{path} is truncated: {size} bytes, too short for a GGUF header")
    if bytes(buf[:4]) != b"GGUF":
        raise UserError(f"{path} is not a GGUF file: its magic is {bytes(buf[:4])!r}, expected b'GGUF'")
    c = _Cursor(buf)
    try:
        c.take(4)
        version = c.unpack("I")
        if version not in (2, 3):
            hint = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
            raise UserError(f"{path} is GGUF version {version}{hint}; this tool reads little-endian versions 2 and 3")
        n_tensors, n_kv = c.unpack("Q"), c.unpack("Q")
        # Each entry takes at least this many bytes: a count the file cannot hold is refused before looping.
        if n_tensors * 24 + n_kv * 13 > size - c.pos:
            raise _Truncated(f"it declares {n_tensors} tensors and {n_kv} metadata keys, more than its "
                             f"{size} bytes can hold")
        fields = {}
        for _ in range(n_kv):
            key = c.string()
            fields[key] = c.value(c.unpack("I"))
        infos = []
        for _ in range(n_tensors):
            name = c.string()
            n_dims = c.unpack("I")
            if n_dims > 4:  # GGML_MAX_DIMS
                raise UserError(f"{path}: tensor {name} declares {n_dims} dimensions; GGUF allows at most 4")
            ne = [c.unpack("Q") for _ in range(n_dims)]
            infos.append((name, ne, c.unpack("I"), c.unpack("Q")))
    except _Truncated as e:
        raise UserError(f"{path} is truncated in its header: {e}") from None
    except (ValueError, struct.error) as e:
        raise UserError(f"{path} has a corrupt header: {e}") from None
    align = fields.get("general.alignment", 32)
    # The spec: a power of two (the writer pads with it) and a multiple of 8 (ggml's block types need it).
    if isinstance(align, bool) or not isinstance(align, int) or align < 8 or align & (align - 1):
        raise UserError(f"{path}: general.alignment is {align!r}; expected a power of two >= 8 (default 32)")
    data_start = -(-c.pos // align) * align
    tensors = {}
    for name, ne, type_id, rel in infos:
        tensors[name] = _tensor_info(path, name, ne, type_id, rel, align, data_start, size)
    fields["GGUF.version"] = version
    return Header(version, fields, tensors)


def _tensor_info(path, name, ne, type_id, rel, align, data_start, size) -> TensorInfo:
    """One tensor-table entry, checked against the format and the file before anything reads it."""
    import gguf

    try:
        qtype = gguf.GGMLQuantizationType(type_id)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise UserError(f"{path}: tensor {name} has the unknown ggml type id {type_id}") from None
    if not 1 <= len(ne) <= 4 or any(n < 1 for n in ne):
        raise UserError(f"{path}: tensor {name} has dimensions {ne}; expected 1 to 4 positive sizes")
    if ne[0] % block:
        raise UserError(f"{path}: tensor {name} has rows of {ne[0]} values, not a multiple of "
                        f"{qtype.name}'s block of {block}")
    if rel % align:
        raise UserError(f"{path}: tensor {name} starts at data offset {rel}, not a multiple of the "
                        f"alignment {align}")
    n_bytes = int(np.prod(ne, dtype=object)) // block * type_size
    info = TensorInfo(name, tuple(reversed(ne)), type_id, qtype.name, data_start + rel, n_bytes)
    if info.offset + info.n_bytes > size:
        raise UserError(
            f"{path} is truncated: tensor {name} ends at byte {info.offset + info.n_bytes}, the file has {size}"
        )
    return info


def open_gguf(path) -> tuple[Header, "mmap.mmap"]:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a GGUF file")
    if not path.is_file():
        raise UserError(f"{path}: no such GGUF file")
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise UserError(f"{path} is empty (truncated), not a GGUF file")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return parse(path, buf), buf
    except BaseException:
        buf.close()
        raise


def header_value(header: Header, key: str, default=None):
    v = header.fields.get(key)
    return default if v is None else v


def meta(header, path, key: str, kind, default=None, required: bool = False):
    """A metadata value of the expected kind (int or float): a string or a float where an integer
    belongs is refused, not converted (int("32") or int(32.7) would hide a corrupt header)."""
    v = header_value(header, key, default)
    if v is None:
        if required:
            raise UserError(f"{path} lacks the GGUF metadata key {key}")
        return None
    ok = isinstance(v, int) if kind is int else isinstance(v, (int, float)) and np.isfinite(v)
    if isinstance(v, bool) or not ok:
        what = "an integer" if kind is int else "a finite number"
        raise UserError(f"{path}: GGUF metadata {key} is {v!r}; expected {what}")
    return kind(v)

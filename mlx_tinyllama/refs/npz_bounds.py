"""An npz's arrays checked against the bytes that hold them, before NumPy allocates: each
member's `.npy` header declares a shape and dtype, and the zip's directory says how many
bytes the member holds (uncompressed). A header that declares more than that (a corrupt or
hostile file: a few bytes declaring a 150 GB array made NumPy try to allocate it) is one
UserError; reading stops at the headers."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
from numpy.lib import format as fmt

from ..errors import UserError


def check_npz(path: Path) -> None:
    """Refuse `path` when one of its arrays declares more bytes than its zip member holds."""
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with z.open(info) as f:
                    version = fmt.read_magic(f)
                    reader = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
                    if reader is None:  # version 3 (UTF-8 field names): left to NumPy
                        continue
                    shape, _, dtype = reader(f)
                    header = f.tell()
                declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
                held = info.file_size - header
                if declared > held:
                    raise UserError(f"{path}: {info.filename[:-4]} declares shape {list(shape)} of {dtype} "
                                    f"({declared} bytes) but holds {max(held, 0)}: truncated or corrupt")
    except (zipfile.BadZipFile, ValueError, OSError, EOFError):
        return  # not a zip, a broken header: the tensor reader says so in its own words

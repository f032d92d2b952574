"""raw_dump.py: the tap_dump.py example, the same command as raw_dump.c and raw_dump.rs.

    python kit/examples/raw_dump.py MANIFEST DATA OUT.safetensors f32|f16|bf16 TOKENS POSITION

MANIFEST: one line per tensor, "NAME NDIM D0 D1 ...", in the order of DATA, which holds the
tensors' float32 values back to back (little-endian, row-major), or "@fused NAME LAYOUT
TAP1,TAP2,..." naming a fused tensor (set_fused). TOKENS: "1,529,..."
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tap_dump import TapDump  # noqa: E402


def main(argv) -> int:
    if len(argv) != 6:
        print("error: usage: raw_dump.py MANIFEST DATA OUT f32|f16|bf16 TOKENS POSITION", file=sys.stderr)
        return 2
    manifest, data_path, out, store, tokens, position = argv
    store = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[store]
    ids = [int(t) for t in tokens.split(",") if t]
    d = TapDump(tokens=ids, position=int(position), dtype=store, engine="kit/examples/raw_dump.py")
    data = np.fromfile(data_path, dtype="<f4")
    at = 0
    with open(manifest) as f:
        for line in f:
            fields = line.split()
            if not fields:
                continue
            if fields[0] == "@fused":  # "@fused NAME LAYOUT TAP1,TAP2,...": NAME holds those taps side by side
                d.set_fused(fields[1], fields[3].split(","), fields[2])
                continue
            shape = [int(s) for s in fields[2:2 + int(fields[1])]]
            count = int(np.prod(shape))
            d.add(fields[0], data[at:at + count].reshape(shape), store_as=store)
            at += count
    d.write(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Convert a Hugging Face Llama directory to GGUF (llama.cpp layout).

    python scripts/hf_to_gguf.py HF_DIR OUT.gguf [--outtype f32|f16|q8_0]
                                 [--no-permute | --permute-twice]

--no-permute / --permute-twice write deliberately wrong Q/K layouts, for tests
that prove a wrong layout is detected. See docs/gguf.md.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from mlx_tinyllama.errors import UserError
from mlx_tinyllama.gguf_write import OUT_TYPES, convert


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("hf_dir", help="directory with config.json, *.safetensors, tokenizer.model")
    p.add_argument("out", help="GGUF file to write")
    p.add_argument("--outtype", choices=OUT_TYPES, default="f16")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--no-permute", action="store_true", help="write Q/K in HF order (WRONG for llama.cpp)")
    g.add_argument("--permute-twice", action="store_true", help="apply llama.cpp's Q/K permutation twice (WRONG)")
    args = p.parse_args(argv)
    permute = "none" if args.no_permute else "twice" if args.permute_twice else "once"
    try:
        written = convert(args.hf_dir, args.out, out_type=args.outtype, permute=permute)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    types = ", ".join(f"{k}×{v}" for k, v in sorted(Counter(written.values()).items()))
    print(f"wrote {args.out}: {len(written)} tensors ({types}), Q/K permuted {permute}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

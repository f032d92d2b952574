"""Write a full-tensor transformers reference (safetensors + JSON manifest) for a model and prompt.

    python scripts/make_reference.py --model synthetic:tiny --dtype float32 --out refs/synthetic-tiny-fp32

Every canonical tap is captured by reference/hf.py (transformers, eager attention).
`--logits last` (the default) keeps only the last token's logits row, which is what
the seed compares and keeps committed references small (a full [T, 32000] row set
is 4.9 MB in fp32); the manifest records it under "token_rows".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mlx_tinyllama import sources
from mlx_tinyllama.errors import UserError
from mlx_tinyllama.cli_common import add_prompt_arguments
from mlx_tinyllama.prompt import resolve_prompt
from mlx_tinyllama.reference.hf import write_reference


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="synthetic:tiny", help="model spec (HF dir, synthetic[:preset]); default synthetic:tiny")
    p.add_argument("--dtype", default="float32", help="float32 (default), float16, bfloat16")
    p.add_argument("--out", required=True, help="output path without suffix: writes OUT.json and OUT.safetensors")
    p.add_argument("--logits", choices=("last", "all"), default="last", help="logits rows to keep (default: last)")
    add_prompt_arguments(p)
    return p.parse_args(argv)


def keep_last_logits(manifest_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    manifest = json.loads(manifest_path.read_text())
    tensor_file = manifest_path.parent / manifest["tensors"]
    tensors = load_file(str(tensor_file))
    tensors["logits"] = tensors["logits"][-1:].copy()
    save_file(tensors, str(tensor_file))
    manifest["taps"]["logits"]["shape"] = list(tensors["logits"].shape)
    manifest["token_rows"] = {"logits": [-1]}
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        dtype = sources.dtype_name(args.dtype)
        src = sources.resolve(args.model)
        if src.format != "hf":
            raise UserError("the transformers reference needs an HF directory or a synthetic model")
        prompt = resolve_prompt(args, src.path, src.path)
        manifest = write_reference(Path(args.out), src.path, prompt.ids, dtype, model_spec=args.model,
                                   prompt_text=prompt.text)
        if args.logits == "last":
            keep_last_logits(manifest)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = sum(p.stat().st_size for p in (manifest, manifest.with_suffix(".safetensors")))
    print(f"wrote {manifest} and {manifest.with_suffix('.safetensors').name} ({size / 1e6:.2f} MB), {len(prompt.ids)} ids")
    return 0


if __name__ == "__main__":
    sys.exit(main())

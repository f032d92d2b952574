"""Carry the seed's published reference values (../shared/refs/tinyllama-1.1b-chat-v1.0/*.json)
into the project's own reference file, each key mapped to a canonical tap and an index,
with provenance and the traps spelled out.

    python scripts/import_seed_refs.py [--shared ../shared/refs] [--out refs/tinyllama-1.1b-chat-v1.0.seed.json]

The mapping itself lives in mlx_tinyllama/refs/seed.py (seed_entries), so the raw files and
this bundle always read the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mlx_tinyllama.refs import SEED_FORMAT, seed_entries, seed_format_of
from mlx_tinyllama.synthetic import TINYLLAMA

REPO = Path(__file__).resolve().parents[1]
FILES = ("transformers_reference_values", "candle_22layers_reference", "candle_1layer_reference")


def build(shared: Path) -> dict:
    folder = shared / "tinyllama-1.1b-chat-v1.0"
    bundle = {"format": SEED_FORMAT, "model": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
              "config": {k: v for k, v in TINYLLAMA.as_dict().items()
                         if k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                  "num_key_value_heads", "vocab_size", "head_dim")},
              "imported_by": "scripts/import_seed_refs.py from ../shared/refs (see its README.md for the traps)",
              "sources": {}}
    for name in FILES:
        path = folder / f"{name}.json"
        data = json.loads(path.read_text())
        fmt = seed_format_of(data)
        if fmt != name:
            raise SystemExit(f"{path}: expected format {name}, found {fmt}")
        mapped = seed_entries(fmt, data)
        bundle["sources"][name] = {"file": f"../shared/refs/tinyllama-1.1b-chat-v1.0/{name}.json",
                                   "provenance": mapped["provenance"], "dtype": mapped["dtype"],
                                   "prompt": mapped["prompt"], "config": mapped["config"],
                                   "entries": mapped["entries"], "not_comparable": mapped["not_comparable"]}
    return bundle


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shared", default=str(REPO.parent / "shared" / "refs"))
    p.add_argument("--out", default=str(REPO / "refs" / "tinyllama-1.1b-chat-v1.0.seed.json"))
    args = p.parse_args(argv)
    bundle = build(Path(args.shared))
    Path(args.out).write_text(json.dumps(bundle, indent=1, ensure_ascii=False) + "\n")
    n = sum(len(s["entries"]) for s in bundle["sources"].values())
    print(f"wrote {args.out}: {len(bundle['sources'])} sources, {n} entries")
    return 0


if __name__ == "__main__":
    sys.exit(main())

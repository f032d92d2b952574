"""The table of docs/llamacpp.md: `compare` on every committed llama.cpp fixture log.

    PYTHONPATH=$PWD python scripts/llamacpp/table.py [--out table.md]

For each case: llama.cpp's settings, whether the CPU had AMX, the matmul path compare read from the
log (docs/llamacpp.md), compare's exit code, the first divergence, and the worst
ratio value/tolerance (a fault: how far over; a clean run: how far under). The reference runs on
GGUFs that gguf_write writes from the same synthetic seed (byte for byte the tensors of
llama.cpp's converter), with llama.cpp's precision read from the log and the GGUF (--emulate auto).
Needs no llama.cpp. `--sums`: instead, each clean case's worst printed sum against its own
tolerance (`sum_err`: the sum's rounding, docs/llamacpp.md) and against the older sum|x| one.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import lzma
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
FIXTURES = REPO / "tests" / "fixtures" / "llamacpp"


def main(argv=None) -> int:
    from mlx_tinyllama import trace
    from mlx_tinyllama.gguf_write import convert
    from mlx_tinyllama.synthetic import materialize

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the table here")
    ap.add_argument("--only", metavar="GLOB", nargs="+", help="only the cases whose name matches one, e.g. 'amx_*'")
    ap.add_argument("--patterns", action="store_true",
                    help="also the table of each fault's first divergence: its pattern and the hint's first words")
    ap.add_argument("--sums", action="store_true",
                    help="instead, the table of the printed sums of the clean cases: each one's worst sum against "
                         "its own tolerance (the sum's rounding) and against the older sum|x| one")
    args = ap.parse_args(argv)
    cases = json.loads((FIXTURES / "cases.json").read_text())["cases"]
    if args.only:
        import fnmatch

        cases = {k: v for k, v in cases.items() if any(fnmatch.fnmatch(k, g) for g in args.only)}
    rows = ["| case | llama.cpp settings | GGUF | AMX CPU | matmul path | exit | first divergence | worst value/tolerance |",
            "|---|---|---|---|---|---|---|---|"]
    sums = ["| case | sums | worst sum: stage | its error | tolerance (own rounding) | tolerance by sum\\|x\\| | "
            "error / tolerance: own | by sum\\|x\\| |", "|---|---|---|---|---|---|---|---|"]
    shapes = ["| case | first divergence | pattern | the hint's first words (the pattern's, up to its first colon) |",
              "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ggufs = {}
        for name, c in sorted(cases.items(), key=lambda kv: (kv[1]["fault"] is not None, kv[0])):
            if c["preset"] == "tinyllama" or (args.sums and c["fault"] is not None):
                continue  # the 1.1B shape: see docs/llamacpp.md (a 2.2 GB GGUF); a fault's sums are no figure
            gkey = (c["preset"], c["gguf_outtype"])  # small, or the family's tiny presets (family_*)
            if gkey not in ggufs:
                ggufs[gkey] = tmp / f"{c['preset']}-{c['gguf_outtype']}.gguf"
                convert(materialize(c["preset"], 0), ggufs[gkey], out_type=c["gguf_outtype"])
            log = tmp / f"{name}.log"
            log.write_bytes(lzma.decompress((FIXTURES / c["log"]).read_bytes()))
            out = tmp / f"{name}.json"
            extra = ["--prompt-file", str(FIXTURES / c["prompt"]), "--bos"] if name == "newline_stripped" else []
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
                rc = trace.main(["compare", "--against", str(log), "--model", str(ggufs[gkey]),
                                 "--json", str(out), *extra])
            path = "-"
            if out.exists():
                result = json.loads(out.read_text())
                emulated = result["references"][0]["provenance"].get("emulated_engine_precision", "")
                path = ("unknown: a tolerance for both" if "unknown" in emulated else "AMX (read)" if "AMX buffer" in emulated
                        else "plain" if "matmul inputs f16" in emulated or "matmul inputs q8_0" in emulated else "-")
                ratio = max(e["value"] / e["tolerance"] for e in result["entries"] if e["tolerance"] > 0)
                div = result["first_divergence"]
                sum_rows = [e for e in result["entries"] if e["metric"] == "sum_err"]
                if sum_rows:
                    w = max(sum_rows, key=lambda e: e["value"] / e["tolerance"])
                    d = w["details"]
                    sums.append(f"| `{name}` | {len(sum_rows)} | `{w['tap']}` ({w['key'].split(' sum')[0]}) "
                                f"| {d['max_abs']:.3g} | {d['tolerance_abs']:.3g} | {d['tolerance_abs_by_sum_abs']:.3g} "
                                f"| {d['max_abs'] / d['tolerance_abs']:.2f} | {d['max_abs'] / d['tolerance_abs_by_sum_abs']:.2f} |")
                first = f"`{div['tap']}`" if div else "none (match)"
                worst = f"{div['error']['ratio']:.0f}x over" if div else f"{ratio:.2f} (under 1)"
                if div:
                    shape = div["pattern"]["name"] if div["pattern"] else "none"
                    lead = div["pattern"]["words"] if div["pattern"] else div["hint"].split(": ")[0]
                    shapes.append(f"| `{name}` | `{div['tap']}` | {shape} | {lead} |")
            else:
                said = re.search(r"\((\d+ ids vs \d+ expected).*?\): (.*?)\. Nothing", err.getvalue())
                first = f"none: token mismatch ({said.group(1)}: {said.group(2)})" if said else err.getvalue().strip()
                worst = "-"
            amx = "yes" if "AMX_INT8 = 1" in c.get("cpu", "") else "no"
            rows.append(f"| `{name}` | {c['settings']} | {c['gguf_outtype']} | {amx} | {path} | {rc} | {first} | {worst} |")
    table = "\n".join(sums if args.sums else rows + (["", *shapes] if args.patterns else []))
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

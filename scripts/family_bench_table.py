"""The table of docs/family.md's "bench at the real shapes": ours / mlx-lm per architecture, read
from the committed `bench --json` files (docs/cpu/2026-12-08-family-real-*.json, the GPU's under
docs/h100 or docs/h200).

    python scripts/family_bench_table.py [FILE.json ...]

Each figure is the median of the *paired* ratios: the bench alternates the engines sample by
sample (ours, mlx-lm, ours, ...), so sample i of ours and sample i of mlx-lm ran back to back, and
t_mlx_lm[i] / t_ours[i] (> 1: ours is faster) cancels whatever the machine did over longer times;
in brackets the lowest and highest paired ratio. A ratio whose range straddles 1 is noise. A median
below 1 / 1.2 is marked `slow`: docs/family.md explains each with the stage timing of the same JSON
(printed under the table as the stage kinds' shares, where the JSON has a `stages` section).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
DEFAULT = ["cpu/2026-12-08-family-real-*.json", "cpu/2026-12-08-family-profile-*.json", "h100/2026-12-08-family/family-*.json",
           "h200/2026-12-08-family/family-*.json"]
ORDER = ["tinyllama", "smollm2-135m", "qwen2.5-0.5b", "llama3.2-1b", "mistral-7b"]
SLOW = 1 / 1.2


def paired(section: dict, ours: str, other: str = "mlx_lm") -> tuple[float, float, float]:
    a, b = section["engines"][ours]["samples_s"], section["engines"][other]["samples_s"]
    ratios = [tb / ta for ta, tb in zip(a, b)]
    return statistics.median(ratios), min(ratios), max(ratios)


def cell(r: tuple[float, float, float]) -> str:
    med, lo, hi = r
    return f"{med:.2f} [{lo:.2f}-{hi:.2f}]" + (" slow" if med < SLOW else "")


def device(d: dict) -> str:
    hw = d["hardware"]
    return "CPU" if hw["backend"] == "cpu" else hw["name"].replace("NVIDIA ", "")


def preset(d: dict) -> str:
    m = d["model"]
    return (m.get("details") or {}).get("preset") or str(m.get("spec", "?")).removeprefix("synthetic:")


def load(patterns: list[str]) -> list[dict]:
    files = [p for pat in patterns for p in sorted(DOCS.glob(pat))] if patterns == DEFAULT else \
        [Path(p) for p in patterns]
    runs = [json.loads(f.read_text()) for f in files]
    return sorted(runs, key=lambda d: (device(d) != "CPU", device(d),
                                       ORDER.index(preset(d)) if preset(d) in ORDER else len(ORDER), d["date"]))


def table(runs: list[dict]) -> list[str]:
    lengths = sorted({r["tokens"] for d in runs for r in d["prefill"]})
    head = (["preset", "device", "run (UTC)", "dtype"] + [f"prefill {t}" for t in lengths]
            + ["decode eager", "decode compiled", "greedy ids equal"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d in runs:
        pre = {r["tokens"]: r for r in d["prefill"]}
        dec = d["decode"]
        row = [f"`{preset(d)}`", device(d), d["date"][5:16].replace("T", " "), d["dtype"]]
        row += [cell(paired(pre[t], "ours")) if t in pre else "" for t in lengths]
        row += [cell(paired(dec, "ours")), cell(paired(dec, "ours_compiled")),
                f"{dec['greedy_tokens_agree'].get('mlx_lm', 0):.2f}"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def stage_shares(runs: list[dict]) -> list[str]:
    """Where the time goes, from each run's own `stages` section (each stage kind timed alone)."""
    out = []
    for d in runs:
        st = d.get("stages")
        if not st:
            continue
        parts = []
        for phase in ("prefill", "decode"):
            kinds = st[phase]["kinds"]
            top = sorted(kinds, key=lambda k: -kinds[k]["seconds"])[:3]
            parts.append(f"{phase} {st[phase]['tokens']} tok: " + ", ".join(
                f"{k} {100 * kinds[k]['share_of_parts']:.0f}%" for k in top)
                + f" (coverage {st[phase]['coverage']:.2f})")
        out.append(f"- `{preset(d)}` ({device(d)}): " + "; ".join(parts))
    return out


def main(argv: list[str]) -> int:
    runs = load(argv or DEFAULT)
    if not runs:
        print("no bench JSON found", file=sys.stderr)
        return 2
    print("\n".join(table(runs)))
    shares = stage_shares(runs)
    if shares:
        print()
        print("\n".join(shares))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The numbers behind tolerances.py's constants: NMSE per tap of several (side a, side b) pairs on
synthetic models (ours and transformers, fp32/fp16/bf16, fused and explicit kernels), with
NMSE / u_eff^2 and the headroom against the derived tolerance (docs/compare.md quotes its output).

    python scripts/measure_tolerances.py small medium [--json=rows.json]
    python scripts/measure_tolerances.py --amplification small medium   (A_CALIBRATED: no torch needed)
"""

from __future__ import annotations

import math

import numpy as np

from mlx_tinyllama.metrics import metrics
from mlx_tinyllama.tolerances import UNIT_ROUNDOFF, depth_of, tolerance_for, unit_roundoff

SEED_IDS = [529, 29989, 5205, 29989, 29958, 13, 3492, 526, 263, 19780, 13563, 7451, 29889, 2, 29871, 13,
            29966, 29989, 1792, 29989, 29958, 13, 10994, 29991, 1128, 526, 366, 29973, 2, 29871, 13,
            29966, 29989, 465, 22137, 29989, 29958, 13]


def measure(presets=("small", "medium"), kernels=("fused", "explicit")) -> list[dict]:
    """NMSE per tap of several (side a, side b) pairs on synthetic models, with NMSE/u_eff^2."""
    import mlx.core as mx

    from mlx_tinyllama import sources
    from mlx_tinyllama.reference import hf
    from mlx_tinyllama.synthetic import materialize
    from mlx_tinyllama.taps import Taps, tap_names

    ids = SEED_IDS
    rows = []
    for preset in presets:
        model_dir = materialize(preset, 0)
        n_layers = sources.load(f"synthetic:{preset}", "float32").config.num_hidden_layers
        ref = {dt: {k: v.float().numpy() for k, v in hf.capture(hf.load_hf_model(model_dir, dt), ids)[0].items()}
               for dt in ("float32", "float16", "bfloat16")}
        ours = {}
        for dt in ("float32", "float16", "bfloat16"):
            for kern in kernels:
                lm = sources.load(str(model_dir), dt, "hf", kern)
                taps = Taps(tap_names(n_layers), "full")
                lm.model(mx.array(ids), tap=taps)
                ours[(dt, kern)] = {k: np.array(v.astype(mx.float32)) for k, v in taps.tensors.items()}
        pairs = [(f"ours {dt} {k} vs transformers {dt}", ours[(dt, k)], ref[dt], dt, dt)
                 for dt in ("float32", "float16", "bfloat16") for k in kernels]
        pairs += [("transformers float16 vs transformers float32", ref["float16"], ref["float32"], "float16", "float32"),
                  ("transformers bfloat16 vs transformers float32", ref["bfloat16"], ref["float32"], "bfloat16", "float32"),
                  ("ours float32 fused vs transformers float16", ours[("float32", kernels[0])], ref["float16"],
                   "float32", "float16")]
        for label, a, b, da, db in pairs:
            for tap in tap_names(n_layers):
                m = metrics(a[tap], b[tap], masked=tap.endswith("scores_masked"))
                u_eff = max(unit_roundoff(da), unit_roundoff(db))
                rows.append({"preset": preset, "pair": label, "tap": tap, "depth": depth_of(tap, n_layers),
                             "nmse": m["nmse"], "nmse_per_u2": m["nmse"] / u_eff ** 2,
                             "nmse_per_u32_2": m["nmse"] / UNIT_ROUNDOFF["float32"] ** 2,
                             "tolerance": tolerance_for(tap, "nmse", da, db, n_layers), "mask_mismatch": m["mask_mismatch"]})
    return rows


def amplification(presets=("small", "medium")) -> dict[str, list[float]]:
    """The softmax amplification A (tolerances.py) of each layer's scores, our float32 run of the
    seed ids, per preset: the largest is A_CALIBRATED, what the constants above already absorb."""
    from mlx_tinyllama import sources
    from mlx_tinyllama.compare import run_side
    from mlx_tinyllama.metrics import softmax_amplification, total_amplification

    out = {}
    for preset in presets:
        lm = sources.load(f"synthetic:{preset}", "float32")
        scores = run_side(lm, SEED_IDS).tensors  # [H, T, S] per layer
        out[preset] = [total_amplification(softmax_amplification(scores[f"layers.{i}.attn.scores_masked"]))
                       for i in range(lm.config.num_hidden_layers)]
    return out


def _summarize(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="NMSE per pair: max over taps, and headroom against the derived tolerance")
    for col in ("preset", "pair", "max nmse", "at tap", "max nmse/u_eff²", "layer-0 max", "last-layer max",
                "min tolerance/nmse"):
        table.add_column(col)
    keys = sorted({(r["preset"], r["pair"]) for r in rows}, key=lambda k: (k[0], k[1]))
    for preset, pair in keys:
        sel = [r for r in rows if r["preset"] == preset and r["pair"] == pair]
        worst = max(sel, key=lambda r: r["nmse"])
        last_depth = max(r["depth"] for r in sel if r["tap"].startswith("layers."))
        l0 = max(r["nmse"] for r in sel if r["depth"] == 1)
        ll = max(r["nmse"] for r in sel if r["depth"] == last_depth)
        headroom = min(r["tolerance"] / r["nmse"] if r["nmse"] > 0 else math.inf for r in sel)
        table.add_row(preset, pair, f"{worst['nmse']:.2e}", worst["tap"], f"{max(r['nmse_per_u2'] for r in sel):.3g}",
                      f"{l0:.2e}", f"{ll:.2e}", f"{headroom:.3g}")
    Console().print(table)


if __name__ == "__main__":  # a measurement tool: its output is in docs/compare.md
    import json
    import sys

    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if "--amplification" in sys.argv:
        for preset, a in amplification(tuple(args) or ("small", "medium")).items():
            print(f"{preset}: A per layer " + " ".join(f"{x:.2f}" for x in a) + f" (max {max(a):.2f})")
        sys.exit(0)
    rows = measure(tuple(args) or ("small", "medium"))
    for a in sys.argv[1:]:
        if a.startswith("--json="):
            with open(a[7:], "w") as f:
                json.dump(rows, f)
    _summarize(rows)

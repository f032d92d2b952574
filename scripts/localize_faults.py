"""Every fault of the NumPy test engine (tests/numpy_engine.py) through compare + localize: the
first stage over tolerance, the localized stage and the diagnosis, as the Markdown table in
docs/localize.md.

    PYTHONPATH=. python scripts/localize_faults.py            # synthetic:tiny (drift case: small)
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from numpy_engine import FAULTS, Engine  # noqa: E402

from mlx_tinyllama import refs as R  # noqa: E402
from mlx_tinyllama import sources  # noqa: E402
from mlx_tinyllama.compare import compare, run_side  # noqa: E402
from mlx_tinyllama.localize import localize  # noqa: E402
from mlx_tinyllama.localize.steps import compare_steps, load_steps  # noqa: E402
from mlx_tinyllama.synthetic import materialize  # noqa: E402
from mlx_tinyllama.tolerances import Tolerances, tolerance_for  # noqa: E402

SEED_IDS = [529, 29989, 5205, 29989, 29958, 13, 3492, 526, 263, 19780, 13563, 7451, 29889, 2, 29871, 13,
            29966, 29989, 1792, 29989, 29958, 13, 10994, 29991, 1128, 526, 366, 29973, 2, 29871, 13,
            29966, 29989, 465, 22137, 29989, 29958, 13]


def fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.2g}"


def prefill_row(preset: str, specs: list[str], tmp: Path) -> str:
    lm = sources.load(f"synthetic:{preset}", "float32")
    ref = run_side(lm, SEED_IDS)
    engine = Engine(materialize(preset, 0), specs)
    engine.prefill(SEED_IDS)
    path = engine.dump(tmp / "dump.safetensors", SEED_IDS)
    cand = R.load(path)[0]
    result = compare(cand, [ref], Tolerances(), lm.config.as_dict(), len(SEED_IDS))
    localize(result, cand, [ref], lm, Tolerances(), len(SEED_IDS))
    fd = result["first_divergence"]
    first = f"{fd['tap']} ({fmt(fd['error']['ratio'])}×)" if fd else "—"
    loc = result["localized"]
    loc_text = f"{loc['stage']} ({fmt(loc['local_ratio'])}×)" if loc else "— (" + result["replay"].get(
        "note", "match").split(":")[0] + ")"
    diag = ", ".join(f"`{d['transform']}`" for d in result["diagnosis"]) or "—"
    return f"| `{' + '.join(specs) or 'clean'}` ({preset}) | {first} | {loc_text} | {diag} |"


def decode_row(fault: str, tmp: Path) -> str:
    lm = sources.load("synthetic:tiny", "float32")
    engine = Engine(materialize("tiny", 0), [fault])
    taps = engine.prefill(SEED_IDS)
    ids = list(SEED_IDS)
    out = tmp / fault
    out.mkdir()
    # the prefill's dump too: its K/V rows are the cache the decode steps' attention is replayed from
    engine.dump(out / "prefill.safetensors", ids, position=0)
    for k in range(3):
        ids.append(int(np.argmax(taps["logits"][-1])))
        taps = engine.step(ids[-1])
        engine.dump(out / f"step{k}.safetensors", ids, position=len(ids) - 1)
    result = compare_steps(load_steps([str(out)]), lm, None, Tolerances())
    f = result["first_divergence"]
    loc = result["localized"]
    diag = ", ".join(f"`{d['transform']}`" for d in f["diagnosis"]) or (loc or {}).get("keys") or \
        (f["note"].split(":")[0] if f["note"] else "—")
    loc_text = f"position {loc['position']}, {loc['stage']}" if loc else "—"
    return f"| `{fault}` (tiny, prefill + 3 steps) | position {f['position']}, {f['tap']} | {loc_text} | {diag} |"


def main() -> None:
    eps = {n: math.sqrt(0.5 * tolerance_for("layers.0.attn_norm", "nmse", "float32", "float32", n)) for n in (2, 4)}
    print("| fault | first stage over tolerance | localized (local error / tolerance) | diagnosis |")
    print("| --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        print(prefill_row("tiny", [], tmp))
        for name, (kind, stage, _) in FAULTS.items():
            # bias faults need a model with biases (tests/test_feature_hints.py); window faults a window (below)
            if kind in ("decode", "bias", "window"):
                continue
            spec = {"drift": f"drift:{eps[2]:.3g}", "rope_offset": "rope_offset:2@1",
                    "mask_offset": "mask_offset:-2@1"}.get(name, name if stage == "embed" else f"{name}@1")
            print(prefill_row("tiny", [spec], tmp))
        print(prefill_row("small", [f"drift:{eps[4]:.3g}", "wrong_scale@2"], tmp))
        for name, (kind, _, _) in FAULTS.items():
            if kind == "window":  # Mistral's sliding window of 8, shorter than the 38 ids
                print(prefill_row("mistral-tiny", [f"{name}@1"], tmp))
        for name, (kind, _, _) in FAULTS.items():
            if kind == "decode":
                print(decode_row(name, tmp))


if __name__ == "__main__":
    main()

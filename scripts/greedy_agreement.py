"""Where ours and mlx-lm's greedy decodes part, and why: both run the same weights (bench's engines);
at the first step whose ids differ, each engine's two best logits, the reference's margin between
them, and how far the two engines' logits are apart at that step. A margin below that distance is a
near tie that the engines' different rounding orders decide differently: no fault of either.

    python scripts/greedy_agreement.py --model synthetic:tiny --dtype float16 --tokens 64

(The bench's "greedy ids equal" column counts the positions where the ids agree, which after one
flip measures nothing: this finds the flip and says what decided it.)"""

from __future__ import annotations

import argparse
import json

import mlx.core as mx
import numpy as np

from mlx_tinyllama import fast, sources
from mlx_tinyllama.bench.engines import mlx_lm_model
from mlx_tinyllama.vectors.inputs import SEED_IDS


def decode_logits(model, make_cache, ids: list[int], n: int, forced: list[int] | None = None):
    """Greedy ids and the last-position logits of each step; with `forced`, feed those ids instead
    (so both engines see the same context up to the step compared)."""
    step, cache = fast.model_step(model), make_cache()
    logits = fast.prefill(step, mx.array([ids]), cache)[0, -1]
    out_ids, out_logits = [], []
    for k in range(n):
        tok = int(mx.argmax(logits).item())
        out_ids.append(tok)
        out_logits.append(np.array(logits.astype(mx.float32)))
        feed = forced[k] if forced is not None else tok
        logits = step(mx.array([[feed]]), cache)[0, -1]
        mx.eval(logits)
    return out_ids, out_logits


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="synthetic:tiny")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args(argv)
    lm = sources.load(args.model, args.dtype)
    theirs_model = mlx_lm_model(lm)
    from mlx_lm.models.cache import make_prompt_cache

    ids = [i % lm.config.vocab_size for i in SEED_IDS]  # the seed's 38 ids, within this vocabulary
    ours, ours_logits = decode_logits(lm.model, lm.model.make_cache, ids, args.tokens)
    # mlx-lm fed our ids: its own choice at every step, on the same context
    theirs, theirs_logits = decode_logits(theirs_model, lambda: make_prompt_cache(theirs_model), ids,
                                          args.tokens, forced=ours)
    differ = [k for k in range(args.tokens) if ours[k] != theirs[k]]
    window = lm.config.window
    if window and len(ids) + args.tokens > window:  # mlx-lm's Llama (Mistral's) windows no layer here
        print(f"note: the window ({window} keys) is shorter than the {len(ids)} + {args.tokens} positions: "
              "mlx-lm's Llama class, which runs Mistral, attends to every key (its config has no layer_types), "
              "so past the window it computes another function")
    report = {"model": args.model, "dtype": args.dtype, "steps": args.tokens, "steps_choosing_differently": len(differ)}
    if differ:
        k = differ[0]
        a, b = ours_logits[k], theirs_logits[k]
        top = np.argsort(-a)[:2]
        report.update(first_step=k, ours_top2={int(t): float(a[t]) for t in top},
                      mlx_lm_top2={int(t): float(b[t]) for t in np.argsort(-b)[:2]},
                      ours_margin=float(a[top[0]] - a[top[1]]),
                      engines_apart_max=float(np.max(np.abs(a - b))),
                      engines_apart_at_the_two=float(max(abs(a[t] - b[t]) for t in top)))
        # Rounding decides it when the engines' logits are a few units in the last place apart
        # (of the largest logit, in the dtype) and the margin is within that distance.
        ulp = float(np.spacing(np.abs(a).max().astype(np.dtype(args.dtype if args.dtype != "bfloat16" else "float32"))))
        report["ulp_of_the_largest_logit"] = ulp
        report["near_tie"] = (report["engines_apart_max"] <= 8 * ulp
                              and report["ours_margin"] <= 2 * report["engines_apart_at_the_two"])
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

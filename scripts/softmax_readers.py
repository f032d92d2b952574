"""The figures of docs/compare.md's "Stages that read the scores through exp()": the worst row of
attn.probs, attn.context and attn.out on every cached path against the fixed stage budget and
against the widened one (tolerances.py), for seed 7's drawn Llama (tests/test_family_random.py)
and for synthetic:tiny with layers 0-1's q_proj/k_proj x7 in float16.

    PYTHONPATH=.:tests python scripts/softmax_readers.py
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np

READERS = ("probs", "context", "out")


def worst_rows(lm, ids, dtype: str, chunks=(2,)) -> dict[str, tuple[float, float, float]]:
    """{reader stage: (worst row / fixed budget, worst row / widened budget, largest A)} over every path."""
    from mlx_tinyllama.paths import _numpy, compare_path, run_compiled, run_path, tap_tolerance
    from mlx_tinyllama.metrics import row_amplification, softmax_amplification
    from mlx_tinyllama.tolerances import Tolerances

    model, L = lm.model, lm.config.num_hidden_layers
    tol = tap_tolerance(Tolerances(), dtype, L)
    prefill = run_path(model, ids, None)
    runs = [run_path(model, ids, k) for k in (1, *chunks)] + [run_compiled(model, ids)]
    out = {s: (0.0, 0.0, 0.0) for s in READERS}
    for run in runs:
        rows = compare_path(run, prefill, tol, dtype).nmse_by_tap_position
        for layer in range(L):
            a = row_amplification(softmax_amplification(
                _numpy(prefill.steps[0].taps[f"layers.{layer}.attn.scores_masked"]), 1, dtype))
            for s in READERS:
                tap = f"layers.{layer}.attn.{s}"
                e = np.array(rows[tap])
                fixed = float(np.nanmax(e)) / tol(tap)
                widened = max(float(e[i]) / tol(tap, float(a[i])) for i in range(len(e)))
                old = out[s]
                out[s] = (max(old[0], fixed), max(old[1], widened), max(old[2], float(a.max())))
    return out


def seed7():
    os.environ.setdefault("MLX_TINYLLAMA_FAMILY_SEED", "7")
    import test_family_random as fr

    from mlx_tinyllama import sources

    seed, cls, j = 7021, "LlamaForCausalLM", 7
    kw, T = fr.draw_config(seed, cls, j)
    out = Path(tempfile.mkdtemp()) / "seed7"
    fr.make_model(seed, cls, j, out)
    ids = random.Random(seed).choices(range(kw["vocab_size"]), k=T)
    return sources.load(str(out), "float32"), ids, (2, T - 2)


def scaled_tiny(factor: float = 7.0):
    from safetensors.numpy import load_file, save_file

    from mlx_tinyllama import sources
    from mlx_tinyllama.synthetic import materialize
    from conftest import SEED_IDS

    out = Path(tempfile.mkdtemp()) / "tiny-qk7"
    shutil.copytree(materialize("tiny", 0), out)
    w = load_file(str(out / "model.safetensors"))
    for layer in (0, 1):
        for proj in ("q_proj", "k_proj"):
            k = f"model.layers.{layer}.self_attn.{proj}.weight"
            w[k] = (w[k].astype(np.float32) * np.float32(factor)).astype(w[k].dtype)
    save_file(w, str(out / "model.safetensors"), metadata={"format": "pt"})
    return sources.load(str(out), "float16"), list(SEED_IDS), (2,)


if __name__ == "__main__":  # a measurement tool: its output is in docs/compare.md
    for name, make, dtype in (("seed 7 Llama, float32", seed7, "float32"),
                              ("synthetic:tiny q/k x7, float16", scaled_tiny, "float16")):
        lm, ids, chunks = make()
        for stage, (fixed, widened, a) in worst_rows(lm, ids, dtype, chunks).items():
            print(f"{name}: attn.{stage:7s} worst row {fixed:.2f}x the fixed budget, {widened:.2f}x the widened "
                  f"(A up to {a:.1f})")

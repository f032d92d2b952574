"""fp16 stress models: synthetic presets whose weights are scaled so that one
chosen stage leaves the fp16 range, to check that an engine (or this package's
`stability` command) finds the exact stage and that the right precision policy
fixes it.

`synthetic` takes these presets into `synthetic.PRESETS` and
`synthetic.WEIGHT_TWEAKS`, so `--model synthetic:stress-mlp` works like any
other synthetic model (`python -m mlx_tinyllama.trace stability --model
synthetic:stress-scores`). Each preset has the `tiny` shape (hidden 64, 2 layers)
so that fp16 runs stay fast on a CPU, and breaks a stage of layer 1, so that the
first broken stage is not simply the first stage of the model.

| preset        | built to break            | breaks under              | fixed by                     |
|---------------|---------------------------|---------------------------|------------------------------|
| stress-mlp    | layers.1.mlp.prod (inf)   | hf, mixed, fp16-pure, transformers fp16 | bf16 or fp32 (no fp16 policy) |
| stress-scores | layers.1.attn.scores (inf)| hf, fp16-pure, transformers fp16 | mixed (scores in fp32)  |
| stress-norm   | layers.1.attn_norm (rows collapse to 0) | fp16-pure only | hf, mixed (RMSNorm statistics in fp32); transformers stays finite |

stress-norm does not produce NaN/Inf at its own stage on IEEE hardware: the
fp16 x² overflows to inf inside RMSNorm, rsqrt(inf) = 0, so the whole row becomes
0 and the logits end up all zero (the seed note's "all-zero logits" symptom).
The `stability` command reports it as a collapse (rows that are non-zero in fp32
and all zero in fp16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

LAYER = 1  # the layer every preset breaks (tiny has layers 0 and 1)
BASE_PRESET = "tiny"  # the synthetic preset whose shape every stress preset has


@dataclass(frozen=True)
class StressPreset:
    name: str
    breaks: str  # canonical tap built to fail first
    failure: str  # "nonfinite" (NaN/Inf appear there) or "collapse" (rows become all zero)
    broken_policies: tuple[str, ...]  # fp16 policies under which it fails
    fixed_by: str  # what keeps it finite
    what: str
    tweak: Callable[[str, np.ndarray], np.ndarray]


def _scaled(targets: tuple[str, ...], factor: float):
    """Multiply the named weights by `factor` (kept as fp16 values, as every synthetic weight)."""
    def tweak(name: str, w: np.ndarray) -> np.ndarray:
        if name in targets:
            return (w.astype(np.float32) * np.float32(factor)).astype(np.float16)
        return w
    return tweak


def _p(layer: int) -> str:
    return f"model.layers.{layer}."


# gate and up each × 256: |gate|, |up| stay ~1e3 (far below 65504) but their
# product reaches ~1e6, so SiLU(gate)×up overflows in fp16 (not in bf16 or fp32).
MLP_FACTOR = 256.0

# q_proj and k_proj each × 64: q, k ~1e2 but Q·Kᵀ ~ 8·64² ≈ 3e4 standard deviation,
# so many raw scores pass 65504 in fp16; in fp32 (the `mixed` policy) they are fine.
SCORES_FACTOR = 64.0

# Layer 0's MLP writes a "massive activation" into one residual channel, as trained
# Llamas do: K gate/up rows are made equal (so SiLU(g)·g = g²·σ(g) ≥ 0 for every token)
# and down_proj sums them into channel MASSIVE_CHANNEL with weight MASSIVE_WEIGHT.
# The channel then holds ~2e3 for every token: finite in fp16, but x² ~ 4e6 > 65504.
MASSIVE_CHANNEL = 7
MASSIVE_UNITS = 32
MASSIVE_WEIGHT = 128.0


def _massive_rows(hidden: int) -> np.ndarray:
    """The shared gate/up rows (fixed, independent of the seed): unit-variance outputs on O(1) inputs."""
    rng = np.random.default_rng(20240229)
    return (rng.standard_normal((MASSIVE_UNITS, hidden), dtype=np.float32) / np.sqrt(hidden)).astype(np.float16)


def _massive_activation(name: str, w: np.ndarray) -> np.ndarray:
    p = _p(0) + "mlp."
    if name in (p + "gate_proj.weight", p + "up_proj.weight"):
        w = w.copy()
        w[:MASSIVE_UNITS] = _massive_rows(w.shape[1])
    elif name == p + "down_proj.weight":
        w = w.copy()
        w[MASSIVE_CHANNEL, :MASSIVE_UNITS] = np.float16(MASSIVE_WEIGHT)
    return w


STRESS_PRESETS: dict[str, StressPreset] = {
    p.name: p for p in (
        StressPreset(
            "stress-mlp", f"layers.{LAYER}.mlp.prod", "nonfinite", ("hf", "mixed", "fp16-pure"),
            "bfloat16 or float32 activations: no fp16 policy keeps the MLP product in fp32",
            f"layer {LAYER}'s gate_proj and up_proj × {MLP_FACTOR:g}: SiLU(gate)×up exceeds 65504",
            _scaled((_p(LAYER) + "mlp.gate_proj.weight", _p(LAYER) + "mlp.up_proj.weight"), MLP_FACTOR),
        ),
        StressPreset(
            "stress-scores", f"layers.{LAYER}.attn.scores", "nonfinite", ("hf", "fp16-pure"),
            "policy 'mixed' (Q·Kᵀ, scale and mask in fp32)",
            f"layer {LAYER}'s q_proj and k_proj × {SCORES_FACTOR:g}: Q·Kᵀ exceeds 65504 before the 1/sqrt(d) scale",
            _scaled((_p(LAYER) + "self_attn.q_proj.weight", _p(LAYER) + "self_attn.k_proj.weight"), SCORES_FACTOR),
        ),
        StressPreset(
            "stress-norm", f"layers.{LAYER}.attn_norm", "collapse", ("fp16-pure",),
            "policies 'hf' and 'mixed' (RMSNorm statistics in fp32, as transformers)",
            f"layer 0's MLP writes ~2e3 into residual channel {MASSIVE_CHANNEL} (a massive activation): "
            f"x² overflows in an fp16 RMSNorm, rsqrt(inf) = 0 and the rows collapse to zero",
            _massive_activation,
        ),
    )
}


"""THE one place where comparison tolerances are derived, documented and overridden.

Every comparison in this package (compare, paths, stability, gguf checks) asks
this module "how far apart may these two numbers be?". The answer comes from
the dtypes of both sides, the metric, and how deep in the network the stage is.

Model (docs/compare.md has the measurements behind each constant):

    nmse  <=  SAFETY * (C_ROUND * u_eff**2 + C_ACC * u_fp32**2) * max(1, depth)**GROWTH_EXPONENT

- u_eff = max(unit roundoff of side a, of side b): the coarser side dominates
  (an fp32 run against an fp16 reference is as far from it as fp16 is from exact;
  measured: ours fp32 vs transformers fp16 == transformers fp16 vs transformers fp32).
- C_ROUND: squared ulps of the coarser dtype that a stage of layer 0 is off by
  (measured max 20, bf16 vs fp32; 9 for fp16 vs fp16; 14 for fp16 vs fp32).
- C_ACC: fp32 accumulation-order noise that both sides carry whatever their
  storage dtype (reductions in different orders; measured max 620 squared fp32 ulps).
- depth: 0 = embedding, i+1 = layer i, L+1 = final norm and logits. Errors injected
  in each layer feed every later one; measured NMSE grows like depth**1.5 (the
  attention probabilities of the last layer are the worst stage: 9x layer 0's after
  4 layers, 15x after 6; 4**1.5 = 8, 6**1.5 = 14.7).
- SAFETY: headroom over the worst value measured on synthetic models. Faults
  (softmax axis, RoPE, mask off by one, GQA mapping, ...) give NMSE >= 1e-2 at the
  faulty stage, far above every tolerance of layer 0 (fp16: 5e-5).

Element-wise metrics on a few values (the seed's "row 0, columns 0:3"), sums and
logits use the square root of the same budget, because their error is an
amplitude, not a power:

    rel_rms = max|a-b| / rms(b)      <=  6 * sqrt(nmse tolerance)   (a max over few elements: 6 sigma)
    logit_err = max|a-b| / rms(row)  <=  6 * sqrt(nmse tolerance)
    sum_rel = |sum a - sum b| / sum|b|  <=  2 * sqrt(nmse tolerance) (|sum e| <= sum|e| ~ 1.25 rms(e)/rms(b) * sum|b|)
    sum_err = |sum a - sum b| / (sqrt(n) rms(b))  <=  6 * sqrt(nmse tolerance)   (a sum of n values in a known order)

sum_rel bounds a sum whose accumulation is unknown (a stats dump's): its own rounding may grow
with sum|x|. A sum added up in a known order (llama.cpp's printed `sum = `, a float32 running sum
in memory order, which the reference repeats in the same order) is judged by sum_err instead:
the per-value errors the nmse tolerance allows (rms(e) <= sqrt(nmse) rms(b)) are roundings that
fall either way, so n of them add up like a random walk, |sum e| ~ sqrt(n) rms(e), not n rms(e);
6 sigma as for rel_rms. The two running sums' own roundings and the printed digits are added on
top in absolute terms (compare.py). Against sum_rel this is sqrt(n) * mean|b|/rms(b) * 2/6 times
tighter: ~25x for 10^4 values, which is what lets a sum see a fault in the values a log does not
print (a 0.75 % move of kqv_out's sum under GQA broadcast passed sum_rel at 0.96).

Another engine's precision, emulated (emulation.py): the reference makes the engine's
roundings (fp16 matmul inputs and KV cache, q8_0 activation blocks, an fp16 flash-attention
accumulator) at the same places. What is left are the roundings that fall the other way
because the inputs differ in their last bits: a small fraction of the rounding's power,

    nmse  <=  SAFETY * (C_EMULATED * u_class**2 + C_ACC * u_fp32**2) * max(1, depth)**GROWTH_EXPONENT

with the classes "float16-emulated" (u = 2^-11) and "q8_0-emulated" (u = 2^-8: half a step of
q8_0's 127 levels relative to its block's largest value, the class of a q8_0 rounding that is
not emulated, "q8_0"). C_EMULATED is measured on the llama.cpp fixtures
(tests/fixtures/llamacpp, docs/llamacpp.md).

Overrides: `Tolerances.from_overrides(["nmse=1e-6", "layers.0.attn.probs:nmse=1e-4",
"*.mlp.*:rel_rms=0.01", "scale=10"])`. The metrics the tolerances bound are metrics.py's;
`python scripts/measure_tolerances.py` re-measures the constants (needs torch + transformers).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import numpy as np

from .dtypes import ALIASES, FP16_MAX, STORAGE_DTYPES, canonical
from .errors import UserError

# Unit roundoff u = 2^-(mantissa bits + 1): the largest relative error of one rounding.
UNIT_ROUNDOFF = {"float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8, "float64": 2.0 ** -53,
                 "q8_0": 2.0 ** -8}  # q8_0: round(x*127/amax) per block of 32: <= amax/254 ~ 2^-8 amax
EMULATED = {"float16-emulated": "float16", "q8_0-emulated": "q8_0"}  # emulated class -> the rounding it emulates

# Measured constants (`python scripts/measure_tolerances.py small medium`; table in docs/compare.md).
C_ROUND = 20.0
C_ACC = 620.0
C_EMULATED = 0.5  # what an emulated rounding leaves, in its u**2 (measured: 0.046 small, ~0.38 on the 22-layer shape)
GROWTH_EXPONENT = 1.5
SAFETY = 10.0
AMPLITUDE_FACTOR = {"rel_rms": 6.0, "logit_err": 6.0, "sum_rel": 2.0, "sum_err": 6.0}
# Printed values (llama.cpp's "%12.4f") are off by up to half their last digit by construction.
# Allowing exactly that left a correct engine at 0.93-0.99 of its tolerance wherever a value
# happened to round by almost the full half digit; twice the resolution keeps it near half.
PRINT_SAFETY = 2.0

# Metrics that are counts and must be exactly zero (ties at a top-k boundary excepted).
COUNT_METRICS = ("top1", "topk_missing", "mask_mismatch", "nonfinite")
AMPLITUDE_METRICS = ("rel_rms", "sum_rel", "sum_err", "logit_err")
METRICS = ("nmse",) + AMPLITUDE_METRICS + COUNT_METRICS

# Attention scores at or below this are "masked" (transformers adds finfo.min; fp16's is -65504).
MASKED_BELOW = -0.5 * FP16_MAX

# A score s of a row whose largest score is m gets softmax weight <= exp(s - m) (the row's sum is
# >= 1). Below half the dtype's smallest subnormal that weight rounds to zero: s masks exactly as
# well as -inf ("equal by effect"). ln(2^-25) = -17.3 in float16 (ONNX converters write -1e4),
# ln(2^-134) = -92.9 in bfloat16, ln(2^-150) = -104 in float32, ln(2^-1075) = -745 in float64.
ZERO_WEIGHT_BELOW = {"float16": -25 * math.log(2.0), "bfloat16": -134 * math.log(2.0),
                     "float32": -150 * math.log(2.0), "float64": -1075 * math.log(2.0)}


def dtype_key(dtype) -> str:
    """'float16' for 'fp16', np.float16, mx.float16, torch.float16, 'F16' (ggml), ..."""
    name = str(dtype).lower().replace("mlx.core.", "").replace("torch.", "").replace("<class 'numpy.", "")
    name = name.strip("'>")
    name = canonical(name)
    if name not in UNIT_ROUNDOFF and name not in EMULATED:
        raise UserError(f"unknown dtype {dtype!r} for tolerances; known: {', '.join(UNIT_ROUNDOFF)} "
                        f"(or {', '.join(ALIASES)})")
    return name


def unit_roundoff(dtype) -> float:
    key = dtype_key(dtype)
    return UNIT_ROUNDOFF[EMULATED.get(key, key)]


def depth_of(tap: str, n_layers: int) -> int:
    """0 for the embedding, i+1 for layer i's stages, n_layers+1 for the final norm and logits."""
    if tap.startswith("layers."):
        return int(tap.split(".")[1]) + 1
    if tap in ("embed",) or tap.startswith("embed"):
        return 0
    return n_layers + 1


def growth(tap: str, n_layers: int) -> float:
    return float(max(1, depth_of(tap, n_layers))) ** GROWTH_EXPONENT


def nmse_budget(dtype_a, dtype_b) -> float:
    """The NMSE tolerance of a depth-0 stage for these two dtypes, before overrides."""
    rounding = max(_rounding_power(dtype_a), _rounding_power(dtype_b))
    return SAFETY * (rounding + C_ACC * UNIT_ROUNDOFF["float32"] ** 2)


def _rounding_power(dtype) -> float:
    """C * u**2 of one side: a plain rounding, or the flips an emulated rounding leaves."""
    key = dtype_key(dtype)
    return (C_EMULATED if key in EMULATED else C_ROUND) * unit_roundoff(key) ** 2


def tolerance_for(tap: str, metric: str, dtype_a, dtype_b, n_layers: int) -> float:
    """The derived tolerance (no overrides) of `metric` at `tap` between dtypes a and b."""
    if metric not in METRICS:
        raise UserError(f"unknown metric {metric!r}; metrics: {', '.join(METRICS)}")
    if metric in COUNT_METRICS:
        return 0.0
    nmse = nmse_budget(dtype_a, dtype_b) * growth(tap, n_layers)
    if metric == "nmse":
        return nmse
    return AMPLITUDE_FACTOR[metric] * math.sqrt(nmse)


@dataclass
class Tolerances:
    """Derived tolerances plus user overrides (`[glob:]metric=value`, `scale=F`)."""

    overrides: list[tuple[str, str, float]] = field(default_factory=list)  # (tap glob, metric, value)
    scale: float = 1.0

    @classmethod
    def from_overrides(cls, items: list[str] | None, n_layers: int | None = None) -> "Tolerances":
        tol = cls()
        for raw in items or []:
            tol.add(raw)
        tol.check_patterns(n_layers)
        return tol

    def add(self, raw: str) -> None:
        text = raw.strip()
        if "=" not in text:
            raise UserError(f"--tol {raw!r}: expected [TAP_GLOB:]METRIC=VALUE or scale=FACTOR, "
                            f"e.g. nmse=1e-6 or layers.0.attn.probs:nmse=1e-4")
        key, value_text = text.rsplit("=", 1)
        try:
            value = float(value_text)
        except ValueError:
            raise UserError(f"--tol {raw!r}: {value_text!r} is not a number") from None
        if not value >= 0:
            raise UserError(f"--tol {raw!r}: a tolerance must be a number >= 0")
        pattern, _, metric = key.rpartition(":")
        if metric == "scale" and not pattern:
            self.scale = value
            return
        if metric not in METRICS:
            raise UserError(f"--tol {raw!r}: unknown metric {metric!r}; metrics: {', '.join(METRICS)}, scale")
        self.overrides.append((pattern or "*", metric, value))

    def check_patterns(self, n_layers: int | None = None) -> None:
        """Refuse an override whose tap glob matches no stage of an `n_layers` model (of any model when
        None): a typo would otherwise leave the derived tolerance in force without a word."""
        from .config import SIZE_RANGES
        from .taps import tap_names

        names = tap_names(n_layers or SIZE_RANGES["num_hidden_layers"][1])
        for pattern, metric, value in self.overrides:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                where = f"a {n_layers}-layer model" if n_layers else "any model"
                raise UserError(f"--tol {pattern}:{metric}={value:g}: the tap pattern {pattern!r} matches no stage of "
                                f"{where} (stages look like layers.0.attn.probs, *.mlp.out, logits)")

    def get(self, tap: str, metric: str, dtype_a, dtype_b, n_layers: int) -> float:
        for pattern, m, value in reversed(self.overrides):  # the last matching override wins
            if m == metric and fnmatch.fnmatchcase(tap, pattern):
                return value
        return tolerance_for(tap, metric, dtype_a, dtype_b, n_layers) * self.scale

    def overridden(self, tap: str, metric: str) -> bool:
        return any(m == metric and fnmatch.fnmatchcase(tap, p) for p, m, _ in self.overrides)

    def amplified(self, tap: str, metric: str, amplification: float, dtype_a=None, dtype_b=None,
                  n_layers: int = 0) -> float:
        """get(), widened for a stage that reads the attention scores through exp() by what the scores'
        own tolerance becomes there (rule: "Stages that read the scores through exp()" below).
        `amplification` comes from the reference's scores (softmax_amplification); an override of
        this tap and metric is taken as given."""
        base = self.get(tap, metric, dtype_a, dtype_b, n_layers)
        source = scores_of(tap)
        if source is None or not amplification > 0 or metric in COUNT_METRICS or self.overridden(tap, metric):
            return base
        widened = min(self.get(source, "nmse", dtype_a, dtype_b, n_layers) * amplification / A_CALIBRATED,
                      WIDENED_NMSE_CAP)
        return max(base, widened if metric == "nmse" else AMPLITUDE_FACTOR[metric] * math.sqrt(widened))

    def pinned(self, basis: "Basis") -> "Pinned":
        """These tolerances with their dtypes fixed by `basis` (Pinned)."""
        base = self.base if isinstance(self, Pinned) else self
        return Pinned(list(base.overrides), base.scale, basis=basis, base=base)

    def describe(self) -> dict:
        return {"model": "nmse <= SAFETY*(C_ROUND*u_eff^2 + C_ACC*u_fp32^2)*max(1,depth)^GROWTH_EXPONENT "
                         "(C_EMULATED for an emulated engine precision); "
                         "rel_rms/logit_err/sum_rel/sum_err <= AMPLITUDE_FACTOR*sqrt(nmse tolerance); counts must be 0",
                "C_ROUND": C_ROUND, "C_ACC": C_ACC, "C_EMULATED": C_EMULATED, "GROWTH_EXPONENT": GROWTH_EXPONENT, "SAFETY": SAFETY,
                "AMPLITUDE_FACTOR": AMPLITUDE_FACTOR, "scale": self.scale,
                "softmax_readers": "attn.probs/attn.context/attn.out: nmse <= max(the above, min(scores' nmse "
                                   "tolerance * A / A_CALIBRATED, WIDENED_NMSE_CAP)), A = mean(s^2) * "
                                   "sum p^2 (1 - 2p + sum p^2) / sum p^2 from the reference's scores",
                "A_CALIBRATED": A_CALIBRATED, "WIDENED_NMSE_CAP": WIDENED_NMSE_CAP,
                "overrides": [f"{p}:{m}={v}" for p, m, v in self.overrides]}


@dataclass
class Pinned(Tolerances):
    """Tolerances whose dtypes are fixed by a `Basis`: every caller (the verdict, the replay, decode
    steps) gets the same tolerance for a tap whatever dtypes it passes, so a stage cannot be within
    tolerance for the verdict and over it for the replay. `base` keeps the free form (diagnosis
    judges a transform at the dtype the transform implies)."""

    basis: "Basis | None" = None
    base: Tolerances | None = None

    def get(self, tap: str, metric: str, dtype_a=None, dtype_b=None, n_layers: int = 0) -> float:
        return self.base.get(tap, metric, self.basis.dtype_of(tap), self.basis.reference_dtype, n_layers)


# ---------------------------------------------------------------------------
# Stages that read the scores through exp()
#
# The stage rule above gives the probabilities the same budget as the scores of their layer.
# That holds while the scores are small; a correct engine's scores carry an ABSOLUTE error that
# grows with their own size (q.k in float32 or float16 is off by ~u |q||k|, and whatever q and k
# inherit is relative too), and exp() turns an absolute error into a relative one. First order,
# for one softmax row p = softmax(s):
#
#     dp_i = p_i (ds_i - sum_j p_j ds_j)
#
# Take the scores' errors independent, mean zero, of one variance tau**2 over the row's keys
# (the same spread over keys that the scores' NMSE measures). Then
#
#     E (ds_i - sum_j p_j ds_j)**2 = tau**2 (1 - 2 p_i + P2),   P2 = sum_j p_j**2
#     NMSE(p) = sum_i dp_i**2 / sum_i p_i**2 = tau**2 * F,        F = sum_i p_i**2 (1 - 2 p_i + P2) / P2
#
# F <= 1 + P2 <= 2: 1 for a flat row, 0 for a row that puts all its weight on one key (p = 1
# cannot move). The scores' tolerance bounds their NMSE, sum ds**2 / sum s**2 <= tol_s, i.e.
# tau**2 <= tol_s * mean(s**2) over the keys the scores' NMSE compares (not masked). So
#
#     NMSE(p) <= tol_s * A,   A = mean(s**2) * F
#
# The stage rule's constants were fitted to the worst stage of synthetic:small and :medium, their
# last layers' probabilities (docs/compare.md), at A <= A_CALIBRATED (the largest A of their
# layers, `python scripts/measure_tolerances.py --amplification small medium`: 1.71-2.32): the
# fixed budget already holds the scores' error carried through a softmax of that amplification.
# What it does not hold is the part beyond it, so the readers get
#
#     nmse <= max(their stage budget, min(tol_s * A / A_CALIBRATED, WIDENED_NMSE_CAP))
#
# over the heads of a token row (paths compares rows) or the whole tensor (compare: the means
# and sums run over every row). attn.context = p.V is an average of V rows with the weights p,
# and attn.out = o_proj(context) a fixed linear map of it: both carry p's relative error
# (measured: 1.50x and 1.63x of their fixed budget where probs was 1.42x; the residual add
# after attn.out is dominated by the residual). All three take the rule above, which changes
# nothing where A <= A_CALIBRATED (synthetic:tiny, small and medium on the seed prompt: A
# 1.58-2.32, scores up to 16). A comes from the
# REFERENCE's scores, never the candidate's: a fault cannot widen its own tolerance, and since
# the widened budget is the scores' tolerance carried through the softmax, a fault that shows in
# the scores (scores in float16 inside a float32 engine) stays over it at the probabilities.
# Measured (docs/family.md: seed 7's 3-layer Llama, scores up to +-68, rms 15-20, `paths`):
# A = 0-36 per row; the probabilities' row NMSE is 2-29x the scores' (up to 4x the spread-evenly
# model: the error is not even over heads), and the scores sit at <= 0.10 of their own
# tolerance, so the widened budget (up to 15.6x the fixed one there) holds every row with room:
# probs/context/out at <= 0.41/0.44/0.47 of it, where the fixed one had them at 1.42/1.50/1.63x
# (`PYTHONPATH=.:tests python scripts/softmax_readers.py`).
#
# The widening stops at WIDENED_NMSE_CAP, a tenth of the NMSE every injected fault gives at its
# stage (>= 1e-2, module docstring): scores of +-450 in float16 may be off by ~5 units within
# their own tolerance, which leaves a softmax nothing to be judged by (A up to 3089 per row on
# synthetic:tiny with q/k x7); a stage the scores cannot vouch for keeps a bound that still sees a
# fault, at the price of a possible false alarm (never a silent pass). It never lowers a budget.


def _softmax_readers() -> tuple[tuple[str, ...], str]:
    """(the layer stages that carry the softmax's relative error: the softmax and what reads it
    within its block (probs·V, o_proj), the scores stage the softmax reads), from the stage table:
    the residual add after them is another kind of stage, where the residual absorbs it."""
    from .stages import LAYER_STAGES

    soft = next(s for s in LAYER_STAGES if s.op == "softmax")
    readers = [soft.name]
    for s in LAYER_STAGES:  # forward order: one pass follows the data flow
        if s.kind == soft.kind and s.name not in readers and any(i in readers for i in s.inputs):
            readers.append(s.name)
    return tuple(readers), soft.inputs[0]


SOFTMAX_READERS, _SOFTMAX_INPUT = _softmax_readers()
A_CALIBRATED = 2.32  # the largest A of the models the stage rule's constants were measured on (above)
WIDENED_NMSE_CAP = 1e-3


def scores_of(tap: str) -> str | None:
    """The scores tap a softmax-reading stage reads through exp() (None for every other stage)."""
    from .stages import split_name

    layer, stage = split_name(tap)
    if layer is not None and stage in SOFTMAX_READERS:
        return f"layers.{layer}.{_SOFTMAX_INPUT}"
    return None


# ---------------------------------------------------------------------------
# Which precision the candidate is judged at

REFERENCE_DTYPES = ("float16", "bfloat16", "float32")  # what this package's model computes in


def coarsest(dtypes) -> str | None:
    """The dtype of largest unit roundoff (the widest tolerance) among `dtypes`."""
    dtypes = [d for d in dtypes if d]
    return max(dtypes, key=unit_roundoff) if dtypes else None


@dataclass
class Basis:
    """The dtype each of the candidate's tensors is judged at, the dtype the reference computes in,
    and why, in words (the result header prints it).

    Rule: --against-dtype, else the dtype the candidate declares (kit metadata, a stats JSON's
    `dtype`, step dumps' metadata), else the dtypes its tensors are stored in; a tensor stored
    coarser than declared is judged at its storage dtype (it cannot be finer than its bytes). With
    mixed storage, each tensor is judged at the coarsest dtype of itself and every tensor before it
    in forward order: rounding errors flow downstream, so float32 logits after float16 layers
    carry float16 errors, while float32 layers before a float16 tensor keep float32 tolerances.
    Nothing declared and nothing stored (a stats JSON without `dtype`): float32, the strictest, said
    so. The reference computes in the candidate's dtype when that is one dtype, else in float32."""

    dtype: str  # the headline: the coarsest dtype any tensor is judged at
    reason: str
    per_tap: dict = field(default_factory=dict)  # tap -> dtype, where it differs from `dtype`
    reference_dtype: str = "float32"
    source: str = "storage"  # against-dtype | declared | storage | default | reference

    def dtype_of(self, tap: str) -> str:
        return self.per_tap.get(tap, self.dtype)

    def as_dict(self) -> dict:
        return {"dtype": self.dtype, "reason": self.reason, "source": self.source,
                "reference_dtype": self.reference_dtype, "per_tap": dict(self.per_tap)}

    def with_reference(self, reference_dtype: str, given: bool) -> "Basis":
        """The basis once the reference's dtype is known; a reference coarser than the candidate
        (--dtype float16 against a float32 dump) widens every tolerance: say so."""
        b = Basis(self.dtype, self.reason, dict(self.per_tap), reference_dtype, self.source)
        if unit_roundoff(reference_dtype) > unit_roundoff(self.dtype):
            b.reason += (f"; the reference computes in {reference_dtype}"
                         f"{' (--dtype)' if given else ''}, coarser: tolerances are {reference_dtype}'s")
            b.dtype = reference_dtype  # the tolerance's class is the coarser side's (nmse_budget)
            b.per_tap = {t: d for t, d in b.per_tap.items() if unit_roundoff(d) > unit_roundoff(reference_dtype)}
        return b


def candidate_basis(order: list[str], storage: dict[str, str] | None = None, declared: str | None = None,
                    forced: str | None = None, what: str = "the dump") -> Basis:
    """The Basis of a candidate whose tensors are `storage` {tap: dtype} (rule: Basis)."""
    storage = {t: dtype_key(STORAGE_DTYPES.get(d, d)) for t, d in (storage or {}).items() if d}
    if forced:
        d = dtype_key(forced)
        return Basis(d, f"--against-dtype {d}", {}, _reference_for({d}), "against-dtype")
    if declared:
        d = dtype_key(declared)
        coarser = {t: s for t, s in storage.items() if unit_roundoff(s) > unit_roundoff(d)}
        reason = f"{what} declares dtype {d}"
        if coarser:
            kinds = sorted(set(coarser.values()))
            reason += f"; {len(coarser)} tensor(s) stored in {', '.join(kinds)} are judged at that dtype"
        head = coarsest([d, *coarser.values()])
        per_tap = {t: s for t, s in coarser.items() if s != head}
        per_tap.update({t: d for t in storage if t not in coarser and d != head})
        return Basis(head, reason, per_tap, _reference_for({d, *coarser.values()}), "declared")
    if not storage:
        return Basis("float32", f"{what} does not say its dtype: judged as float32, the strictest (give "
                                "--against-dtype float16 or bfloat16 if it computed in half precision)",
                     {}, "float32", "default")
    kinds = set(storage.values())
    if len(kinds) == 1:
        d = kinds.pop()
        return Basis(d, f"{what}'s tensors are {d}", {}, _reference_for({d}), "storage")
    per_tap, running = {}, None
    for tap in [t for t in order if t in storage] + sorted(t for t in storage if t not in order):
        running = coarsest([running, storage[tap]])
        per_tap[tap] = running
    head = coarsest(per_tap.values())
    first = {d: next(t for t in per_tap if per_tap[t] == d) for d in sorted(set(per_tap.values()), key=unit_roundoff)}
    steps = ", ".join(f"{d} from {t}" for d, t in first.items())
    reason = (f"{what}'s tensors are of mixed dtypes ({', '.join(sorted(kinds))}): each is judged at the coarsest "
              f"dtype of itself and the tensors before it ({steps})")
    return Basis(head, reason, {t: d for t, d in per_tap.items() if d != head}, "float32", "storage")


def _reference_for(dtypes: set[str]) -> str:
    """The reference computes in the candidate's one dtype, or float32 (float64 or mixed)."""
    return next(iter(dtypes)) if len(dtypes) == 1 and next(iter(dtypes)) in REFERENCE_DTYPES else "float32"


# ---------------------------------------------------------------------------
# One kernel against its golden output (conformance vectors: mlx_tinyllama/vectors, docs/vectors.md)
#
# A vector feeds one op inputs that are exact in the case's dtype and compares its output with
# a float32 (matmul: float64) golden output of the same inputs. Nothing upstream adds error and
# nothing compounds over depth, so the budget is that of one op, tighter than a stage's above:
#
#     nmse  <=  KERNEL_SAFETY * (KERNEL_ROUND * u_dtype**2  +  n * u_fp32**2)  +  kappa**2 * u_dtype**2
#
# - u_dtype**2: the op's roundings to its dtype. One rounding gives NMSE <= u**2/3 (uniform
#   relative error); a correct op rounds its output and may round an intermediate (RMSNorm's
#   normalized row, SDPA's scores and probabilities, RoPE's cos/sin). KERNEL_ROUND = 1 covers
#   them: measured worst 1.02 u**2 (the scores in fp16: Q.K^T and the scale both rounded), 0.2-0.8
#   for the other ops, with the project's fused and explicit kernels (docs/vectors.md).
# - kappa**2 * u_dtype**2: an intermediate rounding amplified by the exp() after it. An engine
#   that rounds the scores to its dtype (transformers does, at fp16) turns their absolute error
#   (at most |s| u) into a relative error of the probabilities, so for SDPA kappa = the largest
#   |scaled score| of the case (from the golden scores); 0 for every other op. A bound, not an
#   estimate (errors of many keys average out): measured 0.19 kappa**2 u**2 at most (bf16,
#   explicit kernels), so it takes no safety factor.
# - n * u_fp32**2: float32 arithmetic in an order other than the golden's. The rounding errors
#   of a sum of n terms walk randomly: NMSE ~ n u**2 / 6. n = the reduction length (K for a
#   matmul, the row for RMSNorm, S for softmax and SDPA, head_dim for the scores); for RoPE,
#   n = (largest position + 1)**2: the float32 angle position * frequency carries an absolute
#   error ~ position * u_fp32.
# - KERNEL_SAFETY: headroom over the worst correct op (NMSE / tolerance <= 0.18 measured over
#   fp32/fp16/bf16, fused, explicit and an independent NumPy engine).
# The same sum accumulated in fp16 one product at a time has NMSE ~ n u_fp16**2 / 6 in theory,
# measured 24 u_fp16**2 at K = 256 and 65 at K = 688: past this budget (10 u**2) from K ~ 100
# on, and far past it at TinyLlama's K = 2048 and 5632.
KERNEL_ROUND = 1.0
KERNEL_SAFETY = 10.0


def kernel_nmse_budget(dtype, n: int = 1, kappa: float = 0.0) -> float:
    """NMSE tolerance of one op in `dtype` against its golden output (rule above)."""
    u = unit_roundoff(dtype)
    return KERNEL_SAFETY * (KERNEL_ROUND * u ** 2 + max(1, n) * UNIT_ROUNDOFF["float32"] ** 2) + (kappa * u) ** 2


def describe_kernel_rule() -> dict:
    return {"rule": "nmse <= KERNEL_SAFETY*(KERNEL_ROUND*u_dtype^2 + n*u_fp32^2) + kappa^2*u_dtype^2",
            "KERNEL_SAFETY": KERNEL_SAFETY, "KERNEL_ROUND": KERNEL_ROUND, "unit_roundoff": dict(UNIT_ROUNDOFF),
            "n": "reduction length (matmul K, RMSNorm row, softmax/SDPA S, scores head_dim); RoPE: "
                 "(largest position + 1)^2; 1 for elementwise ops",
            "kappa": "SDPA: largest |scaled score| of the case; 0 otherwise",
            "counts": "no non-finite value where the golden output is finite; no masked/unmasked mismatch"}

"""fp16/bf16 numerical stability: the same prompt at low precision under each
precision policy and at float32, side by side, stage by stage.

For every canonical tap (taps.py) and every low-precision run:
- absmax and its headroom against the fp16 maximum, in powers of two:
  log2(65504 / absmax) (0 = at the edge; negative = beyond it in fp32);
- underflow: values non-zero in fp32 that are zero or subnormal in the run;
- NaN / Inf counts (the causal mask's -inf above the diagonal is harmless and
  counted apart, as `masked_inf`);
- collapsed rows: token rows that are non-zero in fp32 but all exactly zero in
  the run (an fp16 RMSNorm whose x² overflowed gives 0, not NaN);
- drift from fp32: NMSE and max abs error (`metrics.metrics`).
Per run: the first stage in forward order with NaN/Inf (`first_nonfinite`), the
first collapsed stage, and `origin`: the first broken stage with the values that
fed it and a plain explanation. Per layer: absmax per stage kind (norm,
attention, mlp, residual).

Result dict (what `--json` writes and `report.stability_report` reads):
    {results.ResultHeader keys (dtype and policy: the low-precision runs, comma-separated),
     fp16_max, reference{dtype, policy, kernels, taps{name: {absmax, headroom}}, layers},
     runs{dtype: {policy: run}}, recommendation{dtype: text}}
    run = {dtype, policy, kernels, first_nonfinite, first_collapse, origin, finite,
           taps{name: {absmax, headroom, nan, inf, masked_inf, underflow, collapsed_rows, rows,
                       nmse, max_abs_err}},
           layers{absmax{kind: [per layer]}, headroom{kind: [...]}, nmse{kind: [...]}}}
"""

from __future__ import annotations

import gc
import math
import os

import mlx.core as mx
import numpy as np

from . import sources
from .dtypes import FP16_MAX
from .errors import UserError
from .results import PromptRecord, ResultHeader
from .stages import inputs_of, split_name, stage_of, tap_names
from .taps import Taps
from .metrics import metrics

LOW_DTYPES = ("float16", "bfloat16")
# Cheapest first: the policy a user's engine needs is the first one that stays sound.
POLICY_ORDER = ("fp16-pure", "hf", "mixed")
LAYER_KINDS = ("norm", "attention", "mlp", "residual")
SMALLEST_NORMAL = {"float16": float(np.finfo(np.float16).tiny), "bfloat16": 2.0 ** -126, "float32": 2.0 ** -126}
# Peak memory of a run ~ float32 weights (4 bytes/parameter) + the checkpoint copy read while
# loading (<= 2 bytes/parameter for fp16/bf16 files) + the recorded taps.
BYTES_PER_PARAMETER = 6


def headroom(absmax: float) -> float:
    """log2(65504 / absmax): how many doublings are left before fp16 overflows."""
    if not math.isfinite(absmax):
        return float("nan")
    return math.inf if absmax == 0 else math.log2(FP16_MAX / absmax)


# ---------------------------------------------------------------------------
# Validation and memory


def parse_list(text: str | None, option: str) -> list[str]:
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    if text is not None and not items:
        raise UserError(f"{option}: nothing given")
    return items


def check_policies(policies: list[str]) -> list[str]:
    for p in policies:
        sources.check_policy(p)
    return list(dict.fromkeys(policies))


def check_low_dtypes(dtypes: list[str]) -> list[str]:
    names = [sources.dtype_name(d) for d in dtypes]
    for d in names:
        if d not in LOW_DTYPES:
            raise UserError(f"stability compares a low-precision run against float32: choose "
                            f"{' or '.join(LOW_DTYPES)}, not {d}")
    return list(dict.fromkeys(names))


def physical_memory() -> int | None:
    """Bytes of memory the device can use (unified memory on Apple silicon), or None if unknown."""
    try:
        size = mx.device_info().get("memory_size")
        if size:
            return int(size)
    except Exception:  # backends differ in what device_info reports
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):  # no sysconf (Windows) or the name is unknown
        return None


def check_fits(cfg, available: int | None = None) -> None:
    need = cfg.num_parameters() * BYTES_PER_PARAMETER
    available = physical_memory() if available is None else available
    if available is not None and need > available:
        raise UserError(
            f"this model does not fit in memory at float32: {cfg.num_parameters() / 1e9:.2f}B parameters need "
            f"about {need / 2**30:.1f} GiB (4 bytes each in float32 plus the checkpoint copy read while loading), "
            f"this machine has {available / 2**30:.1f} GiB. The stability check needs the float32 run as its "
            "reference: use a machine with more memory or a smaller model (e.g. --model synthetic:small)"
        )


# ---------------------------------------------------------------------------
# Capturing and measuring


def capture(lm, ids: list[int]) -> dict[str, np.ndarray]:
    """Every canonical tap of one prefill, as float32 numpy arrays (batch dimension dropped)."""
    names = tap_names(lm.config.num_hidden_layers)
    taps = Taps(names, "full")
    lm.model(mx.array(ids), tap=taps)
    return {n: np.array(taps.tensors[n].astype(mx.float32)) for n in names}


def causal_positions(name: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """For masked scores [H, T, S]: True where query t may see key s (prefill: s <= S - T + t)."""
    if not stage_of(name).masked:
        return None
    T, S = shape[-2], shape[-1]
    return np.broadcast_to(np.tri(T, S, S - T, dtype=bool), shape)


def _rows(x: np.ndarray, name: str) -> np.ndarray:
    """The tap as rows: one per token (per head and token for head-major taps)."""
    if x.ndim == 1:
        return x[None]
    return x.reshape(-1, x.shape[-1]) if stage_of(name).token_axis == 1 else x.reshape(x.shape[0], -1)


def tap_metrics(name: str, low: np.ndarray, ref: np.ndarray, dtype: str) -> dict:
    """Magnitude, headroom, underflow, NaN/Inf, collapse and drift of one tap of a run vs float32."""
    causal = causal_positions(name, low.shape)
    valid = np.ones(low.shape, bool) if causal is None else causal
    finite = np.isfinite(low)
    masked_inf = 0 if causal is None else int((~causal & np.isneginf(low)).sum())
    harmful = valid | (~finite & ~np.isneginf(low))  # +inf or NaN under the mask still poisons softmax
    absmax = float(np.abs(low[valid & finite]).max(initial=0.0))
    tiny = SMALLEST_NORMAL[dtype]
    underflow = valid & finite & (ref != 0) & np.isfinite(ref) & (np.abs(low) < tiny)
    rows_low, rows_ref = _rows(low, name), _rows(ref, name)
    collapsed = (rows_low == 0).all(axis=1) & (rows_ref != 0).any(axis=1)
    drift = metrics(low, ref, known=valid)
    return {
        "absmax": absmax,
        "headroom": headroom(absmax),
        "nan": int((np.isnan(low) & harmful).sum()),
        "inf": int((np.isinf(low) & harmful).sum()),
        "masked_inf": masked_inf,
        "underflow": int(underflow.sum()),
        "collapsed_rows": int(collapsed.sum()),
        "rows": int(rows_low.shape[0]),
        "nmse": drift["nmse"],
        "max_abs_err": drift["max_abs"],
    }


def reference_metrics(name: str, ref: np.ndarray) -> dict:
    causal = causal_positions(name, ref.shape)
    values = ref if causal is None else ref[causal]
    absmax = float(np.abs(values[np.isfinite(values)]).max(initial=0.0))
    return {"absmax": absmax, "headroom": headroom(absmax)}


def layer_view(taps: dict[str, dict], n_layers: int) -> dict:
    """Per layer and stage kind: the largest absmax, the smallest headroom, the largest NMSE."""
    view = {"absmax": {k: [0.0] * n_layers for k in LAYER_KINDS},
            "headroom": {k: [math.inf] * n_layers for k in LAYER_KINDS}}
    with_drift = any("nmse" in t for t in taps.values())
    if with_drift:
        view["nmse"] = {k: [0.0] * n_layers for k in LAYER_KINDS}
    for name, t in taps.items():
        layer, _ = split_name(name)
        if layer is None:
            continue
        kind = stage_of(name).kind
        view["absmax"][kind][layer] = max(view["absmax"][kind][layer], t["absmax"])
        view["headroom"][kind][layer] = headroom(view["absmax"][kind][layer])
        if with_drift and t["nmse"] > view["nmse"][kind][layer]:  # NaN (nothing compared) is skipped
            view["nmse"][kind][layer] = t["nmse"]
    return view


# ---------------------------------------------------------------------------
# Where a failure comes from


def _g(x: float) -> str:
    return f"{x:.4g}"


def _finite_absmax(x: np.ndarray) -> float:
    return float(np.abs(x[np.isfinite(x)]).max(initial=0.0))


def _norm_explanation(x: np.ndarray, dtype: str, policy: str, collapsed: int, rows: int) -> str:
    a = _finite_absmax(x)
    sq_sum = float(np.max(np.sum(x.astype(np.float64) ** 2, axis=-1)))
    if policy == "fp16-pure" and a * a > FP16_MAX:
        why = (f"x² overflowed to inf in {dtype} (|x| up to {_g(a)}, so x² up to {_g(a * a)} > 65504), "
               "rsqrt(inf) = 0")
    elif policy == "fp16-pure" and sq_sum > FP16_MAX:
        why = (f"the sum of squares overflowed to inf in {dtype} (Σx² up to {_g(sq_sum)} > 65504), "
               "rsqrt(inf) = 0")
    else:
        why = f"the normalized values × weight left the {dtype} range (input |x| up to {_g(a)})"
    if collapsed:
        return (f"RMSNorm: {why}, so {collapsed} of {rows} rows became all zeros (0, not NaN: the next stages "
                "compute on zeros). Statistics in fp32 (policy hf, as transformers) avoid it")
    return f"RMSNorm: {why}, giving 0 × inf = NaN"


def _softmax_explanation(scores: np.ndarray, dtype: str) -> str:
    rows = scores.reshape(-1, scores.shape[-1])
    if np.isnan(rows).any():
        return "softmax input already held NaN"
    if np.isposinf(rows).any():
        n = int(np.isposinf(rows).any(axis=1).sum())
        return (f"softmax input held +inf in {n} rows (overflowed scores): exp(inf - inf) = NaN; "
                "transformers' softmax in fp32 does the same")
    if np.isneginf(rows).all(axis=1).any():
        return "softmax input -inf on a fully masked row: every exp is 0, 0/0 = NaN"
    return f"softmax in {dtype} overflowed (max-subtracted exponent sum exceeded the {dtype} range)"


def explain(name: str, kind: str, low: dict, ref: dict, run: dict, dtype: str, policy: str,
            n_layers: int, head_dim: int) -> dict:
    """The origin of a failure at `name`: the fed values and a plain explanation."""
    stage, op = split_name(name)[1], stage_of(name).op
    feeds = inputs_of(name, n_layers)
    fed = {f: {"absmax": _finite_absmax(low[f]), "nan": int(np.isnan(low[f]).sum()),
               "inf": int(np.isinf(low[f]).sum())} for f in feeds}
    ref_absmax = reference_metrics(name, ref[name])["absmax"]
    t = run["taps"][name]
    should_be = f"the float32 run reaches {_g(ref_absmax)} here"
    over = f"{_g(ref_absmax)} > 65504" if ref_absmax > FP16_MAX else f"{_g(ref_absmax)}"
    if op == "rms_norm":
        text = _norm_explanation(low[feeds[0]], dtype, policy, t["collapsed_rows"], t["rows"])
    elif op == "qk":
        q, k = feeds
        text = (f"Q·Kᵀ overflowed in {dtype}: the float32 scores reach {over} before the 1/sqrt({head_dim}) "
                f"scale (q_rope |q| up to {_g(fed[q]['absmax'])}, k_rope |k| up to {_g(fed[k]['absmax'])}); "
                "scores in fp32 (policy mixed) keep them finite")
    elif op == "softmax":
        text = _softmax_explanation(low[feeds[0]], dtype)
    elif op == "mul":
        act, up = feeds
        text = (f"MLP product overflowed: SiLU(gate)×up = {over} in float32, while |SiLU(gate)| ≤ "
                f"{_g(fed[act]['absmax'])} and |up| ≤ {_g(fed[up]['absmax'])} are finite in {dtype}")
    elif op == "add":
        a, b = feeds
        text = (f"residual add overflowed: x (|x| up to {_g(fed[a]['absmax'])}) + branch "
                f"(up to {_g(fed[b]['absmax'])}) = {over}")
    elif op == "embed":
        text = "the embedding table itself holds NaN/Inf: the checkpoint or its conversion is broken"
    elif kind == "collapse":
        text = f"{stage_of(name).what}: rows became all zeros while {should_be}"
    else:
        text = (f"{stage_of(name).what} overflowed in {dtype}: {should_be} (> 65504 means it cannot be "
                f"represented in fp16); its inputs were finite")
    if kind == "collapse" and np.all(low["logits"] == 0):
        text += "; downstream the logits are all zero (the seed note's all-zero logits)"
    return {"tap": name, "kind": kind, "stage": stage_of(name).what, "explanation": text, "inputs": fed,
            "reference_absmax": ref_absmax, "nan": t["nan"], "inf": t["inf"], "collapsed_rows": t["collapsed_rows"]}


# ---------------------------------------------------------------------------
# Runs


def analyze(low: dict[str, np.ndarray], ref: dict[str, np.ndarray], dtype: str, policy: str, kernels: str,
            cfg) -> dict:
    """Everything about one low-precision run against the float32 run."""
    n = cfg.num_hidden_layers
    names = tap_names(n)
    taps = {name: tap_metrics(name, low[name], ref[name], dtype) for name in names}
    first_nonfinite = next((m for m in names if taps[m]["nan"] or taps[m]["inf"]), None)
    first_collapse = next((m for m in names if taps[m]["collapsed_rows"]), None)
    run = {"dtype": dtype, "policy": policy, "kernels": kernels, "first_nonfinite": first_nonfinite,
           "first_collapse": first_collapse, "origin": None, "taps": taps, "layers": layer_view(taps, n)}
    broken = [(names.index(m), m, kind) for m, kind in ((first_nonfinite, "nonfinite"), (first_collapse, "collapse"))
              if m is not None]
    run["finite"] = first_nonfinite is None
    if broken:
        _, name, kind = min(broken)
        run["origin"] = explain(name, kind, low, ref, run, dtype, policy, n, cfg.head_dim)
    return run


def _free() -> None:
    gc.collect()
    clear = getattr(mx, "clear_cache", None)
    if clear is not None:
        clear()


def run_stability(spec: str, ids: list[int] | None, dtypes: list[str], policies: list[str],
                  kernels: str | None = None, allow_download: bool = False, prompt_for=None,
                  keep_model: bool = False):
    """Run `ids` at float32 and at each (dtype, policy); return (result dict, last low-precision model or None).

    `prompt_for(lm) -> Prompt` resolves the prompt once the float32 model is loaded (when ids is None).
    Kernels: explicit for every policy (each sub-operation is then on the data path); `kernels="fused"`
    runs the `hf` policy on MLX's fused kernels.
    """
    dtypes, policies = check_low_dtypes(dtypes), check_policies(policies)
    if kernels not in (None, "explicit", "fused"):
        raise UserError(f"unknown kernels {kernels!r}; choose fused or explicit")
    cfg = sources.read_config(spec)
    check_fits(cfg)
    ref_lm = sources.load(spec, "float32", "hf", "explicit", allow_download=allow_download)
    prompt = prompt_for(ref_lm) if ids is None else None
    ids = prompt.ids if prompt is not None else ids
    ref_lm.config.check_ids(ids)
    ref = capture(ref_lm, ids)
    header = ResultHeader.of_run("stability", ref_lm, prompt or PromptRecord(list(ids), source="token ids"),
                                 dtype=",".join(dtypes), policy=",".join(policies), kernels=kernels or "explicit")
    del ref_lm
    _free()
    n = cfg.num_hidden_layers
    ref_taps = {name: reference_metrics(name, ref[name]) for name in tap_names(n)}
    result = {**header.as_dict(), "fp16_max": FP16_MAX,
              "reference": {"dtype": "float32", "policy": "hf", "kernels": "explicit", "taps": ref_taps,
                            "layers": layer_view(ref_taps, n)},
              "runs": {}}
    lm = None
    for dtype in dtypes:
        lm = None
        _free()
        lm = sources.load(spec, dtype, "hf", "explicit", allow_download=allow_download)
        result["runs"][dtype] = {}
        for policy in policies:
            k = "fused" if (kernels == "fused" and policy == "hf") else "explicit"
            lm.model.ops = sources.make_ops(policy, k)
            result["runs"][dtype][policy] = analyze(capture(lm, ids), ref, dtype, policy, k, cfg)
    result["recommendation"] = {d: recommend(result["runs"][d], d) for d in dtypes}
    if lm is not None:
        lm.model.ops = sources.make_ops(policies[0], "fused" if kernels == "fused" and policies[0] == "hf"
                                        else "explicit")
    return result, prompt, (lm if keep_model else None)


def sound(run: dict) -> bool:
    return run["first_nonfinite"] is None and run["first_collapse"] is None


def recommend(runs: dict[str, dict], dtype: str) -> str:
    ordered = [p for p in POLICY_ORDER if p in runs]
    good = [p for p in ordered if sound(runs[p])]
    if not good:
        worst = runs[ordered[0]]["origin"]["tap"] if ordered else "?"
        return (f"no {dtype} policy tried here keeps this model finite (first failure at {worst}): "
                "run that stage in a wider type (bfloat16 or float32), or rescale the weights")
    p = good[0]
    low_headroom = min((t["headroom"], name) for name, t in runs[p]["taps"].items())
    broken = [q for q in ordered if not sound(runs[q])]
    why = f"; {', '.join(broken)} break" if broken else ""
    needs = (f"{dtype} stays finite even with every op in {dtype} (policy '{p}')" if p == "fp16-pure"
             else f"{dtype} needs at least policy '{p}'{why}")
    return f"{needs}; smallest fp16 headroom under '{p}': {low_headroom[0]:.2f} doublings at {low_headroom[1]}"


"""Explaining a divergence: what each stage computes and where to look when it is the
first to diverge, and the Q/K diagnosis (the values are right but their order along
head_dim is not: a GGUF's interleaved-pair layout left in place or undone twice)."""

from __future__ import annotations

import numpy as np

from .refs.side import SHORTCUT_LOGITS, SHORTCUT_NORM, SHORTCUT_TAPS
from .stages import LAYER_STAGES, inputs_of, split_name, stage_of
from .metrics import metrics


# What to look at when a shortcut tap is the first to diverge; a stage's own is in the registry.
SHORTCUT_HINTS = {
    SHORTCUT_NORM: "the final RMSNorm applied to layer 0's output",
    SHORTCUT_LOGITS: "the lm_head applied to norm(layer 0's output)",
}


def stage_key(tap: str) -> str:
    return split_name(tap)[1] if tap.startswith("layers.") else tap


def describe(tap: str) -> str:
    if tap in SHORTCUT_TAPS:
        return SHORTCUT_HINTS[tap]
    return stage_of(tap).what


def hint_of(tap: str) -> str:
    """Where to look when `tap` is the first stage to diverge."""
    if tap in SHORTCUT_TAPS:
        return SHORTCUT_HINTS[tap]
    return stage_of(tap).hint or stage_of(tap).what


# The Q/K projections: a GGUF permutes their rows, so their values can come in another order.
QK_STAGES = tuple(s.name for s in LAYER_STAGES if s.gguf_permuted and s.op == "heads")


def qk_permutation(candidate: np.ndarray, reference: np.ndarray, tol: float) -> dict | None:
    """When a diverging Q or K tap ([heads, T, D]) holds, for every (head, token), the
    reference's values in another order along head_dim, say so, and which of llama.cpp's
    per-head row permutations (gguf.permute_qk) or its inverse (gguf.unpermute_qk) puts
    the candidate back into the reference's layout. None when the values themselves differ."""
    from .gguf import permute_qk, unpermute_qk

    a, b = np.asarray(candidate, np.float64), np.asarray(reference, np.float64)
    if a.shape != b.shape or a.ndim != 3 or a.shape[-1] % 2 or not np.isfinite(a).all():
        return None
    sorted_nmse = metrics(np.sort(a, axis=-1), np.sort(b, axis=-1))["nmse"]
    if not sorted_nmse <= tol:
        return None
    heads, tokens, head_dim = a.shape
    rows = a.transpose(0, 2, 1).reshape(heads * head_dim, tokens)  # weight-row order: head-major, then head_dim

    def fixed_by(fn) -> float:
        back = fn(rows, heads).reshape(heads, head_dim, tokens).transpose(0, 2, 1)
        return metrics(back, b)["nmse"]

    fixes = {"gguf.unpermute_qk": fixed_by(unpermute_qk), "gguf.permute_qk": fixed_by(permute_qk)}
    fix = next((name for name, err in fixes.items() if err <= tol), None)
    return {"sorted_nmse": sorted_nmse, "fixed_by": fix, "nmse_after_fix": fixes}


def qk_hint(tap: str, perm: dict) -> str:
    which = "Q" if stage_of(tap).dims[0] == "head" else "K"
    seen = ("each printed value is the reference's at the position the permutation below moves it to (a log "
            "prints the first and last 3 rows and columns only)" if perm.get("from_printed_values") else
            "every (head, token) row holds the reference's values in another order along head_dim (sorted, they agree)")
    text = (f"the {which} rows are permuted within heads: {seen}, so the weights are right but their row layout "
            "is not: a GGUF's llama.cpp interleaved-pair Q/K layout was not undone (or undone twice). RoPE, the "
            "scores and everything after them diverge from here")
    if perm.get("fixed_by") == "gguf.unpermute_qk":
        text += ("; llama.cpp's inverse permutation (gguf.unpermute_qk, per head) turns these rows into the "
                 "reference's: the interleaved layout is still in place (not undone, or the file was permuted twice)")
    elif perm.get("fixed_by") == "gguf.permute_qk":
        text += ("; llama.cpp's permutation (gguf.permute_qk, per head) turns these rows into the reference's: "
                 "they were un-permuted once too often (a file that was never permuted, un-permuted on load)")
    return text


def _runs(values) -> str:
    """[1, 8, 8, 8] -> "pair 0: 1, pairs 1-3: 8" (equal neighbours merged)."""
    groups: list[list] = []
    for i, v in enumerate(values):
        if groups and float(v) == groups[-1][2]:
            groups[-1][1] = i
        else:
            groups.append([i, i, float(v)])
    parts = [f"pair {a}: {v:.4g}" if a == b else f"pairs {a}-{b}: {v:.4g}" for a, b, v in groups[:6]]
    return ", ".join(parts) + (", ..." if len(groups) > 6 else "")


def _rope_divisors(cfg: dict) -> list[float]:
    """The per-frequency divisors this model's RoPE applies: a GGUF's rope_freqs as read, or those
    llama3 scaling computes from rope_scaling (as llama.cpp's converter writes them)."""
    if cfg.get("rope_freq_factors"):
        return [float(f) for f in cfg["rope_freq_factors"]]
    from types import SimpleNamespace

    from .gguf_write import llama3_rope_factors

    heads = cfg["num_attention_heads"]
    return [float(f) for f in llama3_rope_factors(SimpleNamespace(
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, rope_theta=cfg["rope_theta"],
        rope_factor=cfg["rope_factor"], rope_low_freq_factor=cfg["rope_low_freq_factor"],
        rope_high_freq_factor=cfg["rope_high_freq_factor"],
        rope_original_max_position=cfg["rope_original_max_position"]))]


# Error shapes (errorshape.Pattern names) that a fault in each model feature makes: an offset the same
# for every token (a bias), position 0 right and later ones wrong (RoPE's frequencies), rows wrong from
# a position on or a mask bound at a distance back (a window). With that shape, or none, the feature leads the hint; after another
# shape (a reordering, some heads, zero rows) it comes after the stage's own hint.
FEATURE_SHAPES = {"bias": ("offset",), "rope_scaling": ("all_rows_but_first",),
                  "sliding_window": ("rows_wrong_from", "all_rows_but_first", "mask_window_missing", "mask_window_off")}


def feature_leads(tap: str, shape: str | None) -> bool:
    """Does the error's shape (None: no shape found) fit a fault of the feature `tap`'s stage applies?"""
    feature = stage_of(tap).feature if tap not in SHORTCUT_TAPS else ""
    kind = "bias" if feature.endswith("_proj.bias") else feature
    return shape is None or shape in FEATURE_SHAPES.get(kind, ())


def feature_hint(tap: str, cfg: dict | None, matched: set[str] | None = None) -> str | None:
    """What this model adds to `tap`'s stage beyond Llama 2's math, from the stage table (which
    feature the stage applies) and the model's config and architecture (whether it has it): the
    first thing to check when that stage diverges. None when the model has no such feature.
    `matched`: the stages compared before `tap` (all matched), the evidence of which side has it."""
    if not cfg or tap in SHORTCUT_TAPS:
        return None
    from .architectures import ARCHITECTURES, DEFAULT

    feature = stage_of(tap).feature
    arch = ARCHITECTURES.get(cfg.get("architecture") or "", DEFAULT)
    if feature.endswith("_proj.bias"):
        proj = feature.split(".")[0]
        if proj != "o_proj" and arch.qkv_bias:
            why = f"{arch.hf_class} projects q, k and v with biases"
        elif cfg.get("attention_bias"):
            why = "config.json's attention_bias is true"
        else:
            return None
        return (f"this model's {proj} adds a bias ({why}): check that {proj}'s own bias is added once after the "
                f"matmul, one value per output column and the same for every token (not dropped, not another "
                f"projection's bias, not broadcast along the token axis)")
    if feature == "rope_scaling":
        rope_type = cfg.get("rope_type") or "default"
        if cfg.get("rope_freq_factors") or rope_type == "llama3":
            source = ("the GGUF's rope_freqs tensor" if cfg.get("rope_freq_factors") else
                      f"rope_scaling llama3: factor {cfg['rope_factor']:g}, low_freq_factor "
                      f"{cfg['rope_low_freq_factor']:g}, high_freq_factor {cfg['rope_high_freq_factor']:g}, original "
                      f"context {cfg['rope_original_max_position']}; llama.cpp stores them as the GGUF's rope_freqs")
            text = (f"this model's RoPE divides each frequency by its own factor ({source}; here "
                    f"{_runs(_rope_divisors(cfg))}): check that frequency pair i is theta^(-2i/head_dim) divided "
                    "(not multiplied) by factor i (not a neighbour's), and that both Q's and K's rotation get the "
                    "factors (the RoPE op's freq_factors operand in llama.cpp)")
            q_rope = tap.rsplit(".", 1)[0] + ".q_rope"
            if tap.endswith("k_rope") and matched and q_rope in matched:
                text += (f"; {q_rope} matched, rotated with the same frequencies and factors, so they reach Q's "
                         "rotation and not K's (or K's gets other ones)")
            return text
        if rope_type == "linear":
            return (f"this model's RoPE is linear-scaled (rope_scaling factor {cfg['rope_factor']:g}): positions are "
                    f"divided by {cfg['rope_factor']:g} before the rotation, for Q and K alike")
        return None
    if feature == "sliding_window":
        window = int(cfg.get("sliding_window") or 0) if arch.sliding_window else 0
        if window <= 0:
            return None
        return (f"this model attends to its last {window} keys only (sliding_window {window}): query t sees keys "
                f"t-{window - 1}..t, so an attention without the window matches for the first {window} tokens and "
                "differs after them")
    return None


def inputs(tap: str, n_layers: int) -> list[str]:
    """The canonical taps `tap`'s op reads (the registry's data flow, not forward order: q_rope reads q)."""
    if tap in SHORTCUT_TAPS:
        return ["layers.0.out"] if tap == SHORTCUT_NORM else [SHORTCUT_NORM]
    return inputs_of(tap, n_layers)


def hint(tap: str, before: dict | None, n_layers: int, matched: set[str] | None = None) -> str:
    """`before`: the last matching stage; `matched`: every compared stage before `tap` (all matched).
    Its inputs match when each was compared (without `matched`: when `before` is one of them)."""
    inside = hint_of(tap)
    if before is None:
        return f"the first compared stage already differs: look at {inside}"
    ins = inputs(tap, n_layers)
    if (all(i in matched for i in ins) if matched is not None else before["tap"] in ins):
        return f"inputs to this stage match, its output does not: the fault is inside {inside}"
    return (f"the last matching stage is {before['tap']}; the fault is between it and {tap} "
            f"(stages in between were not compared): start with {inside}")


def fused_hint(tap: str, engine: dict) -> str | None:
    """The candidates a fused op of the other engine hides when `tap` is the first to diverge.
    `engine`: refs.llamacpp.LogInfo.as_dict() of a llama.cpp log."""
    op = stage_of(tap).op if tap not in SHORTCUT_TAPS else ""
    parts = []
    if op == "pv" and engine.get("flash_attn"):
        parts.append("llama.cpp ran attention as one fused op (flash attention: Q·Kᵀ, scale, mask, softmax, ·V), so "
                     "every one of them is a candidate: the score scale (1/sqrt(head_dim)), the causal mask, the "
                     "softmax, the KV-head mapping of K and V, and V itself")
    elif op == "softmax" and engine.get("fused_softmax"):
        parts.append("llama.cpp's softmax is fused with the scale and the mask (soft_max_ext), so the candidates are "
                     "the score scale (1/sqrt(head_dim)), the causal mask and the softmax")
    if op in ("qk", "softmax", "pv") and not engine.get("k_rope_visible", True):
        parts.append("and RoPE on K: the log has no rotated K (no Kcur ROPE), so a fault in K's rotation first "
                     "shows here")
    return "; ".join(parts) or None

"""Explaining a divergence: what each stage computes and where to look when it is the
first to diverge, and the Q/K diagnosis (the values are right but their order along
head_dim is not: a GGUF's interleaved-pair layout left in place or undone twice)."""

from __future__ import annotations

import numpy as np

from .refs.side import SHORTCUT_LOGITS, SHORTCUT_NORM, SHORTCUT_TAPS, tap_order
from .taps import split_name, stage_of
from .tolerances import metrics


# What to look at when a stage is the first to diverge (by stage name within a layer).
HINTS = {
    "embed": "the embedding lookup: check the token ids (an extra BOS makes 39 ids instead of 38), the row index "
             "into embed_tokens, and that the table is not transposed",
    "attn_norm": "the RMSNorm before attention: mean of squares over the hidden axis in fp32, eps inside the sqrt, "
                 "then the cast and the multiply by the weight",
    "attn.q": "the query projection: q_proj weight orientation, and the split into heads ([T, H*D] -> [H, T, D])",
    "attn.k": "the key projection: k_proj weight orientation, KV head count, and the split into KV heads",
    "attn.v": "the value projection: v_proj weight orientation and the split into KV heads",
    "attn.q_rope": "the rotary embedding of the queries: rotate-half (HF) vs interleaved pairs (GGUF weights), "
                   "positions starting at 0, theta, and cos/sin over head_dim/2 frequencies",
    "attn.k_rope": "the rotary embedding of the keys: rotate-half vs interleaved pairs, positions, theta",
    "attn.scores": "Q·Kᵀ: the query-head -> KV-head mapping (head h uses KV head h // n_rep) and K's transpose",
    "attn.scores_scaled": "the score scale: it must be 1/sqrt(head_dim)",
    "attn.scores_masked": "the causal mask: query t sees keys 0..t only; masked entries get the dtype's minimum",
    "attn.probs": "the attention softmax: over the key axis (the last one), in fp32, after subtracting the row max",
    "attn.context": "probs·V: the KV-head mapping for V, and merging heads back to [T, H*D] in head order",
    "attn.out": "the output projection o_proj",
    "resid_mid": "the residual add after attention: it adds the o_proj output to the layer's input (not to the "
                 "normed input)",
    "mlp_norm": "the RMSNorm before the MLP (post_attention_layernorm): fp32 statistics, eps, weight",
    "mlp.gate": "the gate projection gate_proj",
    "mlp.up": "the up projection up_proj",
    "mlp.act": "the activation: SiLU = x·sigmoid(x) (not GELU), applied to the gate",
    "mlp.prod": "SiLU(gate) × up: check which of the two gets the activation",
    "mlp.down": "the down projection down_proj",
    "out": "the residual add after the MLP",
    "final_norm": "the final RMSNorm (model.norm)",
    "logits": "the lm_head projection (tied or not tied to the embedding)",
    SHORTCUT_NORM: "the final RMSNorm applied to layer 0's output",
    SHORTCUT_LOGITS: "the lm_head applied to norm(layer 0's output)",
}


def stage_key(tap: str) -> str:
    return split_name(tap)[1] if tap.startswith("layers.") else tap


def describe(tap: str) -> str:
    if tap in SHORTCUT_TAPS:
        return HINTS[tap]
    return stage_of(tap).what


QK_STAGES = ("attn.q", "attn.k")


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
    which = "Q" if tap.endswith("attn.q") else "K"
    text = (f"the {which} rows are permuted within heads: every (head, token) row holds the reference's values "
            "in another order along head_dim (sorted, they agree), so the weights are right but their row layout "
            "is not: a GGUF's llama.cpp interleaved-pair Q/K layout was not undone (or undone twice). RoPE, the "
            "scores and everything after them diverge from here")
    if perm.get("fixed_by") == "gguf.unpermute_qk":
        text += ("; llama.cpp's inverse permutation (gguf.unpermute_qk, per head) turns these rows into the "
                 "reference's: the interleaved layout is still in place (not undone, or the file was permuted twice)")
    elif perm.get("fixed_by") == "gguf.permute_qk":
        text += ("; llama.cpp's permutation (gguf.permute_qk, per head) turns these rows into the reference's: "
                 "they were un-permuted once too often (a file that was never permuted, un-permuted on load)")
    return text


def predecessor(tap: str, n_layers: int) -> str | None:
    """The canonical tap just before `tap` in forward order (its input, for most stages)."""
    if tap in SHORTCUT_TAPS:
        return "layers.0.out" if tap == SHORTCUT_NORM else SHORTCUT_NORM
    names = tap_order(n_layers)
    i = names.index(tap)
    return names[i - 1] if i > 0 else None


def hint(tap: str, before: dict | None, n_layers: int) -> str:
    inside = HINTS.get(stage_key(tap), describe(tap))
    pred = predecessor(tap, n_layers)
    if before is None:
        return f"the first compared stage already differs: look at {inside}"
    if before["tap"] == pred:
        return f"inputs to this stage match, its output does not: the fault is inside {inside}"
    return (f"the last matching stage is {before['tap']}; the fault is between it and {tap} "
            f"(stages in between were not compared): start with {inside}")

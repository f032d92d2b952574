"""The case list: every op of the forward pass at the model's shapes and at the shapes where kernels break.

Shapes follow the model's config (TinyLlama's numbers below): matmul at every real
(K, N) pair of the projections and the lm_head, M (tokens) at and around the tile and
SIMD-group edges 8, 16, 32, 64, ..., 512; RoPE at offsets 0, 1, 37, 38, 255, 2047;
attention at T = 38 prefill and T = 1 decode with S up to 2048; large-magnitude rows
where fp16 overflows. `quick` keeps a subset that still crosses every edge the tests
and the documented patterns need (M = 16/17, 32/33, T = 1, S = 1 and 2048).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..ops import Ops
from .engine import golden
from .inputs import LAYER, Activations, ModelWeights

M_VALUES = (1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 38, 39, 63, 64, 65, 127, 128, 129, 255, 256, 257,
            511, 512, 513)
M_QUICK = (1, 16, 17, 32, 33, 39, 64)
M_QUICK_LM_HEAD = (1, 7)  # the lm_head's edge is its N (the vocabulary); decode and a short prefill
ROPE_CASES = ((0, 38), (1, 1), (37, 1), (38, 1), (255, 1), (2047, 1), (31, 7))  # (offset, T)
ROPE_QUICK = ((0, 38), (1, 1), (38, 1), (2047, 1))
DECODE_S = (1, 38, 39, 64, 65, 2048)
DECODE_S_QUICK = (1, 39, 2048)
NORM_ROWS = (1, 38, 39, 513)
NORM_ROWS_QUICK = (1, 38)
LARGE_ABSMAX = (300.0, 1000.0, 5000.0, 30000.0)  # RMSNorm rows whose x² overflows fp16 (|x| > 256)
SOFTMAX_SHIFTS = (100.0, 1000.0, 10000.0)  # row maxima where exp without max subtraction overflows fp32
ELEMENTWISE_ROWS = (1, 38)

SEMANTICS = {
    "matmul": "y = x @ w.T; x [M, K], w [N, K] ([out, in], as nn.Linear and HF checkpoints), y [M, N]",
    "rms_norm": "y = weight * (x / sqrt(mean(x^2, axis=-1) + eps)); statistics in float32; x [T, H], weight [H], "
                "y [T, H]",
    "rope": "rotate-half RoPE: y = x*cos(a) + rotate_half(x)*sin(a), rotate_half(x) = concat(-x[..., D/2:], "
            "x[..., :D/2]), a[t, i] = (offset + t) * inv_freq[i mod D/2], inv_freq[j] = theta^(-2j/D) (float32); "
            "x [heads, T, D], y [heads, T, D]",
    "scores": "s = (q @ k.T) * scale + mask; query head h reads KV head h // (H/KV); key j is masked for query t "
              "(dtype's most negative value, or -inf) when j > offset + t; q [H, T, D], k [KV, S, D], s [H, T, S]",
    "softmax": "p = exp(x - max(x)) / sum(exp(x - max(x))) over the last axis, in float32; x [H, T, S] masked "
               "scores (masked = dtype's most negative value), p [H, T, S]",
    "sdpa": "o = softmax((q @ k.T) * scale + mask) @ v; query head h reads KV head h // (H/KV); causal mask for "
            "queries at positions offset..offset+T-1 (nothing masked at T = 1, offset = S-1); q [H, T, D], "
            "k and v [KV, S, D], o [H, T, D]",
    "silu": "y = x * sigmoid(x); x [T, I], y [T, I]",
    "swiglu": "y = silu(gate) * up; gate, up [T, I], y [T, I]",
    "add": "y = a + b (the residual add); a, b [T, H], y [T, H]",
    "embedding": "y = table[ids]; ids int32 [T], table [V, H] (model.embed_tokens.weight), y [T, H]",
}
FAMILIES = {"matmul": ("matmul",), "rms_norm": ("rms_norm",), "rope": ("rope",),
            "attention": ("scores", "softmax"), "sdpa": ("sdpa",),
            "elementwise": ("silu", "swiglu", "add"), "embedding": ("embedding",)}
FAMILY_OF = {op: fam for fam, ops in FAMILIES.items() for op in ops}


@dataclass
class Case:
    """One op on one set of inputs. `inputs`: role -> (safetensors key, float32 values before
    rounding to the dtype); shared keys (a weight used at every M) are stored once."""

    name: str
    op: str
    params: dict
    inputs: dict[str, tuple[str, np.ndarray]]
    reduction: int  # n of the tolerance rule (tolerances.kernel_nmse_budget)
    label: str  # the shape in words, e.g. "q_proj M=33 K=2048 N=2048"

    @property
    def family(self) -> str:
        return FAMILY_OF[self.op]

    @property
    def output(self) -> str:
        return self.name + ".y"


def _pick(full, quick, is_quick: bool):
    return quick if is_quick else full


def positions_needed() -> int:
    """Activations needed: the longest key sequence and the last RoPE position (+1)."""
    return max(max(DECODE_S), max(o + t for o, t in ROPE_CASES))


def mlp_rows(quick: bool) -> int:
    """Rows of gate/up/SwiGLU activations needed: down_proj's largest M and the elementwise cases."""
    return max(max(_pick(M_VALUES, M_QUICK, quick)), max(ELEMENTWISE_ROWS))


def matmul_cases(w: ModelWeights, act: Activations, final_normed: np.ndarray, quick: bool) -> list[Case]:
    t = w.tensors
    projections = [  # every real (K, N) pair: v/o/up repeat the shapes of k/q/gate
        ("q_proj", LAYER + "self_attn.q_proj.weight", act.normed),
        ("k_proj", LAYER + "self_attn.k_proj.weight", act.normed),
        ("gate_proj", LAYER + "mlp.gate_proj.weight", act.normed),
        ("down_proj", LAYER + "mlp.down_proj.weight", act.prod),
        ("lm_head", "lm_head.weight", final_normed),
    ]
    cases = []
    for proj, weight_name, x in projections:
        weight = t[weight_name]
        N, K = weight.shape
        for M in _pick(M_VALUES, M_QUICK_LM_HEAD if proj == "lm_head" else M_QUICK, quick):
            name = f"matmul.{proj}.M{M}"
            cases.append(Case(name, "matmul", {"M": M, "K": K, "N": N, "weight": weight_name},
                              {"x": (name + ".x", x[:M]), "w": (f"matmul.{proj}.w", weight)}, K,
                              f"{proj} M={M} K={K} N={N}"))
    return cases


def rms_norm_cases(w: ModelWeights, act: Activations, quick: bool) -> list[Case]:
    cfg = w.config
    weight_name = LAYER + "input_layernorm.weight"
    key = "rms_norm.weight"
    weight = w.tensors[weight_name]
    params = {"eps": cfg.rms_norm_eps, "weight": weight_name}
    cases = [Case(f"rms_norm.T{T}", "rms_norm", dict(params, T=T), {"x": (f"rms_norm.T{T}.x", act.embed[:T]),
                                                                    "weight": (key, weight)},
                  cfg.hidden_size, f"T={T} H={cfg.hidden_size}") for T in _pick(NORM_ROWS, NORM_ROWS_QUICK, quick)]
    rows = act.embed[:len(LARGE_ABSMAX)]
    large = rows / np.abs(rows).max(axis=1, keepdims=True) * np.array(LARGE_ABSMAX, np.float32)[:, None]
    cases.append(Case("rms_norm.large", "rms_norm", dict(params, T=len(LARGE_ABSMAX), absmax=list(LARGE_ABSMAX)),
                      {"x": ("rms_norm.large.x", large), "weight": (key, weight)}, cfg.hidden_size,
                      f"T={len(LARGE_ABSMAX)} H={cfg.hidden_size}, row absmax {', '.join(map(str, LARGE_ABSMAX))}"))
    return cases


def rope_cases(w: ModelWeights, act: Activations, quick: bool) -> list[Case]:
    cfg = w.config
    base = {"theta": cfg.rope_theta, "head_dim": cfg.head_dim,
            "position_scale": 1.0 / cfg.rope_factor if cfg.rope_type == "linear" else 1.0}
    if cfg.rope_type == "llama3":
        base["llama3"] = [cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                          cfg.rope_original_max_position]
    cases = []
    for offset, T in _pick(ROPE_CASES, ROPE_QUICK, quick):
        name = f"rope.q.offset{offset}.T{T}"
        x = act.q_raw[:, offset:offset + T]
        cases.append(Case(name, "rope", dict(base, offset=offset, T=T, heads=cfg.num_attention_heads),
                          {"x": (name + ".x", x)}, (offset + T) ** 2,
                          f"q heads={cfg.num_attention_heads} T={T} offset={offset} D={cfg.head_dim}"))
    return cases


def _attention_inputs(act: Activations, T: int, S: int) -> dict:
    return {"q": act.q[:, S - T:S], "k": act.k[:, :S], "v": act.v[:, :S]}


def _attention_shapes(quick: bool) -> list[tuple[int, int]]:
    """(T, S): prefill of the seed prompt, decode steps, a chunk of 7 after 31 positions."""
    out = [(38, 38)] + [(1, S) for S in _pick(DECODE_S, DECODE_S_QUICK, quick)]
    return out + [(7, 38)]


def attention_cases(w: ModelWeights, act: Activations, quick: bool, dtype_min: float) -> list[Case]:
    cfg = w.config
    H, KV, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    cases = []
    for T, S in _attention_shapes(quick):
        params = {"T": T, "S": S, "offset": S - T, "scale": cfg.attn_scale}
        inputs = _attention_inputs(act, T, S)
        name = f"scores.T{T}.S{S}"
        cases.append(Case(name, "scores", dict(params), {r: (f"{name}.{r}", inputs[r]) for r in ("q", "k")}, D,
                          f"H={H} KV={KV} T={T} S={S} offset={S - T} D={D}"))
    longest = max(DECODE_S)
    # (T, S, shift): prefill, decode, a prefill shifted to large maxima, decode with maxima 100..10000 by head
    softmax_shapes = [(38, 38, 0.0), (1, 39, 0.0), (1, longest, 0.0), (38, 38, SOFTMAX_SHIFTS[1]), (1, longest, None)]
    for T, S, shift in softmax_shapes:
        inputs = _attention_inputs(act, T, S)
        s = golden("scores", {"q": inputs["q"], "k": inputs["k"]}, {"scale": cfg.attn_scale, "masked": False})
        if shift is None:  # one row maximum per head: 100, 1000, 10000, 100, ...
            s = s + np.resize(np.array(SOFTMAX_SHIFTS, np.float32), H)[:, None, None]
            tag, what = "large", f"row maxima + {', '.join(map(str, SOFTMAX_SHIFTS))}"
        elif shift:
            s, tag, what = s + shift, f"shift{int(shift)}", f"row maxima + {shift:g}"
        else:
            tag, what = "", ""
        cols, rows = np.arange(S)[None, :], np.arange(S - T, S)[:, None]
        s = np.where(cols > rows, dtype_min, s).astype(np.float32)  # the dtype's own mask value
        name = f"softmax.T{T}.S{S}" + (f".{tag}" if tag else "")
        cases.append(Case(name, "softmax", {"T": T, "S": S, "offset": S - T}, {"x": (name + ".x", s)}, S,
                          f"H={H} T={T} S={S}" + (f", {what}" if what else "")))
    return cases


def sdpa_cases(w: ModelWeights, act: Activations, quick: bool) -> list[Case]:
    cfg = w.config
    H, KV, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    cases = []
    for T, S in _attention_shapes(quick):
        name = f"sdpa.T{T}.S{S}"
        inputs = _attention_inputs(act, T, S)
        cases.append(Case(name, "sdpa", {"T": T, "S": S, "offset": S - T, "scale": cfg.attn_scale},
                          {r: (f"{name}.{r}", inputs[r]) for r in ("q", "k", "v")}, S,
                          f"H={H} KV={KV} T={T} S={S} offset={S - T} D={D}"))
    return cases


def elementwise_cases(w: ModelWeights, act: Activations, quick: bool) -> list[Case]:
    cfg = w.config
    mlp_out = act.prod @ w.tensors[LAYER + "mlp.down_proj.weight"].T
    cases = []
    for T in ELEMENTWISE_ROWS:
        I, Hd = cfg.intermediate_size, cfg.hidden_size
        cases.append(Case(f"silu.T{T}", "silu", {"T": T}, {"x": (f"silu.T{T}.x", act.gate[:T])}, 1, f"T={T} I={I}"))
        cases.append(Case(f"swiglu.T{T}", "swiglu", {"T": T}, {"gate": (f"swiglu.T{T}.gate", act.gate[:T]),
                                                              "up": (f"swiglu.T{T}.up", act.up[:T])}, 1, f"T={T} I={I}"))
        cases.append(Case(f"add.T{T}", "add", {"T": T}, {"a": (f"add.T{T}.a", act.embed[:T]),
                                                        "b": (f"add.T{T}.b", mlp_out[:T])}, 1, f"T={T} H={Hd}"))
    return cases


def embedding_cases(w: ModelWeights, act: Activations, quick: bool) -> list[Case]:
    cfg = w.config
    table = ("embedding.table", w.tensors["model.embed_tokens.weight"])
    edge = np.array([0, 1, 2, cfg.vocab_size - 1], np.int32)
    return [Case("embedding.edges", "embedding", {"T": 4}, {"ids": ("embedding.edges.ids", edge), "table": table}, 1,
                 f"ids 0, 1, 2, {cfg.vocab_size - 1}; V={cfg.vocab_size} H={cfg.hidden_size}"),
            Case("embedding.T38", "embedding", {"T": 38}, {"ids": ("embedding.T38.ids", act.ids[:38]), "table": table},
                 1, f"the seed prompt's 38 ids; V={cfg.vocab_size} H={cfg.hidden_size}")]


def build(w: ModelWeights, act: Activations, quick: bool, dtype_min: float) -> list[Case]:
    """Every case, in manifest order (ops in forward-pass order, shapes ascending within an op)."""
    final = np.array(Ops("hf", "explicit").rms_norm(mx.array(act.embed), mx.array(w.tensors["model.norm.weight"]),
                                                    w.config.rms_norm_eps))
    return (embedding_cases(w, act, quick) + rms_norm_cases(w, act, quick) + matmul_cases(w, act, final, quick)
            + rope_cases(w, act, quick) + attention_cases(w, act, quick, dtype_min) + sdpa_cases(w, act, quick)
            + elementwise_cases(w, act, quick))

"""The stage registry: every fact about each stage of the forward pass, said once.

Run, compare, replay, diagnosis, layouts, stability, paths and the report read these facts
from here (dims, token and key axes, inputs, op, weight, hint, panel, GGUF permutation) and
keep no per-stage table of their own, so a stage added here reaches all of them. The tap
names are `layers.{i}.{stage}` for the layer stages and the stage name for the others.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterable

from .errors import UserError

# Axis names and their symbols in the display shapes (README's tap table).
SYMBOLS = {"token": "T", "key": "S", "head": "H", "kv_head": "KV", "dim": "D", "hidden": "hidden",
           "inter": "I", "vocab": "V", "head*dim": "H*D"}
HEAD_AXES = ("head", "kv_head")

# Input references that are not a stage of the same layer.
LAYER_INPUT = "<layer input>"  # the previous layer's `out`, or `embed` in layer 0
LAST_OUTPUT = "<last layer output>"  # the last layer's `out` (`embed` with no layers)

# Magnitude panels of the report, in their order on the page.
PANELS = ("norms (RMSNorm outputs)", "attention projections", "attention scores", "MLP", "residual stream")


# What each op's kernel is called in a hint, and its `vectors` family (matmul families are named by
# their projection; v/o/up share the shapes of k/q/gate, as vectors/cases.py writes them once).
_KERNELS = {"embed": "embedding gather", "rms_norm": "RMSNorm kernel", "rope": "RoPE kernel",
            "repeat_kv": "GQA repeat", "qk": "Q·Kᵀ kernel", "scale": "score scaling", "mask": "causal mask",
            "softmax": "softmax kernel", "pv": "attention kernel (probs·V)", "add": "residual add",
            "silu": "SiLU kernel", "mul": "SwiGLU kernel"}
_VECTOR_FAMILIES = {"embed": "embedding", "rms_norm": "rms_norm", "rope": "rope", "qk": "scores", "scale": "scores",
                    "mask": "scores", "softmax": "softmax", "pv": "sdpa", "add": "add", "silu": "silu", "mul": "swiglu"}
_SAME_SHAPE = {"v_proj": "k_proj", "o_proj": "q_proj", "up_proj": "gate_proj"}


@dataclass(frozen=True)
class Stage:
    name: str  # within a layer: "attn.q"; global: "embed"
    dims: tuple[str, ...]  # axis names, batch dimension dropped (SYMBOLS)
    kind: str  # stage kind for grouping: embed, norm, attention, mlp, residual, head
    what: str  # one line a user reads in tables and hints
    op: str  # the computation (localize/replay.StageOps): embed, rms_norm, heads, rope, repeat_kv, qk, ...
    inputs: tuple[str, ...] = ()  # the stages its op reads: same-layer stage names, globals, LAYER_INPUT, LAST_OUTPUT
    weight: str = ""  # the module whose weight the op uses, from the layer (or the model for globals)
    hint: str = ""  # where to look when it is the first stage to diverge
    panel: str | None = None  # report magnitude panel (PANELS); None: not plotted
    gguf_permuted: bool = False  # a GGUF holds its rows in llama.cpp's interleaved-pair order along head_dim
    masked: bool = False  # holds the causal mask's dtype minimum above the diagonal
    # What a model may add to this stage beyond Llama 2's math (a projection's bias, RoPE scaling,
    # a sliding window): divergence.feature_hint reads from the config whether this model has it.
    feature: str = ""

    @property
    def shape(self) -> str:
        """The display shape, e.g. `[H, T, D]`."""
        return "[" + ", ".join(SYMBOLS[d] for d in self.dims) + "]"

    @property
    def token_axis(self) -> int:
        return self.dims.index("token")

    @property
    def kernel(self) -> str:
        """What computes it, as a hint names it: "q_proj matmul", "softmax kernel" (errorshape.py)."""
        if self.op in ("linear", "heads"):
            return f"{self.weight.split('.')[-1]} matmul"
        return _KERNELS.get(self.op, self.op)

    @property
    def vectors(self) -> str:
        """The `vectors` case family at this stage's shape ("matmul.q_proj"), or "" (vectors/cases.py)."""
        if self.op in ("linear", "heads"):
            proj = self.weight.split(".")[-1]
            return f"matmul.{_SAME_SHAPE.get(proj, proj)}"
        return _VECTOR_FAMILIES.get(self.op, "")

    @property
    def key_axis(self) -> int | None:
        return self.dims.index("key") if "key" in self.dims else None

    @property
    def combines_keys(self) -> bool:
        """Whether its op weighs several keys together (the softmax over keys, probs·V): query row 0
        sees one key only, so a fault in combining keys cannot show there (errorshape.py)."""
        return self.op in ("softmax", "pv")

    @property
    def head_major(self) -> bool:
        return self.dims[0] in HEAD_AXES

    def sizes(self, cfg, n_tokens: int, n_keys: int | None = None) -> tuple[int, ...]:
        """The tensor shape for `cfg` (a ModelConfig or a config dict), T = n_tokens, S = n_keys (default T)."""
        return tuple(axis_size(d, cfg, n_tokens, n_keys) for d in self.dims)


def _cfg(cfg, key: str):
    return cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)


def axis_size(axis: str, cfg, n_tokens: int, n_keys: int | None = None) -> int:
    heads = _cfg(cfg, "num_attention_heads")
    head_dim = _cfg(cfg, "head_dim") or _cfg(cfg, "hidden_size") // heads
    if axis == "head*dim":
        return heads * head_dim
    return {"token": n_tokens, "key": n_tokens if n_keys is None else n_keys, "head": heads,
            "kv_head": _cfg(cfg, "num_key_value_heads"), "dim": head_dim, "hidden": _cfg(cfg, "hidden_size"),
            "inter": _cfg(cfg, "intermediate_size"), "vocab": _cfg(cfg, "vocab_size")}[axis]


_HID, _HEADS, _KV, _SCORES = ("token", "hidden"), ("head", "token", "dim"), ("kv_head", "token", "dim"), \
    ("head", "token", "key")
_PROJ, _ATT, _NORMS = PANELS[1], PANELS[2], PANELS[0]

# Forward order.
GLOBAL_HEAD = (
    Stage("embed", _HID, "embed", "token embedding lookup", "embed", (), "model.embed_tokens",
          "the embedding lookup: check the token ids (an extra BOS makes 39 ids instead of 38), the row index "
          "into embed_tokens, and that the table is not transposed"),
)
LAYER_STAGES = (
    Stage("attn_norm", _HID, "norm", "RMSNorm before attention (input_layernorm)", "rms_norm", (LAYER_INPUT,),
          "input_layernorm", "the RMSNorm before attention: mean of squares over the hidden axis in fp32, eps "
          "inside the sqrt, then the cast and the multiply by the weight", _NORMS),
    Stage("attn.q", _HEADS, "attention", "query projection, split into heads", "heads", ("attn_norm",),
          "self_attn.q_proj", "the query projection: q_proj weight orientation, and the split into heads "
          "([T, H*D] -> [H, T, D])", _PROJ, gguf_permuted=True, feature="q_proj.bias"),
    Stage("attn.k", _KV, "attention", "key projection, split into KV heads", "heads", ("attn_norm",),
          "self_attn.k_proj", "the key projection: k_proj weight orientation, KV head count, and the split into "
          "KV heads", _PROJ, gguf_permuted=True, feature="k_proj.bias"),
    Stage("attn.v", _KV, "attention", "value projection, split into KV heads", "heads", ("attn_norm",),
          "self_attn.v_proj", "the value projection: v_proj weight orientation and the split into KV heads", _PROJ,
          feature="v_proj.bias"),
    Stage("attn.q_rope", _HEADS, "attention", "query after rotary position embedding", "rope", ("attn.q",), "",
          "the rotary embedding of the queries: rotate-half (HF) vs interleaved pairs (GGUF weights), positions "
          "starting at 0, theta, and cos/sin over head_dim/2 frequencies", _PROJ, gguf_permuted=True,
          feature="rope_scaling"),
    Stage("attn.k_rope", _KV, "attention", "key after rotary position embedding", "rope", ("attn.k",), "",
          "the rotary embedding of the keys: rotate-half vs interleaved pairs, positions, theta", _PROJ,
          gguf_permuted=True, feature="rope_scaling"),
    Stage("attn.k_rep", _HEADS, "attention", "keys after the GQA repeat: query head h's keys (KV head h // n_rep)",
          "repeat_kv", ("attn.k_rope",), "", "the GQA repeat of the keys: query head h reads KV head h // n_rep "
          "(repeat_interleave, not tile), over this step's rotated keys", _PROJ),
    Stage("attn.v_rep", _HEADS, "attention", "values after the GQA repeat: query head h's values (KV head h // n_rep)",
          "repeat_kv", ("attn.v",), "", "the GQA repeat of the values: query head h reads KV head h // n_rep "
          "(repeat_interleave, not tile)", _PROJ),
    Stage("attn.scores", _SCORES, "attention", "Q·Kᵀ before scaling (GQA: query head h uses KV head h // n_rep)",
          "qk", ("attn.q_rope", "attn.k_rope"), "",
          "Q·Kᵀ: the query-head -> KV-head mapping (head h uses KV head h // n_rep) and K's transpose", _ATT),
    Stage("attn.scores_scaled", _SCORES, "attention", "scores × 1/sqrt(head_dim)", "scale", ("attn.scores",), "",
          "the score scale: it must be 1/sqrt(head_dim)", _ATT),
    Stage("attn.scores_masked", _SCORES, "attention", "scaled scores + causal mask (dtype minimum above the "
          "diagonal)", "mask", ("attn.scores_scaled",), "",
          "the causal mask: query t sees keys 0..t only; masked entries get the dtype's minimum", None, masked=True,
          feature="sliding_window"),
    Stage("attn.probs", _SCORES, "attention", "softmax over key positions", "softmax", ("attn.scores_masked",), "",
          "the attention softmax: over the key axis (the last one), in fp32, after subtracting the row max", _ATT,
          feature="sliding_window"),
    Stage("attn.context", ("token", "head*dim"), "attention", "probs·V with heads merged, before o_proj", "pv",
          ("attn.probs", "attn.v"), "",
          "probs·V: the KV-head mapping for V, and merging heads back to [T, H*D] in head order", _PROJ,
          feature="sliding_window"),
    Stage("attn.out", _HID, "attention", "o_proj output, before the residual add", "linear", ("attn.context",),
          "self_attn.o_proj", "the output projection o_proj", _PROJ, feature="o_proj.bias"),
    Stage("resid_mid", _HID, "residual", "residual stream after the attention add", "add",
          (LAYER_INPUT, "attn.out"), "", "the residual add after attention: it adds the o_proj output to the "
          "layer's input (not to the normed input)", PANELS[4]),
    Stage("mlp_norm", _HID, "norm", "RMSNorm before the MLP (post_attention_layernorm)", "rms_norm", ("resid_mid",),
          "post_attention_layernorm", "the RMSNorm before the MLP (post_attention_layernorm): fp32 statistics, eps, "
          "weight", _NORMS),
    Stage("mlp.gate", ("token", "inter"), "mlp", "gate_proj output", "linear", ("mlp_norm",), "mlp.gate_proj",
          "the gate projection gate_proj: the right weight (gate and up are easily swapped)", PANELS[3]),
    Stage("mlp.up", ("token", "inter"), "mlp", "up_proj output", "linear", ("mlp_norm",), "mlp.up_proj",
          "the up projection up_proj: the right weight (gate and up are easily swapped)", PANELS[3]),
    Stage("mlp.act", ("token", "inter"), "mlp", "SiLU(gate)", "silu", ("mlp.gate",), "",
          "the activation: SiLU = x·sigmoid(x) (not GELU), applied to the gate", PANELS[3]),
    Stage("mlp.prod", ("token", "inter"), "mlp", "SiLU(gate) × up", "mul", ("mlp.act", "mlp.up"), "",
          "SiLU(gate) × up: the activation (SiLU, not GELU or ReLU) and which of the two gets it", PANELS[3]),
    Stage("mlp.down", _HID, "mlp", "down_proj output, before the residual add", "linear", ("mlp.prod",),
          "mlp.down_proj", "the down projection down_proj", PANELS[3]),
    Stage("out", _HID, "residual", "decoder layer output (after both residual adds)", "add", ("resid_mid", "mlp.down"),
          "", "the residual add after the MLP", PANELS[4]),
)
GLOBAL_TAIL = (
    Stage("final_norm", _HID, "norm", "final RMSNorm (model.norm)", "rms_norm", (LAST_OUTPUT,), "model.norm",
          "the final RMSNorm (model.norm)"),
    Stage("logits", ("token", "vocab"), "head", "lm_head output", "linear", ("final_norm",), "lm_head",
          "the lm_head projection (tied or not tied to the embedding)"),
)

# The attention internals that a fused attention kernel does not expose: on the
# fused path they are recomputed from the same q_rope/k_rope for observation.
# Likewise mlp.act: the fused path computes SiLU(gate) × up in one kernel.
ATTENTION_INTERNALS = tuple(s.name for s in LAYER_STAGES if s.key_axis is not None)


def all_stages() -> tuple[Stage, ...]:
    return GLOBAL_HEAD + LAYER_STAGES + GLOBAL_TAIL


def tap_names(num_layers: int) -> list[str]:
    """Every canonical tap name of a model with `num_layers` layers, in forward order."""
    names = [s.name for s in GLOBAL_HEAD]
    for i in range(num_layers):
        names += [f"layers.{i}.{s.name}" for s in LAYER_STAGES]
    names += [s.name for s in GLOBAL_TAIL]
    return names


def split_name(name: str) -> tuple[int | None, str]:
    """`layers.3.attn.q` -> (3, "attn.q"); `logits` -> (None, "logits")."""
    if name.startswith("layers."):
        _, idx, rest = name.split(".", 2)
        return int(idx), rest
    return None, name


def stage_of(name: str) -> Stage:
    """The Stage of a tap name; KeyError for a name that is no stage."""
    layer, stage = split_name(name)
    for s in (LAYER_STAGES if layer is not None else GLOBAL_HEAD + GLOBAL_TAIL):
        if s.name == stage:
            return s
    raise KeyError(name)


def inputs_of(tap: str, n_layers: int) -> list[str]:
    """The canonical taps that `tap`'s op reads (the forward pass's data flow)."""
    layer, _ = split_name(tap)
    first, last = GLOBAL_HEAD[-1].name, LAYER_STAGES[-1].name  # what enters layer 0; a layer's output
    out = []
    for ref in stage_of(tap).inputs:
        if ref == LAYER_INPUT:
            out.append(first if not layer else f"layers.{layer - 1}.{last}")
        elif ref == LAST_OUTPUT:
            out.append(f"layers.{n_layers - 1}.{last}" if n_layers else first)
        elif layer is None or any(ref == s.name for s in GLOBAL_HEAD + GLOBAL_TAIL):
            out.append(ref)
        else:
            out.append(f"layers.{layer}.{ref}")
    return out


def select(patterns: Iterable[str], num_layers: int) -> list[str]:
    """Expand glob patterns (`layers.0.*`, `*.attn.probs`, `logits`) to tap names in forward order."""
    names = tap_names(num_layers)
    chosen: set[str] = set()
    for pat in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise UserError(
                f"tap pattern {pat!r} matches no stage. Valid names (layer i in 0..{num_layers - 1}): "
                + ", ".join([s.name for s in GLOBAL_HEAD] + [f"layers.i.{s.name}" for s in LAYER_STAGES]
                            + [s.name for s in GLOBAL_TAIL])
            )
        chosen.update(hits)
    return [n for n in names if n in chosen]

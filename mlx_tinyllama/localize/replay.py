"""Replay: feed another engine's own input of each stage through this package's op, and compare
their output with ours-from-their-input. That is the stage's *local* error, apart from the error
it *inherited*: the first stage whose local error exceeds its tolerance is the bug, even when
earlier stages already drifted a little (and later, innocent ones amplified the drift).

Every op runs in float32 on explicit kernels (ops.py), whatever the model's dtype, so the
replay adds nothing measurable of its own. A stage whose input was not dumped is recomputed
from the nearest dumped ancestors (a fused-attention engine without scores or probabilities
still gets its context replayed from q_rope, k_rope and v); a stage with no dumped ancestor
except the token ids is not replayed (that would be the global comparison again).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from ..ops import Ops, Rope
from ..stages import LAYER_STAGES, inputs_of, split_name, stage_of, tap_names
from ..tolerances import Tolerances
from ..metrics import metrics
from .kvcache import StepCache, explain, key_columns

F32 = mx.float32
EXPLICIT = Ops("hf", "explicit")


class NotReplayable(ValueError):
    """A stage whose op this module does not compute (a stage the registry gained later)."""


def recipe_inputs(tap: str, n_layers: int) -> list[str]:
    """The canonical taps that `tap`'s op reads, in the reference's forward pass (the registry's graph)."""
    return inputs_of(tap, n_layers)


class StageOps:
    """This package's op of every stage, on numpy tensors in the canonical layout (batch dropped),
    for token rows starting at `position`. Variants (a transposed RoPE, another scale, ...) are
    the keyword arguments that diagnosis (transforms.py) turns."""

    def __init__(self, lm, ids: list[int] | None, position: int = 0):
        self.lm, self.cfg, self.ids, self.position = lm, lm.config, ids, position
        self.model = lm.model
        self._rope = Rope.from_config(self.cfg)

    def weight(self, w: mx.array) -> mx.array:
        """A float32 copy for one op, not kept: each weight is read about once per replay, and all of
        TinyLlama's in float32 would be 4.4 GB."""
        return w.astype(F32)

    def linear(self, x: np.ndarray, w: mx.array, bias: mx.array | None = None) -> np.ndarray:
        y = mx.array(x, F32) @ self.weight(w).T
        return np.array(y if bias is None else y + bias.astype(F32))

    def norm(self, x: np.ndarray, w: mx.array) -> np.ndarray:
        return np.array(EXPLICIT.rms_norm(mx.array(x, F32), self.weight(w), self.cfg.rms_norm_eps))

    def n_heads(self, axis: str) -> int:
        return self.cfg.num_attention_heads if axis == "head" else self.cfg.num_key_value_heads

    def repeat_kv(self, x: np.ndarray, kv_map=None) -> np.ndarray:
        """[KV, T, D] -> [H, T, D]: query head h reads KV head kv_map[h] (h // n_rep by default)."""
        H, KV = self.cfg.num_attention_heads, self.cfg.num_key_value_heads
        kv_map = np.arange(H) // (H // KV) if kv_map is None else kv_map
        return np.asarray(x, np.float32)[kv_map]

    def heads(self, x: np.ndarray, n: int) -> np.ndarray:
        return x.reshape(x.shape[0], n, -1).transpose(1, 0, 2)

    def rope(self, x: np.ndarray, offset: int = 0, interleaved: bool = False) -> np.ndarray:
        rope = self._rope
        x4 = mx.array(x, F32)[None]
        start = self.position + offset
        if interleaved:
            out = mx.fast.rope(x4, x.shape[-1], traditional=True, base=None, scale=rope.position_scale,
                               offset=start, freqs=rope.freqs)
        else:
            out = EXPLICIT.rope(x4, start, rope)
        return np.array(out[0])

    def qk(self, q: np.ndarray, k: np.ndarray, kv_map=None) -> np.ndarray:
        if kv_map is None:
            return np.array(EXPLICIT.qk(mx.array(q, F32)[None], mx.array(k, F32)[None])[0])
        return np.einsum("htd,hsd->hts", q.astype(np.float32), k.astype(np.float32)[kv_map])

    def mask(self, s: np.ndarray, shift: int = 0, off: bool = False) -> np.ndarray:
        T, S = s.shape[-2], s.shape[-1]
        if off or T == 1 and shift == 0 and not (self.cfg.window and S > self.cfg.window):
            return s.astype(np.float32)
        rows = np.arange(S - T, S)[:, None] + shift
        low = float(np.finfo(np.float32).min)
        hidden = np.arange(S)[None, :] > rows
        if self.cfg.window and S > self.cfg.window:  # a sliding window hides the keys that far back
            hidden |= np.arange(S)[None, :] <= rows - self.cfg.window
        return np.where(hidden, np.float32(low), s.astype(np.float32))

    def softmax(self, s: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.array(mx.softmax(mx.array(s, F32), axis=axis))

    def pv(self, probs: np.ndarray, v: np.ndarray, kv_map=None) -> np.ndarray:
        if kv_map is None:
            out = np.array(EXPLICIT.pv(mx.array(probs, F32)[None], mx.array(v, F32)[None])[0])
        else:
            out = np.einsum("hts,hsd->htd", probs.astype(np.float32), v.astype(np.float32)[kv_map])
        return out.transpose(1, 0, 2).reshape(out.shape[1], -1)

    def silu(self, x: np.ndarray) -> np.ndarray:
        return np.array(EXPLICIT.silu(mx.array(x, F32)))

    def module(self, layer: int | None, path: str):
        """The module at `path` from layer `layer` (or the model for the global stages)."""
        m = self.model.model
        if path == "lm_head" and self.cfg.tie_word_embeddings:
            path = "model.embed_tokens"
        obj = m.layers[layer] if layer is not None else self.model
        for part in path.split("."):
            obj = getattr(obj, part)
        return obj

    def run(self, tap: str, inputs: list[np.ndarray], **variant) -> np.ndarray:
        """Our `tap` computed from `inputs` (recipe_inputs order), by the op the registry names;
        `variant` picks a deliberate variant. NotReplayable for an op not written here."""
        layer, _ = split_name(tap)
        st = stage_of(tap)
        mod = self.module(layer, st.weight) if st.weight else None
        w = mod.weight if mod is not None else None
        bias = mod.bias if mod is not None and "bias" in mod else None  # Qwen2's q/k/v, Llama's attention_bias
        x = inputs[0] if inputs else None
        f32 = np.float32
        if st.op == "embed":
            return np.array(w[mx.array(self.ids)].astype(F32))
        ops = {
            "rms_norm": lambda: self.norm(x, w),
            "linear": lambda: self.linear(x, w, bias),
            "heads": lambda: self.heads(self.linear(x, w, bias), self.n_heads(st.dims[0])),
            "rope": lambda: self.rope(x, variant.get("rope_offset", 0), variant.get("interleaved", False)),
            "repeat_kv": lambda: self.repeat_kv(x, variant.get("kv_map")),
            "qk": lambda: self.qk(x, inputs[1], variant.get("kv_map")),
            "scale": lambda: (x * f32(variant.get("scale", self.cfg.attn_scale))).astype(f32),
            "mask": lambda: self.mask(x, variant.get("mask_shift", 0), variant.get("mask_off", False)),
            "softmax": lambda: self.softmax(x, variant.get("softmax_axis", -1)),
            "pv": lambda: self.pv(x, inputs[1], variant.get("kv_map")),
            "add": lambda: x.astype(f32) + inputs[1].astype(f32),
            "mul": lambda: x.astype(f32) * inputs[1].astype(f32),
            "silu": lambda: self.silu(x),
        }
        if st.op not in ops:
            raise NotReplayable(f"{tap}: no replay op {st.op!r} for this stage")
        return ops[st.op]()


@dataclass
class Replay:
    """Replayed stages: tap -> {local_ratio, local_nmse, tolerance, inputs, recomputed} or {skipped}."""

    stages: dict[str, dict] = field(default_factory=dict)
    outputs: dict[str, np.ndarray] = field(default_factory=dict)  # ours from their inputs, per replayed tap
    inputs: dict[str, list[np.ndarray]] = field(default_factory=dict)  # the input values each op read

    def first_local(self) -> str | None:
        return next((t for t, s in self.stages.items() if s.get("local_ratio", 0.0) > 1.0), None)


def local_ratio(tap: str, theirs: np.ndarray, ours: np.ndarray, tolerance: float, mask_dtype=None,
                mask_allowed: float = 0.0) -> tuple[float, float]:
    """(ratio, nmse) of their output against ours-from-their-input; a mask mismatch (judged by effect in
    their dtype, beyond what --tol allows, as the verdict judges it) or a new NaN is inf."""
    m = metrics(theirs, ours, masked=stage_of(tap).masked, mask_dtype=mask_dtype)
    if m["mask_mismatch"] > mask_allowed or m["nonfinite"]:
        return math.inf, math.inf
    nmse = m["nmse"] if not math.isnan(m["nmse"]) else 0.0  # nothing comparable: inherited non-finite values
    return (nmse / tolerance if tolerance > 0 else (0.0 if nmse == 0 else math.inf)), nmse


def replay(theirs: dict[str, np.ndarray], lm, ids: list[int] | None, tol: Tolerances, their_dtype: str | None,
           position: int = 0, kv: StepCache | None = None) -> Replay:
    """Replay every dumped stage whose inputs can be had from the dump (`theirs`: canonical tap ->
    tensor in the canonical layout). `position`: the first token row's position (decode steps).
    `kv`: a decode step's cache rebuilt from the engine's own step dumps (kvcache.py): Q·Kᵀ and
    probs·V read it instead of this step's rows, and the scores' columns are matched to its keys."""
    n_layers = lm.config.num_hidden_layers
    ops = StageOps(lm, ids, position)
    out = Replay()
    recomputed: dict[str, np.ndarray | None] = {}

    def cached(tap: str, ins: list[str], vals: list) -> tuple[list | None, str]:
        """The op's inputs with the cache in place of this step's K or V rows; (None, why) without it."""
        op = stage_of(tap).op
        if kv is None or op not in ("qk", "pv") or vals[0] is None:
            return vals, ""
        if ins[1] in kv.missing:
            return None, f"the engine's cache is not in the step dumps: {kv.missing[ins[1]]}"
        full = kv.tensors[ins[1]]
        if op == "pv" and vals[0].shape[-1] != full.shape[1]:  # their probs weigh other keys than 0..S-1
            layer, _ = split_name(tap)
            qk = next(f"layers.{layer}.{st.name}" for st in LAYER_STAGES if st.op == "qk")  # the keys it weighs
            scores = out.stages.get(qk, {})
            cols = scores.get("key_columns")
            if cols is None or not all(isinstance(c, int) for c in cols) or len(cols) != vals[0].shape[-1]:
                unknown = "every column (the scores were not matched to cached keys)" if cols is None else \
                    "column(s) " + ", ".join(str(j) for j, c in enumerate(cols) if not isinstance(c, int))
                return None, (f"their probs weigh {vals[0].shape[-1]} keys and the cache holds {full.shape[1]}; "
                              f"no cached value is known for {unknown}")
            full = full[:, cols]
        return [vals[0], full, *vals[2:]], ""

    def value(tap: str) -> np.ndarray | None:
        """Their tensor, or ours recomputed from their nearest dumped ancestors (None: none dumped)."""
        if tap in theirs:
            return theirs[tap]
        if tap not in recomputed:
            recomputed[tap] = None
            ins = recipe_inputs(tap, n_layers)
            if ins:  # the embedding is never recomputed: that would not use their numbers
                vals, _ = cached(tap, ins, [value(i) for i in ins])
                if vals is not None and all(v is not None for v in vals):
                    try:
                        recomputed[tap] = ops.run(tap, vals)
                    except (ValueError, IndexError) as e:  # their ancestors' shapes do not fit, or no op
                        recomputed[tap] = None
                        out.stages.setdefault(tap, {"tap": tap, "skipped": f"cannot recompute: {e}"})
        return recomputed[tap]

    for tap in tap_names(n_layers):
        if tap not in theirs:
            continue
        ins = recipe_inputs(tap, n_layers)
        if tap == "embed" and not ids:
            out.stages[tap] = {"tap": tap, "skipped": "the dump records no token ids"}
            continue
        vals = [value(i) for i in ins]
        if any(v is None for v in vals):
            missing = [i for i, v in zip(ins, vals) if v is None]
            out.stages[tap] = {"tap": tap, "skipped": f"input(s) not dumped: {', '.join(missing)}"}
            continue
        vals, why = cached(tap, ins, vals)
        if vals is None:
            out.stages[tap] = {"tap": tap, "skipped": why}
            continue
        try:
            ours = ops.run(tap, vals)
        except NotReplayable as e:
            out.stages[tap] = {"tap": tap, "skipped": f"not replayable: {e}"}
            continue
        except (ValueError, IndexError) as e:
            out.stages[tap] = {"tap": tap, "skipped": f"their inputs do not fit the op: {e}"}
            continue
        tolerance = tol.get(tap, "nmse", their_dtype or "float32", "float32", n_layers)
        # A step's scores are matched to the cached keys where they do not match ours column for column
        # (only then: the match costs a column's worth of Q·Kᵀ per column).
        keys = None
        if kv is not None and stage_of(tap).op == "qk" and ours.shape[:-1] == theirs[tap].shape[:-1] and \
                ours.shape != theirs[tap].shape:
            keys = _key_columns(theirs[tap], vals, ops, tolerance, position, kv)
            if keys["consistent"]:  # a window's keys only, as the model reads them
                ours = ours[..., keys["key_columns"]]
        if ours.shape != theirs[tap].shape:
            if keys is not None:  # their scores read other keys than the cache holds: the step's own fault
                out.stages[tap] = {"tap": tap, "local_ratio": math.inf, "local_nmse": math.inf,
                                   "tolerance": tolerance, "inputs": [i for i in ins if i in theirs],
                                   "recomputed": [i for i in ins if i not in theirs], **keys}
                out.inputs[tap] = vals
                continue
            out.stages[tap] = {"tap": tap, "skipped": f"shape {list(theirs[tap].shape)}, ours from their inputs "
                                                      f"{list(ours.shape)}"}
            continue
        allowed = tol.get(tap, "mask_mismatch", their_dtype or "float32", "float32", n_layers) \
            if stage_of(tap).masked else 0.0
        ratio, nmse = local_ratio(tap, theirs[tap], ours, tolerance, their_dtype, allowed)
        out.stages[tap] = {"tap": tap, "local_ratio": ratio, "local_nmse": nmse, "tolerance": tolerance,
                           "inputs": [i for i in ins if i in theirs] or (["token ids"] if tap == "embed" else []),
                           "recomputed": [i for i in ins if i not in theirs]}
        if kv is not None and stage_of(tap).op == "qk" and (keys is not None or ratio > 1.0):
            out.stages[tap].update(keys or _key_columns(theirs[tap], vals, ops, tolerance, position, kv))
        out.outputs[tap] = ours
        out.inputs[tap] = vals
    return out


def _key_columns(theirs, vals, ops: StageOps, tolerance: float, position: int, kv: StepCache) -> dict:
    """Which cached key each column of a step's scores holds, and what that says (kvcache.explain)."""
    H, KV = ops.cfg.num_attention_heads, ops.cfg.num_key_value_heads
    cols = key_columns(theirs, vals[0], vals[1], np.arange(H) // (H // KV), tolerance)
    consistent, words = explain(cols, position, kv.n_keys - position, ops.cfg.window)
    return {"key_columns": cols, "consistent": consistent, "keys": words}


def localized(rep: Replay, stage_ratios: dict[str, float]) -> dict | None:
    """The first stage whose local error exceeds tolerance, with the error it inherited (the worst
    ratio of its dumped inputs against the reference)."""
    tap = rep.first_local()
    if tap is None:
        return None
    s = rep.stages[tap]
    inherited = max((stage_ratios.get(i, 0.0) for i in s["inputs"]), default=0.0)
    return {"stage": tap, "local_ratio": s["local_ratio"], "inherited_ratio": inherited}

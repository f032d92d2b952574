"""tap_dump.py: a numpy-only safetensors writer for dumping an engine's intermediate tensors
("taps") under mlx_tinyllama's canonical names, so that

    python -m mlx_tinyllama.trace compare --against dump.safetensors --model MODEL

can tell where the engine first goes wrong. Copy this file into your engine; it needs numpy
only (not safetensors, torch or mlx_tinyllama). Public domain / CC0.

    d = TapDump(tokens=ids, position=0, dtype="float16")   # dtype: the precision you computed in
    d.add(name(3, "attn.q"), q)                             # [heads, T, head_dim], batch dim dropped
    d.add("logits", logits, store_as="bfloat16")            # stored as f32 (default), f16 or bf16
    d.add_fused("qkv.0", qkv, [name(0, "attn.q"), name(0, "attn.k"), name(0, "attn.v")])  # [T, (H+2KV)*D]
    d.write("dump.safetensors")                             # temp file + rename

Shapes drop the batch dimension: [T, hidden] for norms and residuals, [heads, T, head_dim]
for q/k/v, [heads, T, S] for scores and probabilities, [T, heads*head_dim] for attn.context.

Q/K row order: an engine that keeps Meta's original weights (llama2.c) or a GGUF's rotates
interleaved pairs (x[2i], x[2i+1]); Hugging Face checkpoints rotate halves (x[i], x[i+D/2]).
Declare which one your q/k/q_rope/k_rope hold with `TapDump(..., qk_layout="meta")` (or "gguf",
or "hf", the default), or convert them before `add` with `interleaved_to_rotate_half`.
"""

from __future__ import annotations

import json
import os

import numpy as np

# Canonical stage names (mlx_tinyllama/stages.py), in forward order.
LAYER_STAGES = ("attn_norm", "attn.q", "attn.k", "attn.v", "attn.q_rope", "attn.k_rope", "attn.k_rep",
                "attn.v_rep", "attn.scores", "attn.scores_scaled", "attn.scores_masked", "attn.probs",
                "attn.context", "attn.out", "resid_mid", "mlp_norm", "mlp.gate", "mlp.up", "mlp.act", "mlp.prod", "mlp.down", "out")
GLOBAL_STAGES = ("embed", "final_norm", "logits")

_TAGS = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_ALIASES = {"f32": "float32", "fp32": "float32", "f16": "float16", "fp16": "float16", "half": "float16",
            "bf16": "bfloat16"}


def name(layer: int | None, stage: str) -> str:
    """'layers.<layer>.<stage>', or '<stage>' for the global stages (layer None)."""
    return stage if layer is None else f"layers.{layer}.{stage}"


def interleaved_to_rotate_half(x) -> np.ndarray:
    """Q/K values in interleaved pairs along the last axis (head_dim: x[2i], x[2i+1] rotate
    together: Meta, llama2.c, GGUF) -> Hugging Face's rotate-half order (x[i], x[i+D/2])."""
    x = np.asarray(x)
    return np.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


def rotate_half_to_interleaved(x) -> np.ndarray:
    """The inverse of `interleaved_to_rotate_half`."""
    x = np.asarray(x)
    half = x.shape[-1] // 2
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = x[..., :half], x[..., half:]
    return out


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(np.asarray(x, np.float32))
    return np.where(nan, ((u >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16), rounded)


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


class TapDump:
    """Tensors and metadata collected in memory, written by `write` in one go."""

    def __init__(self, tokens=None, position: int | None = None, dtype: str | None = None, **metadata):
        self.tensors: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
        self.metadata: dict[str, str] = {k: str(v) for k, v in metadata.items()}
        if tokens is not None:
            self.metadata["tokens"] = json.dumps([int(i) for i in tokens])
        if position is not None:
            self.metadata["position"] = str(int(position))
        if dtype is not None:
            self.metadata["dtype"] = _ALIASES.get(dtype, dtype)

    def add(self, tap: str, x, store_as: str = "float32") -> None:
        """Add a tensor (copied now), stored as float32, float16 or bfloat16."""
        store_as = _ALIASES.get(store_as, store_as)
        if store_as not in _TAGS:
            raise ValueError(f"store_as must be one of {sorted(_TAGS)}, not {store_as!r}")
        if not tap or tap in self.tensors:
            raise ValueError(f"tensor name {tap!r} is empty or already added")
        a = np.asarray(x)
        if store_as == "bfloat16":
            data = to_bf16_bits(a.astype(np.float32)).astype("<u2").tobytes()
        else:
            data = np.ascontiguousarray(a, np.dtype(store_as).newbyteorder("<")).tobytes()
        self.tensors[tap] = (_TAGS[store_as], tuple(int(d) for d in a.shape), data)

    def add_fused(self, name: str, x, taps, layout: str = "concat", store_as: str = "float32") -> None:
        """Add one matmul's output that holds several taps side by side on its last axis (q|k|v
        against a concatenated weight, gate|up), shaped [T, width] or [T, heads, head_dim], and
        record which taps, in order, in the `fused` metadata (compare reads it as --map entries).
        layout: "concat" (one after the other), "grouped" (q/k/v per KV group: Megatron-LM's
        linear_qkv) or "interleaved" (the parts' columns alternate)."""
        self.add(name, x, store_as)
        self.set_fused(name, taps, layout)

    def set_fused(self, name: str, taps, layout: str = "concat") -> None:
        """Record that tensor `name` (added with `add`) holds `taps` side by side: see add_fused."""
        taps = [str(t) for t in taps]
        fused = json.loads(self.metadata.get("fused", "{}"))
        if len(taps) < 2 or len(set(taps)) != len(taps) or layout not in ("concat", "grouped", "interleaved") \
                or name in fused:
            raise ValueError(f"fused {name!r}: 2 or more distinct taps, a layout of concat, grouped or interleaved, "
                             f"and a name given once; not {taps} {layout!r}")
        fused[name] = taps if layout == "concat" else {"taps": taps, "layout": layout}
        self.metadata["fused"] = json.dumps(fused)

    def header(self) -> bytes:
        h: dict = {"__metadata__": self.metadata} if self.metadata else {}
        offset = 0
        for tap, (tag, shape, data) in self.tensors.items():
            h[tap] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
            offset += len(data)
        raw = json.dumps(h, separators=(",", ":")).encode()
        return raw + b" " * (-len(raw) % 8)  # the data starts 8-byte aligned

    def write(self, path) -> None:
        """Write to `path`: first 'PATH.tmp.PID', then renamed onto PATH (os.replace)."""
        path = os.fspath(path)
        tmp = f"{path}.tmp.{os.getpid()}"
        header = self.header()
        try:
            with open(tmp, "wb") as f:
                f.write(len(header).to_bytes(8, "little"))
                f.write(header)
                for _, _, data in self.tensors.values():
                    f.write(data)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

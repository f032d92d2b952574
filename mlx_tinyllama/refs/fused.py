"""Fused projections in another engine's dump: one tensor that holds several taps side by side
along its feature axis, because the engine computed them as ONE matmul against a concatenated
weight (q|k|v: vLLM's QKVParallelLinear, TensorRT-LLM, exllama; gate|up: vLLM's
MergedColumnParallelLinear). A `--map` entry (or the kit's `fused` metadata) names the taps in
order; the tensor is split into them, with the widths read from the stage table and the config,
before anything is compared, so each part is judged, localized and explained as the tap it is.

How the parts sit in the feature axis is a named layout, each one a real engine's:
- concat: the parts one after the other (vLLM, TensorRT-LLM, exllama, llama.cpp's fused QKV).
- grouped: q/k/v packed per KV group, [q heads of group g, k_g, v_g] for g = 0..KV-1: Megatron-LM's
  `linear_qkv` (SelfAttention.get_query_key_value_tensors views it as [ng, (np/ng + 2) * hn]).
- interleaved: the parts' columns alternate (gate_0, up_0, gate_1, ...): Hugging Face's GPT-OSS
  experts (`gate_up[..., ::2]`, `gate_up[..., 1::2]`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from ..stages import stage_of
from ..taps import split_name
from .side import SHORTCUT_TAPS, is_known_tap

FUSED_LAYOUTS = {
    "concat": "the parts one after the other",
    "grouped": "q/k/v per KV group [q heads of group g, k_g, v_g] (Megatron-LM's linear_qkv)",
    "interleaved": "the parts' columns alternating (GPT-OSS's gate_up)",
}


@dataclass(frozen=True)
class Fused:
    """Their tensor `name` holds `taps`, in this order along its last axis, packed as `layout`."""

    name: str
    taps: tuple[str, ...]
    layout: str = "concat"

    def describe(self) -> str:
        parts = "|".join(split_name(t)[1] or t for t in self.taps)
        return f"{parts}" + ("" if self.layout == "concat" else f", {self.layout}")

    def entry(self):
        """The map entry that names it (a list, or an object when the layout is not concat)."""
        return list(self.taps) if self.layout == "concat" else {"taps": list(self.taps), "layout": self.layout}


def parse_entry(their: str, value, where: str) -> Fused | None:
    """A map value naming several taps -> Fused (None for a one-tap string entry); bad input is
    one line (UserError) saying what the entry should be."""
    if isinstance(value, str):
        return None
    layout = "concat"
    if isinstance(value, dict):
        extra = set(value) - {"taps", "layout"}
        layout = value.get("layout", "concat")
        if extra or not isinstance(layout, str):
            raise UserError(f"{where}: {their!r}: a fused entry is {{\"taps\": [...], \"layout\": "
                            f"{'|'.join(FUSED_LAYOUTS)}}}" + (f", not with {sorted(extra)[0]!r}" if extra else ""))
        value = value.get("taps")
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise UserError(f"{where}: {their!r} must map to a canonical tap, or to a list of taps (a fused tensor)")
    if layout not in FUSED_LAYOUTS:
        raise UserError(f"{where}: {their!r}: fused layout {layout[:40]!r} is not one of {', '.join(FUSED_LAYOUTS)}")
    if len(value) < 2:
        raise UserError(f"{where}: {their!r}: a fused entry names two taps or more (one tap: give the name alone)")
    bad = [t for t in value if not is_known_tap(t) or t in SHORTCUT_TAPS]
    if bad:
        raise UserError(f"{where}: {bad[0]!r} is not a canonical tap name (e.g. layers.0.attn.q, logits)")
    if len(set(value)) != len(value):
        raise UserError(f"{where}: {their!r} names a tap twice: {value}")
    keyed = [t for t in value if stage_of(t).key_axis is not None]
    if keyed:
        raise UserError(f"{where}: {their!r}: {keyed[0]} has a key axis (scores, probabilities): only taps with "
                        "one feature axis per token (projections, norms, MLP) can be fused")
    fused = Fused(their, tuple(value), layout)
    if layout == "grouped":
        stages = [split_name(t) for t in value]
        if [s for _, s in stages] != ["attn.q", "attn.k", "attn.v"] or len({ly for ly, _ in stages}) != 1:
            raise UserError(f"{where}: {their!r}: layout grouped packs one layer's attn.q, attn.k, attn.v "
                            f"(in that order), not {', '.join(value)}")
    return fused


def declared_fused(meta: dict, path) -> dict[str, Fused]:
    """The fused tensors a dump's metadata names (kit's `fused`: a JSON object of map entries)."""
    text = meta.get("fused")
    if text in (None, ""):
        return {}
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, TypeError, RecursionError):
        data = None
    if not isinstance(data, dict):
        raise UserError(f"{path}: its metadata 'fused' must be a JSON object {{tensor: [taps]}}; it holds "
                        f"{str(text)[:60]!r}")
    out = {}
    for their, value in data.items():
        f = parse_entry(their, value, f"{path}: metadata 'fused'")
        if f is None:
            raise UserError(f"{path}: metadata 'fused': {their!r} names one tap; give the tensor that name instead")
        out[their] = f
    return out


def width(tap: str, cfg: dict) -> int:
    """How many values of one token the tap holds: H*D for q, KV*D for k and v, I for gate and up."""
    return int(np.prod(stage_of(tap).sizes(cfg, 1)))


def _widths_text(f: Fused, widths: list[int]) -> str:
    return " + ".join(f"{split_name(t)[1] or t} {w}" for t, w in zip(f.taps, widths)) + f" = {sum(widths)}"


def split(f: Fused, x: np.ndarray, cfg: dict, widths: list[int] | None = None) -> list[tuple[str, np.ndarray, str]]:
    """Their fused tensor -> [(tap, [T, width] part, note)]. Its last axis holds the features
    ([T, W], [1, T, W], or [T, heads, D] merged); a width that does not add up is bad input.
    `widths`: the taps' widths when the caller has them (--suggest-map tries many runs)."""
    widths = list(widths) if widths is not None else [width(t, cfg) for t in f.taps]
    total = sum(widths)
    a = np.asarray(x)
    shape = list(a.shape)
    if a.ndim >= 2 and a.shape[-1] != total and a.shape[-2] * a.shape[-1] == total:
        a = a.reshape(a.shape[:-2] + (total,))  # [T, heads, D] with the parts' heads side by side
    while a.ndim > 2 and a.shape[0] == 1:  # a batch axis of 1
        a = a[0]
    if a.ndim == 1:  # one token's row (ggml drops the 1-token axis)
        a = a[None]
    if a.ndim != 2 or a.shape[1] != total:
        got = a.shape[-1] if a.ndim else 0
        raise UserError(f"{f.name} {shape}: its last axis holds {got} values per token, but {', '.join(f.taps)} "
                        f"are {_widths_text(f, widths)} (from the config); map it to the taps it holds")
    if f.layout == "interleaved":
        if len(set(widths)) != 1:
            raise UserError(f"{f.name}: layout interleaved alternates equal parts; {_widths_text(f, widths)} differ")
        n = len(widths)
        return [(t, a[:, k::n], f"columns {k}::{n} of their {f.name} {shape} (fused {f.describe()})")
                for k, t in enumerate(f.taps)]
    if f.layout == "grouped":
        heads, kv = int(cfg["num_attention_heads"]), int(cfg["num_key_value_heads"])
        d = widths[1] // kv
        rep = heads // kv
        g = a.reshape(a.shape[0], kv, rep + 2, d)
        parts = (g[:, :, :rep].reshape(a.shape[0], heads * d), g[:, :, rep], g[:, :, rep + 1])
        parts = (parts[0], parts[1].reshape(a.shape[0], -1), parts[2].reshape(a.shape[0], -1))
        where = (f"the first {rep} heads", f"head {rep}", f"head {rep + 1}")
        return [(t, p, f"{w} of each of the {kv} KV groups of their {f.name} {shape} (fused {f.describe()})")
                for t, p, w in zip(f.taps, parts, where)]
    out, start = [], 0
    for t, w in zip(f.taps, widths):
        out.append((t, a[:, start:start + w], f"columns {start}:{start + w} of their {f.name} {shape} "
                                              f"(fused {f.describe()})"))
        start += w
    return out


def split_fused(side, cfg: dict) -> None:
    """Split a side's fused tensors into the taps they hold (in place; a split one is not split again)."""
    for k, (f, x) in enumerate(side.fused):
        if x is None:
            continue
        for tap, part, note in split(f, x, cfg):
            side.tensors[tap] = np.ascontiguousarray(part, np.float32)
            side.origins[tap] = note
        side.fused[k] = (f, None)

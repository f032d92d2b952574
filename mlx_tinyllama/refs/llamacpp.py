"""llama.cpp's names and logs: its graph's tensor names mapped to canonical taps, and
the values that `llama-eval-callback` prints, parsed into `Side` items."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from .side import Item, Selector, Side, is_known_tap


LLAMACPP_PRINT_RESOLUTION = 0.5e-4  # llama.cpp prints values with "%12.4f": +-0.00005


# ---------------------------------------------------------------------------
# Names: canonical, user mappings, llama.cpp's graph names

# llama.cpp Llama graph (src/models/llama.cpp, src/llama-graph.cpp build_norm/build_qkv/build_attn/
# build_ffn): callback name -> canonical stage. Names that occur twice in one layer are told
# apart by op (Qcur/Kcur: ROPE is after RoPE) or order (ffn_out: first the MLP output, then
# the residual sum).
LLAMACPP_STAGES = {
    "attn_norm": "attn_norm", "Vcur": "attn.v", "kq": "attn.scores", "kq_soft_max": "attn.probs",
    "kq_soft_max_ext": "attn.probs", "kqv": "attn.context", "kqv_out": "attn.context", "attn_out": "attn.out",
    "ffn_inp": "resid_mid", "ffn_norm": "mlp_norm", "ffn_gate": "mlp.gate", "ffn_up": "mlp.up",
    "ffn_silu": "mlp.act", "ffn_swiglu": "mlp.prod", "ffn_gate_par": "mlp.prod", "ffn_down": "mlp.down",
    "l_out": "out",
}
LLAMACPP_GLOBAL = {"inp_embd": "embed", "result_norm": "final_norm", "result_output": "logits"}
LLAMACPP_TWICE = {"Qcur": ("attn.q", "attn.q_rope"), "Kcur": ("attn.k", "attn.k_rope"),
                  "ffn_out": ("mlp.down", "out")}


def map_name(name: str, name_map: dict | None = None) -> str | None:
    """Their tensor name -> canonical tap (user map first, then canonical names, then llama.cpp's)."""
    if name_map and name in name_map:
        return name_map[name]
    if is_known_tap(name):
        return name
    m = re.fullmatch(r"(\w+)-(\d+)", name)
    if m and m.group(1) in LLAMACPP_STAGES:
        return f"layers.{m.group(2)}.{LLAMACPP_STAGES[m.group(1)]}"
    if m and m.group(1) in LLAMACPP_TWICE:  # without op/order information: the first meaning
        return f"layers.{m.group(2)}.{LLAMACPP_TWICE[m.group(1)][0]}"
    return LLAMACPP_GLOBAL.get(name)


def llamacpp_tap(name: str, op: str, occurrence: int, occurrences: int, name_map: dict | None = None) -> str | None:
    """Canonical tap of the `occurrence`-th (0-based) of `occurrences` tensors printed under `name`."""
    if name_map and name in name_map:
        return name_map[name]
    m = re.fullmatch(r"(\w+)-(\d+)", name)
    if m and m.group(1) in LLAMACPP_TWICE:
        before, after = LLAMACPP_TWICE[m.group(1)]
        if m.group(1) in ("Qcur", "Kcur"):
            late = op.upper().startswith("ROPE") if op else occurrence == occurrences - 1 and occurrences > 1
        else:
            late = occurrence == occurrences - 1 and occurrences > 1 or op.upper() == "ADD" and occurrences == 1
        return f"layers.{m.group(2)}.{after if late else before}"
    return map_name(name, None)


# ---------------------------------------------------------------------------
# llama.cpp eval-callback logs

_HEADER = re.compile(r"^\s*(?:[\w:]+:\s+)?(?P<name>\S.*?) = \((?P<type>\w+)\)\s+(?P<op>\S+)\((?P<args>.*)\) = "
                     r"\{(?P<shape>[\d,\s]+)\}\s*$")
_SUM = re.compile(r"^\s*sum\s*=\s*(?P<v>\S+)\s*$")
_PRINT_EDGE = 3  # llama.cpp prints the first and last 3 entries along each dimension


def _printed_indices(ne: int) -> list[int]:
    return list(range(ne)) if ne <= 2 * _PRINT_EDGE else [0, 1, 2, ne - 3, ne - 2, ne - 1]


def _parse_float(tok: str) -> float:
    t = tok.strip().lower().lstrip("+")
    if t in ("nan", "-nan"):
        return float("nan")
    return float(t)


# The largest tensor a Llama graph prints: logits (context x vocabulary) or attention scores (heads x
# context x context) of a model this tool runs, e.g. TinyLlama's 2048-token logits: 65.5 M values. A
# log that declares more is corrupt or not a Llama's, and is refused before anything is allocated.
MAX_LOG_ELEMENTS = 1 << 26


def _shape(name: str, text: str) -> list[int]:
    parts = [p for p in text.replace(" ", "").split(",") if p]
    if not 1 <= len(parts) <= 4:
        raise UserError(f"llama.cpp log: tensor {name} declares {len(parts)} dimensions {{{text}}}; ggml has 1 to 4")
    ne = [int(p) for p in parts]
    n = int(np.prod(ne, dtype=object))
    if n > MAX_LOG_ELEMENTS or min(ne) < 1:
        raise UserError(f"llama.cpp log: tensor {name} declares shape {{{text}}} ({n} values); a Llama tap has "
                        f"1 to {MAX_LOG_ELEMENTS} (corrupt or not a Llama's log?)")
    return (ne + [1, 1, 1, 1])[:4]


@dataclass
class LogTensor:
    name: str
    type: str
    op: str
    ne: list[int]
    values: np.ndarray  # numpy order (reversed ne), NaN where not printed
    known: np.ndarray
    sum: float | None


def parse_llamacpp_tensors(text: str) -> list[LogTensor]:
    """Every tensor block of a llama-eval-callback log, in order."""
    out: list[LogTensor] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _HEADER.match(lines[i])
        i += 1
        if not m:
            continue
        ne = _shape(m.group("name").strip(), m.group("shape"))
        rows, total = [], None
        while i < len(lines) and not _HEADER.match(lines[i]):
            s = lines[i].strip()
            i += 1
            sm = _SUM.match(s)
            if sm:
                total = _parse_float(sm.group("v"))
                break
            if s.startswith("[") and len(s) > 1:  # one printed row of ne[0] values
                body = s.strip("[], ")
                toks = [t for t in body.split(",") if t.strip() and t.strip() != "..."]
                try:
                    rows.append([_parse_float(t) for t in toks])
                except ValueError:
                    raise UserError(f"llama.cpp log: bad number in the values of {m.group('name')}: {s[:80]!r}") from None
        out.append(_assemble(m.group("name").strip(), m.group("type"), m.group("op"), ne, rows, total))
    return out


def _assemble(name, type_, op, ne, rows, total) -> LogTensor:
    shape = (ne[3], ne[2], ne[1], ne[0])
    values = np.full(shape, np.nan, np.float32)  # float32: what llama.cpp computed; half the memory
    known = np.zeros(shape, bool)
    i0s = _printed_indices(ne[0])
    slots = [(i3, i2, i1) for i3 in range(ne[3]) for i2 in _printed_indices(ne[2]) for i1 in _printed_indices(ne[1])]
    if rows and (len(rows) != len(slots) or any(len(r) != len(i0s) for r in rows)):
        raise UserError(f"llama.cpp log: tensor {name} with shape {{{', '.join(map(str, ne))}}} should print "
                        f"{len(slots)} rows of {len(i0s)} values, found {len(rows)} rows: truncated or edited log?")
    for (i3, i2, i1), row in zip(slots, rows):
        values[i3, i2, i1, i0s] = row
        known[i3, i2, i1, i0s] = True
    # numpy order without ggml's trailing 1-sized dims
    ndim = max(1, max(d + 1 for d in range(4) if ne[d] > 1) if any(n > 1 for n in ne) else 1)
    keep = shape[4 - ndim:]
    return LogTensor(name, type_, op, ne, values.reshape(keep), known.reshape(keep), total)


def parse_llamacpp_log(text: str, name: str = "llama.cpp log", name_map: dict | None = None,
                       layout: str = "gguf") -> Side:
    tensors = parse_llamacpp_tensors(text)
    if not tensors:
        raise UserError(f"{name}: no 'ggml_debug: NAME = (type) OP(...) = {{shape}}' blocks found")
    counts: dict[str, int] = {}
    for t in tensors:
        counts[t.name] = counts.get(t.name, 0) + 1
    seen: dict[str, int] = {}
    side = Side(name=name, kind="llama.cpp-log", layout=layout,
                provenance={"computed_by": "llama.cpp (llama-eval-callback log)"})
    types = set()
    for t in tensors:
        k = seen.get(t.name, 0)
        seen[t.name] = k + 1
        tap = llamacpp_tap(t.name, t.op, k, counts[t.name], name_map)
        if tap is None:
            side.not_comparable.append({"key": f"{t.name} ({t.op})", "reason": "no canonical tap for this name"})
            continue
        types.add(t.type)
        if t.known.any():
            side.items.append(Item(tap, Selector("full"), t.values, key=f"{t.name} ({t.op}) #{k + 1}", known=t.known,
                                   resolution=LLAMACPP_PRINT_RESOLUTION, note="printed values (first/last 3 per dim)"))
        if t.sum is not None:
            side.items.append(Item(tap, Selector("sum"), np.float64(t.sum), key=f"{t.name} ({t.op}) #{k + 1} sum",
                                   source_shape=t.values.shape))
    side.dtype = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}.get(types.pop()) if len(types) == 1 else "float32"
    return side

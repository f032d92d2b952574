"""llama.cpp's names and logs: its graph's tensor names mapped to canonical taps, and
the values that `llama-eval-callback` prints, parsed into `Side` items."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from ..architectures import ARCHITECTURES
from ..errors import UserError
from .side import Item, Selector, Side, is_known_tap


LLAMACPP_PRINT_RESOLUTION = 0.5e-4  # llama.cpp prints values with "%12.4f": +-0.00005


# ---------------------------------------------------------------------------
# Names: canonical, user mappings, llama.cpp's graph names

# llama.cpp Llama graph (src/models/llama.cpp, src/llama-graph.cpp build_norm/build_qkv/build_attn/
# build_ffn): callback name -> canonical stage. A name printed several times in one layer is told
# apart by its op (Qcur: MUL_MAT is the projection, RESHAPE the same values split into heads, ROPE
# after RoPE; ffn_out: MUL_MAT is the MLP output, ADD the residual sum).
LLAMACPP_STAGES = {
    "attn_norm": "attn_norm", "Vcur": "attn.v", "kq": "attn.scores", "kq_soft_max": "attn.probs",
    "kq_soft_max_ext": "attn.probs", "kqv": "attn.context", "kqv_out": "attn.context", "attn_out": "attn.out",
    "ffn_inp": "resid_mid", "ffn_norm": "mlp_norm", "ffn_gate": "mlp.gate", "ffn_up": "mlp.up",
    "ffn_silu": "mlp.act", "ffn_gate_par": "mlp.prod", "ffn_down": "mlp.down", "l_out": "out",
}
# build_ffn's gated activations (LLM_FFN_PAR): each is act(gate) x up, the canonical mlp.prod. Only
# ffn_swiglu is the model's (SiLU); the others are printed when the engine picked another activation.
GATED_ACTIVATIONS = {"ffn_swiglu": "SiLU", "ffn_geglu": "GELU", "ffn_geglu_erf": "GELU (erf)",
                     "ffn_geglu_quick": "quick GELU", "ffn_reglu": "ReLU", "ffn_swiglu_oai": "SiLU (OpenAI, clamped)",
                     "ffn_swiglu_limited": "SiLU (clamped)"}
LLAMACPP_STAGES.update({name: "mlp.prod" for name in GATED_ACTIVATIONS})
LLAMACPP_GLOBAL = {"embd": "embed", "inp_embd": "embed", "result_norm": "final_norm", "result_output": "logits"}
# name -> {op: stage}; an op not listed is a reshape/view of a listed one (the same values)
# Qwen2's build_qkv adds each bias under the same name (Qcur MUL_MAT, then Qcur ADD): the ADD is the
# canonical projection (the model's q/k/v include their bias) and the MUL_MAT before it is not compared.
LLAMACPP_BY_OP = {"Qcur": {"MUL_MAT": "attn.q", "ADD": "attn.q", "ROPE": "attn.q_rope"},
                  "Kcur": {"MUL_MAT": "attn.k", "ADD": "attn.k", "ROPE": "attn.k_rope"},
                  "Vcur": {"MUL_MAT": "attn.v", "ADD": "attn.v"},
                  "ffn_out": {"MUL_MAT": "mlp.down", "ADD": "out"}}
LLAMACPP_TWICE = {"Qcur": ("attn.q", "attn.q_rope"), "Kcur": ("attn.k", "attn.k_rope"),
                  "ffn_out": ("mlp.down", "out")}  # first and last meaning, when the op is unknown

# Printed tensors that are not a canonical stage, and why (the `not compared` list).
_BIASED = ("Qcur", "Kcur", "Vcur")  # names whose MUL_MAT is followed by a bias ADD in a biased model
_VIEW_OPS = ("VIEW", "PERMUTE", "RESHAPE", "TRANSPOSE", "CONT", "CPY")


def not_comparable_reason(name: str, op: str) -> str:
    """Why a printed tensor that maps to no stage is not compared."""
    base = re.sub(r"-\d+$", "", name.split(" ")[0])
    if base == "norm":
        return ("RMSNorm before its weight: no stage of its own (the product with the weight is "
                + ("result_norm, compared as final_norm)" if name == "norm" else "attn_norm/ffn_norm, compared)"))
    if base.startswith("cache_k") or base.startswith("cache_v"):
        return ("the KV cache: K/V stored for attention" + (" (SET_ROWS writes the whole cache, mostly empty)"
                if op == "SET_ROWS" else ", read back as a view") + "; its type sets the KV-cache emulation")
    if op == "MUL_MAT" and base in _BIASED:
        return f"the projection before its bias: the {base} ADD printed next is compared as the projection"
    if op == "FLASH_ATTN_EXT":
        return "flash attention, one fused op (Q·Kᵀ, scale, mask, softmax, ·V): its output is kqv_out, compared as attn.context"
    if op == "GET_ROWS":
        return "the last layer keeps only the output token's rows (llama.cpp's inp_out_ids): a selection, not a stage"
    if op in _VIEW_OPS:
        return f"a {op.lower()} of {base}: the same values as the tensor it views (compared there)"
    return "no canonical tap for this name"


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
    """Canonical tap of the `occurrence`-th (0-based) of `occurrences` tensors printed under `name`
    (None: not a stage, see not_comparable_reason)."""
    if name_map and name in name_map:
        return name_map[name]
    m = re.fullmatch(r"(\w+)-(\d+)", name)
    op = (op or "").upper()
    if m and m.group(1) in LLAMACPP_BY_OP:
        stages = LLAMACPP_BY_OP[m.group(1)]
        if op in stages:
            return f"layers.{m.group(2)}.{stages[op]}"
        if op:
            return None  # a reshape of the projection printed just before it: the same values
        before, after = LLAMACPP_TWICE[m.group(1)]
        return f"layers.{m.group(2)}.{after if occurrence == occurrences - 1 and occurrences > 1 else before}"
    return map_name(name, None)


# ---------------------------------------------------------------------------
# llama.cpp eval-callback logs

_O_PROJ = re.compile(r"blk\.(\d+)\.attn_output\.weight\{")
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
# What all the compared tensors of one log may hold together, declared (5 bytes a value: float32 and a
# mask): 1.3 GB. TinyLlama's log of a 39-token prompt declares 70 M values and compares 30 M, a 4-layer
# model's of 335 tokens declares 23 M; a log of small headers that each declare a big shape (2 KB declaring 8192 x 8192 per block took
# over 2 GB) is refused here instead of allocating what it declares.
MAX_LOG_TOTAL_ELEMENTS = 1 << 28


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
    """One printed tensor. Its rows are kept as printed (a few values each: bounded by the bytes of
    the log); the dense `values`/`known` of its declared shape are made only when asked for."""

    name: str
    type: str
    op: str
    ne: list[int]
    rows: list  # the printed rows, float32 arrays of the printed ne[0] indices
    sum: float | None
    args: str = ""  # the op's operands as printed, e.g. "blk.0.attn_output.weight{64, 64, 1, 1}, kqv_out-0{...}"

    @property
    def shape(self) -> tuple:
        """numpy order (reversed ne) without ggml's trailing 1-sized dims"""
        ne = self.ne
        ndim = max(1, max(d + 1 for d in range(4) if ne[d] > 1) if any(n > 1 for n in ne) else 1)
        return (ne[3], ne[2], ne[1], ne[0])[4 - ndim:]

    @property
    def size(self) -> int:
        return int(np.prod(self.ne))

    @cached_property
    def _dense(self) -> tuple[np.ndarray, np.ndarray]:
        ne = self.ne
        full = (ne[3], ne[2], ne[1], ne[0])
        values = np.full(full, np.nan, np.float32)  # float32: what llama.cpp computed; half the memory
        known = np.zeros(full, bool)
        i0s = _printed_indices(ne[0])
        for (i3, i2, i1), row in zip(_slots(ne), self.rows):
            values[i3, i2, i1, i0s] = row
            known[i3, i2, i1, i0s] = True
        return values.reshape(self.shape), known.reshape(self.shape)

    @property
    def values(self) -> np.ndarray:  # NaN where not printed
        return self._dense[0]

    @property
    def known(self) -> np.ndarray:
        return self._dense[1]


def _slots(ne) -> list[tuple[int, int, int]]:
    """(i3, i2, i1) of each row llama.cpp prints, in order"""
    return [(i3, i2, i1) for i3 in range(ne[3]) for i2 in _printed_indices(ne[2]) for i1 in _printed_indices(ne[1])]


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
        name = m.group("name").strip()
        ne = _shape(name, m.group("shape"))
        expected = ne[3] * len(_printed_indices(ne[2])) * len(_printed_indices(ne[1]))
        width = len(_printed_indices(ne[0]))
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
                    row = np.array([_parse_float(t) for t in toks], np.float32)
                except ValueError:
                    raise UserError(f"llama.cpp log: bad number in the values of {name}: {s[:80]!r}") from None
                if len(row) != width or len(rows) >= expected:
                    rows.append(row)
                    break  # the check below says what is wrong; nothing more of this block is kept
                rows.append(row)
        if rows and (len(rows) != expected or any(len(r) != width for r in rows)):
            raise UserError(f"llama.cpp log: tensor {name} with shape {{{', '.join(map(str, ne))}}} should print "
                            f"{expected} rows of {width} values, found {len(rows)} rows: truncated or edited log?")
        out.append(LogTensor(name, m.group("type"), m.group("op"), ne, rows, total, m.group("args")))
    return out


@dataclass
class LogInfo:
    """What a log says about the engine beside its tensors."""

    ids: list[int] | None = None  # "number of input tokens = N" and the ids, as the engine tokenized
    kv_cache: str | None = None  # the type of the K cache tensors (cache_k_l0 ...)
    flash_attn: bool = False  # attention ran as one FLASH_ATTN_EXT op
    fused_softmax: bool = False  # kq_soft_max (SOFT_MAX with scale and mask) printed
    k_rope_visible: bool = False  # a Kcur ROPE tensor was printed
    weight_types: list[str] = field(default_factory=list)  # the loader's "- type f16: N tensors" (verbose logs)
    activations: list[str] = field(default_factory=list)  # types of the printed activations
    system_info: str | None = None
    model_buffers: list[str] = field(default_factory=list)  # the loader's "X model buffer size" lines (-v)
    # the loader's "tensor 'T' (t) (and N others) cannot be used with preferred buffer type X": {X: N + 1}
    moved_off: dict = field(default_factory=dict)
    gguf_arch: str | None = None  # the loader's "general.architecture str = X": the GGUF the engine ran

    def as_dict(self) -> dict:
        return {"gguf_arch": self.gguf_arch, "ids": self.ids, "kv_cache": self.kv_cache, "flash_attn": self.flash_attn,
                "fused_softmax": self.fused_softmax, "k_rope_visible": self.k_rope_visible,
                "weight_types": self.weight_types, "activations": self.activations, "system_info": self.system_info,
                "model_buffers": self.model_buffers, "moved_off": self.moved_off}


_ARCH_LINE = re.compile(r"llama_model_loader: - kv\s+\d+:\s+general\.architecture\s+str\s+=\s+(\S+)")
_TYPE_LINE = re.compile(r"llama_model_loader: - type\s+(\w+):\s+\d+ tensors")
# "load_tensors:          AMX model buffer size =    18.22 MiB" (printed with -v; CPU_Mapped, CPU_REPACK, ...)
_BUFFER_LINE = re.compile(r"load_tensors:\s+(\S+) model buffer size =")
_MOVED_LINE = re.compile(r"done_getting_tensors: tensor '.*' \(\w+\) \(and (\d+) others\) cannot be used with "
                         r"preferred buffer type (\S+),")


def parse_log_info(text: str, tensors: list[LogTensor]) -> LogInfo:
    info = LogInfo()
    lines = text.splitlines()
    for k, line in enumerate(lines):
        if "number of input tokens = " in line and info.ids is None:
            try:
                n = int(line.rsplit("=", 1)[1])
                info.ids = [int(re.search(r"(-?\d+)\s*$", x).group(1)) for x in lines[k + 1: k + 1 + n]]
            except (ValueError, AttributeError):
                raise UserError(f"llama.cpp log: the token list after {line.strip()!r} is cut or edited") from None
        elif "system_info:" in line and info.system_info is None:
            info.system_info = line.split("system_info:", 1)[1].strip()
        else:
            m = _ARCH_LINE.search(line)
            if m and info.gguf_arch is None:
                info.gguf_arch = m.group(1)
            m = _TYPE_LINE.search(line)
            if m:
                info.weight_types.append(m.group(1))
            m = _BUFFER_LINE.search(line)
            if m and m.group(1) not in info.model_buffers:
                info.model_buffers.append(m.group(1))
            m = _MOVED_LINE.search(line)
            if m:
                info.moved_off[m.group(2)] = int(m.group(1)) + 1
    for t in tensors:
        if t.name.startswith("cache_k_l") and info.kv_cache is None:
            info.kv_cache = t.type
        info.flash_attn |= t.op == "FLASH_ATTN_EXT"
        info.fused_softmax |= t.op == "SOFT_MAX"
        info.k_rope_visible |= t.name.startswith("Kcur-") and t.op == "ROPE"
        if not t.name.startswith("cache_") and t.type not in info.activations:
            info.activations.append(t.type)
    return info


# GGUF general.architecture -> does llama.cpp's converter permute Q/K rows (llama: yes, qwen2: no)
GGUF_PERMUTES_QK = {a.gguf_arch: a.gguf_permutes_qk for a in ARCHITECTURES.values()}


def log_layout(info: LogInfo) -> str:
    """The Q/K row order of the engine's Q/K tensors: its GGUF's (the loader names the architecture;
    a log without that line is taken as llama's, the permuted order)."""
    return "gguf" if GGUF_PERMUTES_QK.get(info.gguf_arch, True) else "hf"


def parse_llamacpp_log(text: str, name: str = "llama.cpp log", name_map: dict | None = None,
                       layout: str | None = None) -> Side:
    tensors = parse_llamacpp_tensors(text)
    if not tensors:
        raise UserError(f"{name}: no 'NAME = (type) OP(...) = {{shape}}' tensor blocks found (a llama-eval-callback log?)")
    info = parse_log_info(text, tensors)
    layout = layout or log_layout(info)
    counts: dict[str, int] = {}
    for t in tensors:
        counts[t.name] = counts.get(t.name, 0) + 1
    seen: dict[str, int] = {}
    printed: set[tuple[str, str]] = set()
    biased = {t.name for t in tensors if t.op == "ADD" and re.sub(r"-\d+$", "", t.name) in _BIASED}
    allocated = 0  # declared values of the compared tensors, made dense below
    planned = []
    side = Side(name=name, kind="llama.cpp-log", layout=layout, ids=info.ids,
                n_tokens=len(info.ids) if info.ids else None,
                provenance={"computed_by": "llama.cpp (llama-eval-callback log)", "llama.cpp": info.as_dict()})
    layer_now = None  # the layer of the last "NAME-N" tensor: flash attention's node_K carries none
    for t in tensors:
        k = seen.get(t.name, 0)
        seen[t.name] = k + 1
        tap = llamacpp_tap(t.name, t.op, k, counts[t.name], name_map)
        if t.op == "MUL_MAT" and t.name in biased and not (name_map and t.name in name_map):
            tap = None  # before its bias (not_comparable_reason says so); the ADD is the projection
        merge_heads = False  # FLASH_ATTN_EXT's [T, heads, head_dim], compared as [T, heads*head_dim]
        suffix = re.search(r"-(\d+)(?: \(|$)", t.name)
        if suffix:
            layer_now = int(suffix.group(1))
        if tap is None and t.op == "FLASH_ATTN_EXT" and layer_now is not None and len(t.shape) == 3:
            # The fused output [T, heads, head_dim] is kqv_out's values, but printed per dimension:
            # its corners show 6 heads (kqv_out's, only the first and the last), and a fault that
            # spares those two (a GQA broadcast that maps head h to h % n_kv) shows only here.
            tap = f"layers.{layer_now}.attn.context"
            merge_heads = True
        wo = _O_PROJ.match(t.args) if tap is None and t.op == "MUL_MAT" else None
        if wo:
            # Qwen2's graph leaves the output projection unnamed (node_N): its weight operand says what it is
            tap = f"layers.{wo.group(1)}.attn.out"
        base, _, layer = t.name.partition("-")
        if tap is None and t.op == "RESHAPE" and base in ("Qcur", "Kcur", "Vcur") and layer.isdigit() \
                and (t.name, "MUL_MAT") not in printed:
            # no projection printed under this name (it was renamed): the reshape holds its values
            tap = f"layers.{layer}.attn.{base[0].lower()}"
        printed.add((t.name, t.op))
        if tap is None:
            side.not_comparable.append({"key": f"{t.name} ({t.op})", "reason": not_comparable_reason(t.name, t.op)})
            continue
        where = f"{t.name} ({t.op})" + (f" #{k + 1}" if counts[t.name] > 1 else "")
        note = "printed values (first/last 3 per dim)"
        base = re.sub(r"-\d+$", "", t.name)
        if base in GATED_ACTIVATIONS and base != "ffn_swiglu":
            note += f"; llama.cpp gated the MLP with {GATED_ACTIVATIONS[base]} ({t.op}), the model with SiLU (SWIGLU)"
        if t.rows:
            allocated += t.size
        planned.append((tap, t, where, note, merge_heads))
    if allocated > MAX_LOG_TOTAL_ELEMENTS:  # checked before any tensor is made dense
        raise UserError(f"{name}: its compared tensors declare {allocated} values in all; this parser holds at most "
                        f"{MAX_LOG_TOTAL_ELEMENTS} (corrupt, or a prompt too long to compare from a log: use fewer tokens)")
    for tap, t, where, note, merge_heads in planned:
        if t.rows:
            values, known = t.values, t.known
            if merge_heads:
                values, known = values.reshape(values.shape[0], -1), known.reshape(known.shape[0], -1)
            side.items.append(Item(tap, Selector("full"), values, key=where, known=known,
                                   resolution=LLAMACPP_PRINT_RESOLUTION, note=note))
        if t.sum is not None:
            # ggml's printed sum: a plain float32 running sum over the tensor in its memory order
            side.items.append(Item(tap, Selector("sum"), np.float64(t.sum), key=f"{where} sum",
                                   source_shape=(t.shape[0], int(np.prod(t.shape[1:]))) if merge_heads
                                   else t.shape, accumulation="float32-sequential", note=note))
    # The printed activations are f32 even when the engine rounds inside its ops; the precision it
    # computed with is emulated on the reference side (emulation.py), so tolerances stay fp32's.
    side.dtype = "float32" if set(info.activations) <= {"f32"} else {"f16": "float16", "bf16": "bfloat16"}.get(
        next(iter(set(info.activations) - {"f32"})), "float32")
    return side

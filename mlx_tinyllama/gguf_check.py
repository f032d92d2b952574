"""A GGUF against the Hugging Face checkpoint it was converted from.

A compare whose reference and candidate were both loaded from one GGUF cannot see a conversion
fault: both sides inherit it. This module checks the conversion itself, tensor by tensor and key
by key:

- every tensor: its name mapped (gguf.hf_name), present on both sides, the same shape, and its
  values within what the GGUF type's rounding allows of the HF values: F32 exact, F16/BF16 within
  half an ulp (round to nearest), Q8_0 within its block bound (d = amax/127 stored as f16:
  |x - d16*q| <= d*(0.5 + 127*2^-11)). Other types are listed as not checked, never passed.
- Q/K: the rows of attn_q/attn_k must be HF's permuted per head for llama.cpp's interleaved RoPE
  (gguf.permute_qk). A tensor that fails is tried in the layouts converters are known to write
  instead (not permuted, permuted twice, the inverse permutation, K permuted with the query head
  count), and the one that fits is named.
- tied weights: a GGUF without output.weight makes llama.cpp use token_embd as the LM head; that is
  right only when the HF checkpoint ties them (or its lm_head equals its embedding).
- metadata: layers, heads, KV heads, head size, hidden and MLP sizes, RoPE theta and scaling, RMSNorm
  eps, vocabulary, context length, BOS/EOS ids, add_bos_token: GGUF keys against config.json (and
  tokenizer_config.json for add_bos_token). A key one side lacks is listed as not checked.

The GGUF is read with gguf_header (the project's bounded parser) and dequantized with gguf.py's
reader (gguf-py's reference dequantizer); the HF side with mx.load (bfloat16 included).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import load_config
from .errors import UserError
from .gguf import _from_numpy, _require_llama, hf_name, permute_qk, unpermute_qk
from .gguf_header import header_value, open_gguf

ROW_CHUNK = 4096  # rows compared at a time: bounds the float64 copies of a [32000, 2048] tensor
F16_HALF_ULP, F16_MIN_HALF_STEP = 2.0 ** -11, 2.0 ** -25  # round to nearest; below 2^-14, subnormal steps
BF16_HALF_ULP, BF16_MIN_HALF_STEP = 2.0 ** -8, 2.0 ** -134
QBLOCK = 32  # Q8_0, Q4_0, Q4_1, Q5_0: blocks of 32 values along a row
# ggml's reference quantizers (quants.c *_ref), per block, d stored as f16 (relative error 2^-11):
#   Q8_0: d = amax/127, q = round(x/d):               |x - d16*q| <= d*(0.5 + 127*2^-11)
#   Q4_0: d = max/-8,  q = min(15, trunc(x/d + 8.5)): the clamp costs one step: <= |d|*(1 + 8*2^-11)
#   Q5_0: d = max/-16, q = min(31, trunc(x/d + 16.5)): <= |d|*(1 + 16*2^-11)
#   Q4_1: d = (max-min)/15, m = min, q = round((x-m)/d): <= d*(0.5 + 15*2^-11) + |m|*2^-11
QUANT_LEVELS = {"Q8_0": (127.0, 0.5 + 127 * 2.0 ** -11), "Q4_0": (8.0, 1 + 8 * 2.0 ** -11),
                "Q5_0": (16.0, 1 + 16 * 2.0 ** -11)}
CHECKED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0")
# Rows layouts of attn_q / attn_k, the correct one first: name -> (words, HF -> GGUF rows).
QK_LAYOUTS = {
    "permuted": ("permuted per head (llama.cpp's layout)", lambda w, h, hq: permute_qk(w, h)),
    "not_permuted": ("written without the Q/K permutation (HF's rotate-half row order)", lambda w, h, hq: w),
    "permuted_twice": ("permuted twice (the checkpoint was already in llama.cpp's order)",
                       lambda w, h, hq: permute_qk(permute_qk(w, h), h)),
    "inverse_permutation": ("written with the inverse permutation (GGUF -> HF applied instead of HF -> GGUF)",
                            lambda w, h, hq: unpermute_qk(w, h)),
    "k_permuted_with_query_heads": ("K permuted with the query head count instead of the KV head count",
                                    lambda w, h, hq: permute_qk(w, hq)),
}


@dataclass
class Report:
    gguf: str
    hf: str
    tensors: list[dict] = field(default_factory=list)
    metadata: list[dict] = field(default_factory=list)
    tied: dict = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)  # one line each, in file order
    not_checked: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return "differs" if self.mismatches else "equal"

    def as_dict(self) -> dict:
        return {"gguf": self.gguf, "hf": self.hf, "status": self.status, "mismatches": self.mismatches,
                "not_checked": self.not_checked, "tied": self.tied, "metadata": self.metadata,
                "tensors": self.tensors,
                "counts": {"tensors": len(self.tensors),
                           "tensors_equal": sum(t["status"] == "equal" for t in self.tensors),
                           "metadata": len(self.metadata),
                           "metadata_equal": sum(m["status"] == "equal" for m in self.metadata)}}


# ---------------------------------------------------------------------------
# Values


def rounding_bound(hf: np.ndarray, type_name: str) -> np.ndarray:
    """The largest |gguf - hf| that writing `hf` (float64, rows x K) as `type_name` allows, per element."""
    a = np.abs(hf)
    if type_name == "F32":
        return np.zeros_like(a)  # HF's f32/f16/bf16 values are all f32 values: written exactly
    if type_name == "F16":
        return np.maximum(a * F16_HALF_ULP, F16_MIN_HALF_STEP)
    if type_name == "BF16":
        return np.maximum(a * BF16_HALF_ULP, BF16_MIN_HALF_STEP)
    rows, k = a.shape
    blocks = (rows, k // QBLOCK, QBLOCK)
    if type_name in QUANT_LEVELS:
        levels, steps = QUANT_LEVELS[type_name]
        d = a.reshape(blocks).max(axis=-1, keepdims=True) / levels
        bound = d * steps
    elif type_name == "Q4_1":
        b = hf.reshape(blocks)
        lo, hi = b.min(axis=-1, keepdims=True), b.max(axis=-1, keepdims=True)
        bound = (hi - lo) / 15.0 * (0.5 + 15 * F16_HALF_ULP) + np.abs(lo) * F16_HALF_ULP
    else:
        raise ValueError(type_name)
    # 1e-4 of slack: ggml's quantizer multiplies by 1/d in float32 (a tie may round either way,
    # ~127 * 2^-23 of a step), the bound is computed in float64
    return np.broadcast_to(bound * (1 + 1e-4) + 1e-30, blocks).reshape(rows, k)


def _excess(gguf_rows: np.ndarray, hf_rows: np.ndarray, type_name: str) -> tuple[int, float, int]:
    """(elements over the bound, the worst |diff| / bound, flat index of the first over), chunked by rows."""
    over, worst, first = 0, 0.0, -1
    k = hf_rows.shape[1]
    for start in range(0, hf_rows.shape[0], ROW_CHUNK):
        h = hf_rows[start:start + ROW_CHUNK].astype(np.float64)
        g = gguf_rows[start:start + ROW_CHUNK].astype(np.float64)
        diff = np.abs(g - h)
        bound = rounding_bound(h, type_name)
        bad = ~(diff <= bound)  # NaN counts as over
        n = int(bad.sum())
        if n:
            if first < 0:
                first = start * k + int(np.flatnonzero(bad)[0])
            over += n
        ratio = np.where(bound > 0, diff / np.where(bound > 0, bound, 1.0), np.where(diff > 0, np.inf, 0.0))
        worst = max(worst, float(np.nanmax(ratio)) if ratio.size else 0.0)
    return over, worst, first


def _as_matrix(w: np.ndarray) -> np.ndarray:
    return w.reshape(1, -1) if w.ndim == 1 else w.reshape(w.shape[0], -1)


# ---------------------------------------------------------------------------
# The HF side


def _hf_tensors(hf_dir: Path) -> dict:
    """HF name -> a lazy mx array (mx.load reads bfloat16, which numpy's safetensors loader cannot)."""
    import mlx.core as mx

    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"--hf {hf_dir}: no *.safetensors file there (a Hugging Face checkpoint directory?)")
    out = {}
    for f in files:
        try:
            out.update(mx.load(str(f)))
        except (RuntimeError, ValueError) as e:
            raise UserError(f"--hf {f}: not a readable safetensors file ({e})") from None
    return out


def _to_numpy(x) -> np.ndarray:
    import mlx.core as mx

    return np.array(x.astype(mx.float32) if x.dtype == mx.bfloat16 else x)


def _hf_json(hf_dir: Path, name: str) -> dict | None:
    path = hf_dir / name
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"--hf {path}: not readable JSON ({e})") from None
    return data if isinstance(data, dict) else None


# ---------------------------------------------------------------------------
# Metadata


def _f32(x) -> float:
    return float(np.float32(x))


def _metadata(report: Report, header, config, hf_dir: Path, n_tokens: int | None) -> None:
    raw = _hf_json(hf_dir, "config.json") or {}
    tok_cfg = _hf_json(hf_dir, "tokenizer_config.json")
    rope_scaling = raw.get("rope_scaling") or {}
    linear = rope_scaling.get("rope_type", rope_scaling.get("type")) == "linear"
    hf_factor = float(rope_scaling.get("factor", 1.0)) if linear else 1.0
    gguf_factor = (header_value(header, "llama.rope.scaling.factor") or header_value(header, "llama.rope.scale_linear")
                   or 1.0)
    rows = [  # (what, GGUF key, GGUF value, HF source, HF value, compare as)
        ("layers", "llama.block_count", header_value(header, "llama.block_count"),
         "num_hidden_layers", config.num_hidden_layers, "int"),
        ("heads", "llama.attention.head_count", header_value(header, "llama.attention.head_count"),
         "num_attention_heads", config.num_attention_heads, "int"),
        ("kv heads", "llama.attention.head_count_kv", header_value(header, "llama.attention.head_count_kv"),
         "num_key_value_heads", config.num_key_value_heads, "int"),
        ("head size", "llama.attention.key_length", header_value(header, "llama.attention.key_length"),
         "head_dim", config.head_dim, "int"),
        ("rope dims", "llama.rope.dimension_count", header_value(header, "llama.rope.dimension_count"),
         "head_dim", config.head_dim, "int"),
        ("hidden size", "llama.embedding_length", header_value(header, "llama.embedding_length"),
         "hidden_size", config.hidden_size, "int"),
        ("MLP size", "llama.feed_forward_length", header_value(header, "llama.feed_forward_length"),
         "intermediate_size", config.intermediate_size, "int"),
        ("rope theta", "llama.rope.freq_base", header_value(header, "llama.rope.freq_base"),
         "rope_theta", config.rope_theta, "f32"),
        ("rope scaling factor", "llama.rope.scaling.factor", gguf_factor, "rope_scaling", hf_factor, "f32"),
        ("RMSNorm eps", "llama.attention.layer_norm_rms_epsilon",
         header_value(header, "llama.attention.layer_norm_rms_epsilon"), "rms_norm_eps", config.rms_norm_eps, "f32"),
        ("vocab (llama.vocab_size)", "llama.vocab_size", header_value(header, "llama.vocab_size"),
         "vocab_size", config.vocab_size, "int"),
        ("vocab (tokenizer tokens)", "tokenizer.ggml.tokens", n_tokens, "vocab_size", config.vocab_size, "int"),
        ("context", "llama.context_length", header_value(header, "llama.context_length"),
         "max_position_embeddings", config.max_position_embeddings, "int"),
        ("BOS id", "tokenizer.ggml.bos_token_id", header_value(header, "tokenizer.ggml.bos_token_id"),
         "bos_token_id", raw.get("bos_token_id"), "int"),
        ("EOS id", "tokenizer.ggml.eos_token_id", header_value(header, "tokenizer.ggml.eos_token_id"),
         "eos_token_id", raw.get("eos_token_id"), "int"),
        ("add_bos_token", "tokenizer.ggml.add_bos_token", header_value(header, "tokenizer.ggml.add_bos_token"),
         "tokenizer_config.json add_bos_token", (tok_cfg or {}).get("add_bos_token"), "bool"),
    ]
    for what, gkey, gval, hkey, hval, kind in rows:
        row = {"what": what, "gguf_key": gkey, "gguf": gval, "hf_key": hkey, "hf": hval}
        if gval is None or hval is None:
            side = "the GGUF has no " + gkey if gval is None else f"the HF checkpoint has no {hkey}"
            row.update(status="not_checked", note=side)
            report.not_checked.append(f"metadata {what}: {side}")
        else:
            if kind == "f32":
                same = _f32(gval) == _f32(hval)
            elif kind == "bool":
                same = bool(gval) == bool(hval)
            else:
                same = int(gval) == int(hval)
            row["status"] = "equal" if same else "differs"
            if not same:
                report.mismatches.append(f"metadata {what}: GGUF {gkey} = {gval}, HF {hkey} = {hval}")
        report.metadata.append(row)


# ---------------------------------------------------------------------------
# Tensors


def _check_tensor(report: Report, gname: str, hname: str, info, buf, hf_arrays: dict, config) -> None:
    row = {"gguf": gname, "hf": hname, "type": info.type_name, "shape": list(info.shape)}
    report.tensors.append(row)
    h = _to_numpy(hf_arrays[hname])
    if tuple(h.shape) != tuple(info.shape):
        row.update(status="differs", detail=f"shape {list(info.shape)} in the GGUF, {list(h.shape)} in HF")
        report.mismatches.append(f"tensor {gname} ({hname}): {row['detail']}")
        return
    if info.type_name not in CHECKED_TYPES:
        row.update(status="not_checked", detail=f"no rounding bound for type {info.type_name} (checked: "
                                                 f"{', '.join(CHECKED_TYPES)}); names and shapes only")
        report.not_checked.append(f"tensor {gname}: values of type {info.type_name} not checked")
        return
    g = _as_matrix(np.array(_from_numpy(info, buf)).astype(np.float32))
    h = _as_matrix(h)
    heads = (config.num_attention_heads if hname.endswith("q_proj.weight")
             else config.num_key_value_heads if hname.endswith("k_proj.weight") else 0)
    # (K with the query head count is a layout of its own only where the two counts differ)
    layouts = [k for k in QK_LAYOUTS
               if heads and (k != "k_permuted_with_query_heads" or heads != config.num_attention_heads)]
    expected = QK_LAYOUTS["permuted"][1](h, heads, config.num_attention_heads) if heads else h
    over, worst, first = _excess(g, expected, info.type_name)
    row.update(worst_ratio=worst, over=over, n=int(h.size))
    if heads:
        row["layout"] = "permuted"
    if over == 0:
        row["status"] = "equal"
        return
    row["status"] = "differs"
    for layout in layouts[1:]:
        words, fn = QK_LAYOUTS[layout]
        try:
            candidate = fn(h, heads, config.num_attention_heads)
        except ValueError:  # rows not divisible by that head count: not a layout this tensor can have
            continue
        if _excess(g, candidate, info.type_name)[0] == 0:
            row.update(layout=layout, detail=words)
            report.mismatches.append(f"tensor {gname} ({hname}): {words}: its values match HF's in that row order")
            return
    rows_, cols = h.shape
    r, c = divmod(first, cols)
    if heads:
        row["layout"] = None  # none of the known layouts fits: the values themselves differ
    row.update(detail=f"{over} of {h.size} values beyond the {info.type_name} rounding (worst {worst:.3g}x its bound; "
                      f"first at [{r}, {c}]: GGUF {g[r, c]:.6g}, HF {expected[r, c]:.6g})")
    report.mismatches.append(f"tensor {gname} ({hname}): {row['detail']}")


def _tied(report: Report, tensors: dict, hf_arrays: dict, hf_tied: bool) -> None:
    """llama.cpp uses token_embd as the LM head when output.weight is absent."""
    g_has = "output.weight" in tensors
    h_has = "lm_head.weight" in hf_arrays
    report.tied = {"gguf_output_weight": g_has, "hf_lm_head": h_has, "hf_tie_word_embeddings": hf_tied}
    if not g_has and h_has and not hf_tied:
        embed, head = _to_numpy(hf_arrays["model.embed_tokens.weight"]), _to_numpy(hf_arrays["lm_head.weight"])
        if embed.shape == head.shape and np.array_equal(embed, head):
            report.tied["status"] = "equal"
            report.tied["note"] = "the GGUF ties the LM head to token_embd; HF's lm_head equals its embedding"
            return
        report.tied["status"] = "differs"
        report.mismatches.append("tied weights: the GGUF has no output.weight, so llama.cpp uses token_embd as the LM "
                                 "head, but the HF checkpoint has its own lm_head.weight (tie_word_embeddings false) "
                                 "with other values")
        return
    if not g_has and not h_has and not hf_tied:
        report.tied["status"] = "not_checked"
        report.not_checked.append("tied weights: the HF config says tie_word_embeddings false but the checkpoint "
                                  "has no lm_head.weight")
        return
    if g_has and (hf_tied or not h_has):
        report.tied["status"] = "checked_as_tensor"
        report.tied["note"] = ("the GGUF stores output.weight; the HF checkpoint ties it to the embedding: "
                               "compared with it")
        return
    report.tied["status"] = "equal"


def check_gguf(gguf_path, hf_dir) -> Report:
    """Every check of a GGUF against its HF checkpoint (UserError: a file that cannot be read)."""
    gguf_path, hf_dir = Path(gguf_path), Path(hf_dir)
    if not gguf_path.is_file():
        raise UserError(f"--gguf {gguf_path}: no such file")
    if not hf_dir.is_dir() or not (hf_dir / "config.json").is_file():
        raise UserError(f"--hf {hf_dir}: not a Hugging Face checkpoint directory (no config.json)")
    config = load_config(hf_dir)
    hf_arrays = _hf_tensors(hf_dir)
    header, buf = open_gguf(gguf_path)
    try:
        _require_llama(header, gguf_path)
        report = Report(gguf=str(gguf_path), hf=str(hf_dir))
        tokens = header_value(header, "tokenizer.ggml.tokens")
        _metadata(report, header, config, hf_dir, len(tokens) if tokens is not None else None)
        tensors = header.tensors
        expected = config.weight_shapes()  # HF names the config implies
        hf_tied = bool(config.tie_word_embeddings)
        mapped = {}
        for gname in tensors:
            h = hf_name(gname)
            if h is None:
                report.mismatches.append(f"tensor {gname}: a GGUF tensor with no HF counterpart "
                                         "(not a Llama weight this tool maps)")
                report.tensors.append({"gguf": gname, "hf": None, "type": tensors[gname].type_name,
                                       "shape": list(tensors[gname].shape), "status": "unmapped"})
            else:
                mapped[h] = gname
        wanted = list(expected) + (["lm_head.weight"] if "output.weight" in tensors and "lm_head.weight" not in expected
                                   else [])
        for hname in wanted:
            gname = mapped.get(hname)
            source = hname
            if hname == "lm_head.weight" and hname not in hf_arrays and (hf_tied or "lm_head.weight" not in expected):
                source = "model.embed_tokens.weight"  # a tied checkpoint: output.weight is the embedding
            if gname is None:
                if hname == "lm_head.weight":
                    continue  # judged by _tied
                report.mismatches.append(f"tensor {hname}: missing from the GGUF")
                report.tensors.append({"gguf": None, "hf": hname, "status": "missing_in_gguf"})
                continue
            if source not in hf_arrays:
                report.mismatches.append(f"tensor {gname}: {source} is missing from the HF checkpoint")
                report.tensors.append({"gguf": gname, "hf": source, "status": "missing_in_hf"})
                continue
            _check_tensor(report, gname, source, tensors[gname], buf, hf_arrays, config)
        _tied(report, tensors, hf_arrays, hf_tied)
        extra_hf = sorted(n for n in hf_arrays if n not in expected and n != "lm_head.weight"
                          and not n.endswith("rotary_emb.inv_freq"))
        for n in extra_hf:
            report.not_checked.append(f"tensor {n}: in the HF checkpoint, not a Llama weight this tool maps")
        return report
    finally:
        buf.close()


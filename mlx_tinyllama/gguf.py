"""Load a llama.cpp GGUF checkpoint as HF-named MLX weights, a ModelConfig and a
SentencePiece tokenizer.

Two things make a GGUF differ from a Hugging Face directory:

* Names and config: `blk.N.attn_q.weight` instead of `model.layers.N.self_attn.q_proj.weight`,
  `llama.*` metadata instead of config.json.
* The Q/K layout. llama.cpp's converter permutes the rows of `attn_q` / `attn_k`
  within each head so that its interleaved-pair RoPE (rotating rows 2i, 2i+1)
  computes what transformers' rotate-half RoPE computes on rows i, i + D/2:

      GGUF row  h*D + 2*i + j   holds   HF row  h*D + j*(D/2) + i      (i < D/2, j in {0, 1})

  We undo it per head (for K with the number of KV heads), so that the taps
  `attn.q` / `attn.k` mean the same thing as for an HF checkpoint.

Weights go through `mx.load` (MLX reads GGUF natively: F32, F16, BF16, and Q8_0 /
Q4_0 / Q4_1 as weight/scales/biases triplets with group size 32) and are
dequantized with `mx.dequantize` in float32, which reproduces ggml's dequantization
bit for bit. A file with any other type (Q5_x, K-quants) is read with numpy and
gguf-py's reference dequantizer instead: mx.load fails on Q5_x, and its K-quant
conversion (to float16) disagreed with gguf-py's in our checks.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from .architectures import ARCHITECTURES, Architecture
from .config import ModelConfig
from .dtypes import canonical
from .errors import UserError
from .gguf_header import TensorInfo, header_value, meta, open_gguf

QK_LAYOUT = "llama.cpp interleaved-pair layout, un-permuted per head to HF rotate-half"

# Types MLX's GGUF reader returns as dense arrays or affine-quantized triplets.
_MLX_DENSE = {"F32", "F16", "BF16"}
_MLX_AFFINE = {"Q8_0": 8, "Q4_0": 4, "Q4_1": 4}
# Types dequantized with gguf-py's numpy reference implementation.
_GGUF_PY = {"Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
SUPPORTED_TYPES = tuple(sorted(_MLX_DENSE | set(_MLX_AFFINE) | _GGUF_PY))

# GGUF tensor name -> HF parameter name ("{i}" is the layer index).
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


@dataclass
class GGUFCheckpoint:
    config: ModelConfig
    weights: dict[str, mx.array]  # HF names, requested dtype, Q/K in HF (rotate-half) layout
    info: dict = field(default_factory=dict)  # format, version, tensor types, Q/K layout


# Llama 3's RoPE scaling, as llama.cpp's converter writes it: one divisor per frequency.
ROPE_FREQS = "rope_freqs.weight"


def hf_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight` (and `.bias`: Qwen2's
    q/k/v); None if unknown."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] in ("weight", "bias"):
        if parts[2] in _LAYER_NAMES:
            return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def is_gguf(path) -> bool:
    """A file that starts with GGUF's magic bytes (whatever its name ends with)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:  # a directory, or unreadable: not a GGUF file
        return False


def permute_qk(w, n_heads: int):
    """llama.cpp's permutation (HF rotate-half rows -> interleaved pairs), per head.

    Works on numpy and mx arrays of shape [n_heads * D, in]."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w, n_heads: int):
    """The inverse of `permute_qk`: interleaved pairs -> HF rotate-half rows."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------
# Reading


def _to_dtype(dtype) -> mx.Dtype:
    if isinstance(dtype, str):
        if canonical(dtype) not in _DTYPES:
            raise UserError(f"unknown dtype {dtype!r}; use one of float32, float16, bfloat16")
        return _DTYPES[canonical(dtype)]
    return dtype


def _architecture(header, path) -> Architecture:
    """The architecture a GGUF's general.architecture names. llama.cpp's converter writes
    Mistral as 'llama' (without its sliding window: llama.cpp then attends to every earlier key,
    and so does this tool's model of that file)."""
    arch = header_value(header, "general.architecture")
    found = next((a for a in ARCHITECTURES.values() if a.gguf_arch == arch), None)
    if found is None:
        raise UserError(
            f"{path}: general.architecture is {arch!r}; this tool runs "
            + ", ".join(sorted({a.gguf_arch for a in ARCHITECTURES.values()})) + " GGUFs"
        )
    return found


def _config(header, path, tensors: dict, freq_factors: tuple = ()) -> ModelConfig:
    arch = _architecture(header, path)
    prefix = arch.gguf_arch

    def get(key, default=None, required=False, kind=int):
        return meta(header, path, f"{prefix}.{key}", kind, default, required)

    if "token_embd.weight" not in tensors:
        raise UserError(f"{path} has no token_embd.weight tensor")
    hidden = get("embedding_length", required=True)
    n_heads = get("attention.head_count", required=True)
    for key, v in (("embedding_length", hidden), ("attention.head_count", n_heads)):
        if v < 1:  # divided by below
            raise UserError(f"{path}: GGUF metadata {prefix}.{key} is {v}; expected a positive integer")
    n_kv = get("attention.head_count_kv", n_heads)
    head_dim = get("attention.key_length", hidden // n_heads)
    rope_dim = get("rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise UserError(f"{path}: rope.dimension_count {rope_dim} != head_dim {head_dim} (partial RoPE is not Llama)")
    scaling = header_value(header, f"{prefix}.rope.scaling.type")
    factor = get("rope.scaling.factor", 0.0, kind=float) or get("rope.scale_linear", 0.0, kind=float) or 1.0
    if scaling in (None, "none") and factor == 1.0:
        rope_type = "default"
    elif scaling in (None, "linear"):
        rope_type = "linear"
    else:
        raise UserError(f"{path}: unsupported RoPE scaling {scaling!r}; this tool runs default and linear RoPE")
    # The embedding's row count is the vocabulary the model computes logits over.
    vocab = int(tensors["token_embd.weight"].shape[0])
    # No metadata says a Llama has attention biases (attention_bias): llama.cpp loads the bias
    # tensors where the file has them, so their presence is the fact (a partial set is then a
    # shape mismatch, named by load_gguf).
    attention_bias = bool(arch.bias_key) and any(
        n.startswith("blk.") and n.endswith((".attn_q.bias", ".attn_output.bias")) for n in tensors)
    try:
        return ModelConfig(
            architecture=arch.hf_class,
            model_type=arch.model_type,
            rope_freq_factors=freq_factors,
            hidden_size=hidden,
            intermediate_size=get("feed_forward_length", required=True),
            num_hidden_layers=get("block_count", required=True),
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv,
            vocab_size=vocab,
            rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5, kind=float),
            rope_theta=get("rope.freq_base", 10000.0, kind=float),
            rope_type=rope_type,
            rope_factor=factor if rope_type == "linear" else 1.0,
            max_position_embeddings=get("context_length", 2048),
            tie_word_embeddings="output.weight" not in tensors,
            attention_bias=attention_bias,
            head_dim=head_dim,
            bos_token_id=meta(header, path, "tokenizer.ggml.bos_token_id", int, 1),
            eos_token_id=meta(header, path, "tokenizer.ggml.eos_token_id", int, 2),
        )
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def _from_mlx(name: str, ttype: str, mlx_arrays: dict) -> mx.array:
    """One tensor from mx.load's result, float32 (float16/bfloat16 kept: they are exact)."""
    if ttype in _MLX_DENSE:
        return mlx_arrays[name]
    prefix = name[: -len(".weight")] if name.endswith(".weight") else name
    # float32 scales/biases: in float16, scale*q + bias would round; in float32 it
    # equals ggml's d*q (+ m) exactly.
    return mx.dequantize(
        mlx_arrays[name],
        mlx_arrays[prefix + ".scales"].astype(mx.float32),
        mlx_arrays[prefix + ".biases"].astype(mx.float32),
        group_size=32,
        bits=_MLX_AFFINE[ttype],
    )


def _from_numpy(tensor: TensorInfo, buf) -> mx.array:
    """One tensor read from the mapped file and dequantized by gguf-py's reference code."""
    import gguf

    qtype = gguf.GGMLQuantizationType(tensor.type_id)
    if tensor.type_name in ("F32", "F16"):
        dt = np.dtype("<f4" if tensor.type_name == "F32" else "<f2")
        return mx.array(np.frombuffer(buf, dt, count=tensor.n_bytes // dt.itemsize, offset=tensor.offset)
                        .reshape(tensor.shape))
    raw = np.frombuffer(buf, dtype=np.uint8, count=tensor.n_bytes, offset=tensor.offset)
    raw = raw.reshape(gguf.quants.quant_shape_to_byte_shape(tensor.shape, qtype))
    return mx.array(gguf.quants.dequantize(raw, qtype).astype(np.float32))


def read_config(path) -> ModelConfig:
    """The model config from a GGUF's metadata, without reading its tensors."""
    path = Path(path)
    header, buf = open_gguf(path)
    try:
        return _config(header, path, header.tensors, _freq_factors(header, path, buf))
    finally:
        buf.close()


def load_gguf(path, dtype=mx.float16) -> GGUFCheckpoint:
    """Read a Llama GGUF: config from `llama.*` metadata, weights under HF names in `dtype`
    (dequantized), Q/K rows un-permuted to the HF layout."""
    dtype = _to_dtype(dtype)
    path = Path(path)
    header, buf = open_gguf(path)
    arch = _architecture(header, path)
    tensors = {n: t for n, t in header.tensors.items() if n != ROPE_FREQS}  # not a weight: the config's
    unknown = [n for n in tensors if hf_name(n) is None]
    if unknown:
        raise UserError(f"{path} holds tensors this Llama loader does not know: {', '.join(unknown[:8])}")
    types = {n: t.type_name for n, t in tensors.items()}
    bad = sorted({ty for ty in types.values() if ty not in SUPPORTED_TYPES})
    if bad:
        raise UserError(
            f"{path} uses the tensor type(s) {', '.join(bad)}, which this tool cannot dequantize; "
            f"supported: {', '.join(SUPPORTED_TYPES)}"
        )
    config = _config(header, path, tensors, _freq_factors(header, path, buf))
    expected = config.weight_shapes()
    mapped = {hf_name(n): n for n in tensors}
    missing = [n for n in expected if n not in mapped]
    extra = [n for n in mapped if n not in expected]
    if missing or extra:
        raise UserError(
            f"{path} does not match its own metadata ({config.num_hidden_layers} layers"
            f"{', tied embeddings' if config.tie_word_embeddings else ''}): "
            + (f"missing {', '.join(missing[:6])}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"unexpected {', '.join(extra[:6])}" if extra else "")
        )

    # mx.load when MLX reads every tensor type natively; otherwise (it fails on Q5_x and
    # its K-quant conversion disagreed with ggml's reference) everything from numpy.
    native = all(ty in _MLX_DENSE or ty in _MLX_AFFINE for ty in types.values())
    if native:
        try:
            mlx_arrays = mx.load(str(path))
        except (RuntimeError, ValueError) as e:
            raise UserError(f"MLX cannot read {path}: {e}") from None

    weights: dict[str, mx.array] = {}
    for hf, gname in mapped.items():
        w = _from_mlx(gname, types[gname], mlx_arrays) if native else _from_numpy(tensors[gname], buf)
        if tuple(w.shape) != expected[hf]:
            raise UserError(f"{path}: tensor {gname} has shape {tuple(w.shape)}, expected {expected[hf]} for {hf}")
        if arch.gguf_permutes_qk and (hf.endswith("q_proj.weight") or hf.endswith("q_proj.bias")):
            w = unpermute_qk(w, config.num_attention_heads)
        elif arch.gguf_permutes_qk and (hf.endswith("k_proj.weight") or hf.endswith("k_proj.bias")):
            w = unpermute_qk(w, config.num_key_value_heads)
        weights[hf] = w.astype(dtype)
    mx.eval(list(weights.values()))
    mlx_arrays = None
    buf.close()

    file_type = header_value(header, "general.file_type")
    try:
        import gguf

        file_type_name = gguf.LlamaFileType(file_type).name if file_type is not None else None
    except ValueError:
        file_type_name = str(file_type)
    info = {
        "format": "GGUF",
        "path": str(path),
        "gguf_version": int(header_value(header, "GGUF.version")),
        "name": header_value(header, "general.name"),
        "file_type": file_type_name,
        "tensor_types": dict(sorted(Counter(types.values()).items())),
        "qk_layout": QK_LAYOUT if arch.gguf_permutes_qk else "as Hugging Face (this architecture's GGUF is not permuted)",
        "read_by": "mx.load + mx.dequantize" if native else "gguf-py reference dequantizer",
        "tied_embeddings": config.tie_word_embeddings,
        "add_bos_token": header_value(header, "tokenizer.ggml.add_bos_token"),  # llama.cpp adds BOS when true
        "dtype": str(dtype).replace("mlx.core.", ""),
    }
    info["layout"] = describe(info)  # the line sources.ModelSource.describe() shows in a run's output
    return GGUFCheckpoint(config=config, weights=weights, info=info)


def _freq_factors(header, path, buf) -> tuple:
    """Llama 3's per-frequency RoPE divisors from the `rope_freqs` tensor, or () when there is none."""
    t = header.tensors.get(ROPE_FREQS)
    if t is None:
        return ()
    if t.type_name != "F32" or len(t.shape) != 1:
        raise UserError(f"{path}: {ROPE_FREQS} is {t.type_name} {list(t.shape)}; llama.cpp writes one F32 row")
    values = np.frombuffer(buf, "<f4", count=int(t.shape[0]), offset=t.offset)
    if not np.all(np.isfinite(values)) or not np.all(values > 0):
        raise UserError(f"{path}: {ROPE_FREQS} holds a non-positive or non-finite divisor")
    return tuple(float(v) for v in values)


def describe(info: dict) -> str:
    """One line for a run's output: format, version, tensor types, Q/K layout."""
    types = ", ".join(f"{k}×{v}" for k, v in info["tensor_types"].items())
    return f"GGUF v{info['gguf_version']} ({types}); Q/K: {info['qk_layout']}"


# ---------------------------------------------------------------------------
# Tokenizer


def tokenizer_model_proto(path) -> bytes:
    """A serialized SentencePiece ModelProto rebuilt from `tokenizer.ggml.*` metadata.

    The Llama tokenizer is a SentencePiece BPE model with byte fallback and an
    identity normalizer that adds a dummy "▁" prefix; with the pieces, scores and
    types copied from the GGUF, it encodes exactly like the original tokenizer.model.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    path = Path(path)
    header, buf = open_gguf(path)
    buf.close()
    model = header_value(header, "tokenizer.ggml.model")
    if model is None or header_value(header, "tokenizer.ggml.tokens") is None:
        raise UserError(f"{path} carries no tokenizer (no tokenizer.ggml.model / tokenizer.ggml.tokens)")
    if model != "llama":
        raise UserError(
            f"{path}: tokenizer.ggml.model is {model!r}; only the SentencePiece 'llama' tokenizer "
            "(TinyLlama, Llama 2) can be rebuilt from GGUF metadata"
        )
    tokens = header_value(header, "tokenizer.ggml.tokens")
    n = len(tokens)
    scores = header_value(header, "tokenizer.ggml.scores") or [0.0] * n
    types = header_value(header, "tokenizer.ggml.token_type") or [1] * n
    if len(scores) != n or len(types) != n:
        raise UserError(f"{path}: {n} tokens but {len(scores)} scores and {len(types)} token types")
    # Typed before use: a string where a score or type belongs would otherwise surface as a traceback.
    for key, values, kinds in (("tokens", tokens, (str,)), ("scores", scores, (int, float)),
                               ("token_type", types, (int,))):
        if not isinstance(values, list) or not all(isinstance(v, kinds) and not isinstance(v, bool) for v in values):
            raise UserError(f"{path}: tokenizer.ggml.{key} is not a list of "
                            f"{'strings' if kinds == (str,) else 'numbers'}")

    proto = pb.ModelProto()
    valid_types = {v.number for v in pb.ModelProto.SentencePiece.Type.DESCRIPTOR.values}
    for piece, score, ttype in zip(tokens, scores, types):
        sp = proto.pieces.add()
        sp.piece = piece
        sp.score = float(score)
        # gguf's TokenType numbers are sentencepiece's (NORMAL=1 ... BYTE=6).
        sp.type = int(ttype) if int(ttype) in valid_types else pb.ModelProto.SentencePiece.NORMAL

    def tok_id(key, default):
        v = header_value(header, key, default)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise UserError(f"{path}: {key} is {v!r}; expected an integer token id")
        return -1 if v is None or not (0 <= v < n) else v

    ts = proto.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = n
    ts.byte_fallback = any(int(t) == pb.ModelProto.SentencePiece.BYTE for t in types)
    ts.unk_id = tok_id("tokenizer.ggml.unknown_token_id", 0)
    ts.bos_id = tok_id("tokenizer.ggml.bos_token_id", 1)
    ts.eos_id = tok_id("tokenizer.ggml.eos_token_id", 2)
    ts.pad_id = tok_id("tokenizer.ggml.padding_token_id", None)
    for attr, idx in (("unk_piece", ts.unk_id), ("bos_piece", ts.bos_id), ("eos_piece", ts.eos_id),
                      ("pad_piece", ts.pad_id)):
        if idx >= 0:
            setattr(ts, attr, tokens[idx])
    ns = proto.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = bool(header_value(header, "tokenizer.ggml.add_space_prefix", True))
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    return proto.SerializeToString()

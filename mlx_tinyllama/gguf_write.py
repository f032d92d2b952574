"""Write a GGUF from a Hugging Face Llama directory, the way llama.cpp's
convert_hf_to_gguf.py does for Llama: `llama.*` metadata, the SentencePiece
vocabulary as `tokenizer.ggml.*`, and Q/K rows permuted per head for llama.cpp's
interleaved-pair RoPE.

It exists so tests can build GGUF files from synthetic models; `permute="none"` and
`permute="twice"` write deliberately wrong files, to prove that a wrong Q/K layout
is detected. `scripts/hf_to_gguf.py` is the command-line front end.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from .chat_template import own_template
from .config import ModelConfig, load_config
from .errors import UserError
from .outputs import atomic_path
from .gguf import _GLOBAL_NAMES, _LAYER_NAMES, permute_qk

OUT_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1", "q5_0")  # the quantized ones: gguf-py's reference quantizers
PERMUTE_MODES = ("once", "none", "twice")


def _gguf_names(config: ModelConfig) -> dict[str, str]:
    """HF parameter name -> GGUF tensor name, in llama.cpp's file order."""
    inverse = {v: k for k, v in _GLOBAL_NAMES.items()}
    names = {"model.embed_tokens.weight": "token_embd.weight"}
    biases = {"attn_q", "attn_k", "attn_v"} if config.qkv_bias else set()
    biases |= {"attn_output"} if config.o_bias else set()
    for n in range(config.num_hidden_layers):
        for g, h in _LAYER_NAMES.items():
            names[f"model.layers.{n}.{h}.weight"] = f"blk.{n}.{g}.weight"
            if g in biases:
                names[f"model.layers.{n}.{h}.bias"] = f"blk.{n}.{g}.bias"
    names["model.norm.weight"] = inverse["model.norm.weight"]
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = inverse["lm_head.weight"]
    return names


def _read_safetensors(hf_dir: Path) -> dict[str, np.ndarray]:
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{hf_dir} has no *.safetensors file")
    out: dict[str, np.ndarray] = {}
    for f in files:
        # mx.load reads bfloat16, which numpy's safetensors loader cannot.
        for k, v in mx.load(str(f)).items():
            out[k] = np.array(v.astype(mx.float32) if v.dtype == mx.bfloat16 else v)
    return out


def _add_tokenizer(writer, tokenizer_path: Path, vocab_size: int) -> None:
    import gguf
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(tokenizer_path.read_bytes())
    tokens = [p.piece.encode("utf-8") for p in proto.pieces]
    scores = [p.score for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]  # sentencepiece's numbers are gguf's TokenType
    # An embedding larger than the vocabulary gets padding tokens, as llama.cpp does.
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    ts = proto.trainer_spec
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(ts.bos_id)
    writer.add_eos_token_id(ts.eos_id)
    writer.add_unk_token_id(ts.unk_id)
    if ts.pad_id >= 0:
        writer.add_pad_token_id(ts.pad_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)


def llama3_rope_factors(config: ModelConfig) -> np.ndarray:
    """Llama 3's RoPE scaling as per-frequency divisors, computed as llama.cpp's converter does
    (in float64 from its float32 frequencies, stored as float32)."""
    dim, base = config.head_dim, config.rope_theta
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)).astype(np.float64))
    low = config.rope_original_max_position / config.rope_low_freq_factor
    high = config.rope_original_max_position / config.rope_high_freq_factor
    out = []
    for f in freqs.astype(np.float32).astype(np.float64):
        wavelen = 2 * np.pi / f
        if wavelen < high:
            out.append(1.0)
        elif wavelen > low:
            out.append(config.rope_factor)
        else:
            smooth = (config.rope_original_max_position / wavelen - config.rope_low_freq_factor) / (
                config.rope_high_freq_factor - config.rope_low_freq_factor)
            out.append(1 / ((1 - smooth) / config.rope_factor + smooth))
    return np.array(out, np.float32)


def convert(hf_dir, out_path, out_type: str = "f16", permute: str = "once") -> dict:
    """Write `out_path` (GGUF) from `hf_dir`. out_type: f32 | f16 | q8_0 | q4_0 | q4_1 | q5_0
    (1-D norms stay F32, and a matrix whose row length is not a multiple of the block size
    falls back to F16, as in llama.cpp). permute: once (correct) | none | twice (deliberately wrong files).
    Returns {gguf tensor name: type name written}."""
    import gguf

    if out_type not in OUT_TYPES:
        raise UserError(f"unknown output type {out_type!r}; use one of {', '.join(OUT_TYPES)}")
    if permute not in PERMUTE_MODES:
        raise UserError(f"unknown permute mode {permute!r}; use one of {', '.join(PERMUTE_MODES)}")
    hf_dir = Path(hf_dir)
    config = load_config(hf_dir)
    tensors = _read_safetensors(hf_dir)
    names = _gguf_names(config)
    missing = [n for n in names if n not in tensors]
    if missing:
        raise UserError(f"{hf_dir} lacks the weights {', '.join(missing[:6])}")

    file_type = gguf.LlamaFileType.ALL_F32 if out_type == "f32" else gguf.LlamaFileType[f"MOSTLY_{out_type.upper()}"]
    qtype = gguf.GGMLQuantizationType[out_type.upper()] if out_type.startswith("q") else None
    with atomic_path(out_path, suffix=".gguf") as tmp:  # an interrupted conversion leaves no half GGUF
        return _write(gguf, tmp, hf_dir, config, tensors, names, file_type, qtype, out_type, permute)


def _write(gguf, out_path, hf_dir, config, tensors, names, file_type, qtype, out_type, permute) -> dict[str, str]:
    arch = config.arch
    writer = gguf.GGUFWriter(str(out_path), arch.gguf_arch)
    writer.add_name(hf_dir.name)
    writer.add_file_type(int(file_type))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    if arch.gguf_arch == "llama":  # llama.cpp's converter writes it for llama, not for qwen2
        writer.add_rope_dimension_count(config.head_dim)
    # Always written, as llama.cpp's converter does: readers need not derive head_dim.
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    if config.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_factor)
    if arch.gguf_arch == "llama":  # llama.cpp's converter writes it for llama, not for qwen2
        writer.add_vocab_size(config.vocab_size)
    # llama.cpp refuses quantized tensors from files without it; its converter always writes it.
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tok = hf_dir / "tokenizer.model"
    if tok.is_file():
        _add_tokenizer(writer, tok, config.vocab_size)
    template = own_template(hf_dir)  # copied as llama.cpp's converter does; none is invented
    if template is not None:
        writer.add_chat_template(template)

    written: dict[str, str] = {}
    if config.rope_type == "llama3":  # as llama.cpp's converter: one divisor per frequency, first
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(config))
        written["rope_freqs.weight"] = "F32"
    times = {"once": 1, "none": 0, "twice": 2}[permute] if arch.gguf_permutes_qk else 0
    for hf, gname in names.items():
        w = tensors[hf]
        heads = (config.num_attention_heads if hf.endswith(("q_proj.weight", "q_proj.bias"))
                 else config.num_key_value_heads if hf.endswith(("k_proj.weight", "k_proj.bias")) else 0)
        for _ in range(times if heads else 0):
            w = permute_qk(w, heads)
        w = np.ascontiguousarray(w)
        if w.ndim == 1 or out_type == "f32":
            writer.add_tensor(gname, w.astype(np.float32))
            written[gname] = "F32"
        elif qtype is not None and w.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
            q = gguf.quants.quantize(w.astype(np.float32), qtype)
            writer.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=qtype)
            written[gname] = qtype.name
        else:
            writer.add_tensor(gname, w.astype(np.float16))
            written[gname] = "F16"
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written

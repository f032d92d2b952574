"""Real inputs for the vectors: a model's own weights, and layer-0 activations computed from them.

Weights are read through the project's loader (sources.py): config, weight files, the same
shape checks as a full load. Safetensors are read lazily, so only the tensors used here
(the embedding, layer 0, the final norm and the lm_head) are ever read; a GGUF file is
dequantized by gguf.py. Activations are the model's layer-0 values for a fixed token
sequence (the seed prompt, then pseudo-random ids), computed in float32 with the
project's ops, so every input has the magnitude an engine meets in that model.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .. import sources
from ..config import ModelConfig
from ..ops import Ops, Rope

# The seed's 38 prompt ids (its chat prompt, no BOS): the first positions of every sequence.
SEED_IDS = [529, 29989, 5205, 29989, 29958, 13, 3492, 526, 263, 19780, 13563, 7451, 29889, 2, 29871, 13,
            29966, 29989, 1792, 29989, 29958, 13, 10994, 29991, 1128, 526, 366, 29973, 2, 29871, 13,
            29966, 29989, 465, 22137, 29989, 29958, 13]
LAYER = "model.layers.0."
USED = ("model.embed_tokens.weight", LAYER + "input_layernorm.weight", LAYER + "self_attn.q_proj.weight",
        LAYER + "self_attn.k_proj.weight", LAYER + "self_attn.v_proj.weight", LAYER + "mlp.gate_proj.weight",
        LAYER + "mlp.up_proj.weight", LAYER + "mlp.down_proj.weight", "model.norm.weight")


@dataclass
class ModelWeights:
    config: ModelConfig
    tensors: dict[str, np.ndarray]  # float32 copies of the weights in USED (+ lm_head.weight)
    description: dict


def load_weights(spec: str, allow_download: bool = False) -> ModelWeights:
    """The weights this package needs from model `spec` (any --model form), as float32."""
    source = sources.resolve(spec, allow_download)
    if source.format == "gguf":
        from ..gguf import load_gguf

        ckpt = load_gguf(source.path, mx.float32)
        cfg, weights = ckpt.config, dict(ckpt.weights)
    else:
        cfg = sources.load_config(source.path)
        weights = sources.read_safetensors(sources.weight_files(source.path))  # lazy: nothing read yet
    sources.check_weights(weights, cfg, str(source.path))
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    tensors = {name: np.array(weights[name].astype(mx.float32)) for name in USED}
    tensors["lm_head.weight"] = tensors[head] if head in tensors else np.array(weights[head].astype(mx.float32))
    return ModelWeights(cfg, tensors, {"spec": spec, "format": source.format, "origin": source.origin,
                                       "config": cfg.as_dict()})


def token_ids(n: int, vocab: int) -> np.ndarray:
    """The seed prompt's ids, then ids drawn from a fixed generator: the same sequence every run."""
    rng = np.random.default_rng(14)
    rest = rng.integers(3, vocab, size=max(0, n - len(SEED_IDS)))
    return (np.concatenate([np.array(SEED_IDS) % vocab, rest])[:n]).astype(np.int32)


@dataclass
class Activations:
    """Layer-0 values of the first `n` positions (float32, [T, features]; heads as [heads, T, D])."""

    ids: np.ndarray
    embed: np.ndarray  # the residual stream entering layer 0
    normed: np.ndarray  # input RMSNorm output: what q/k/v/gate/up (and, after the final norm, lm_head) read
    q: np.ndarray  # [H, T, D] after RoPE at positions 0..T-1
    k: np.ndarray  # [KV, T, D] after RoPE
    v: np.ndarray  # [KV, T, D]
    q_raw: np.ndarray  # [H, T, D] before RoPE
    gate: np.ndarray  # [T, intermediate], only the first `mlp_rows` positions
    up: np.ndarray
    prod: np.ndarray  # SiLU(gate) * up: what down_proj reads


def activations(w: ModelWeights, n: int, mlp_rows: int) -> Activations:
    cfg, t = w.config, w.tensors
    ops = Ops("hf", "explicit")
    ids = token_ids(n, cfg.vocab_size)
    embed = t["model.embed_tokens.weight"][ids]
    normed = np.array(ops.rms_norm(mx.array(embed), mx.array(t[LAYER + "input_layernorm.weight"]),
                                   cfg.rms_norm_eps))

    def heads(y: np.ndarray, count: int) -> np.ndarray:
        return y.reshape(y.shape[0], count, cfg.head_dim).transpose(1, 0, 2)

    def proj(name: str, x: np.ndarray) -> np.ndarray:
        return x @ t[LAYER + name + ".weight"].T

    rope = Rope.from_config(cfg)
    q_raw = heads(proj("self_attn.q_proj", normed), cfg.num_attention_heads)
    k = heads(proj("self_attn.k_proj", normed), cfg.num_key_value_heads)
    v = heads(proj("self_attn.v_proj", normed), cfg.num_key_value_heads)
    q = np.array(ops.rope(mx.array(q_raw)[None], 0, rope)[0])
    k = np.array(ops.rope(mx.array(k)[None], 0, rope)[0])
    h = normed[:mlp_rows]
    gate, up = proj("mlp.gate_proj", h), proj("mlp.up_proj", h)
    prod = np.array(ops.swiglu(mx.array(gate), mx.array(up)))
    return Activations(ids, embed, normed, q, k, v, q_raw, gate, up, prod)

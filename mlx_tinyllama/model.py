"""The TinyLlama (Llama 2 architecture) forward pass in MLX, one named tap per stage.

    x = embed(ids)
    for each layer i:
        h = RMSNorm(x);  q, k, v = h·Wq, h·Wk, h·Wv;  q, k = RoPE(q), RoPE(k)
        probs = softmax(q·kᵀ / sqrt(d) + causal mask);  x = x + (probs·v)·Wo
        h = RMSNorm(x);  x = x + (SiLU(h·Wg) × h·Wu)·Wd
    logits = RMSNorm(x)·W_lm

Parameter names follow Hugging Face (`model.layers.0.self_attn.q_proj.weight`),
so a transformers checkpoint loads as is. `tap(name, x)` returns x; with taps
off it is a no-op. How each step is computed (fused kernels or explicit ops, and
in which precision) is decided by `Ops` (ops.py), never by which taps are on,
so selecting taps cannot change a result.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig
from .ops import Ops, Rope
from .taps import ATTENTION_INTERNALS, NO_TAPS


def joined_weight(joined, modules) -> mx.array | None:
    """The concatenated weight of `modules` (a (weight, row views) pair made by
    decode.concatenate_projections) while they still are plain Linears reading those views;
    None once a weight or a module was replaced (reloaded weights, an emulating Linear)."""
    if joined is None:
        return None
    weight, views = joined
    return weight if all(type(m) is nn.Linear and m.weight is v for m, v in zip(modules, views)) else None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = cfg.attn_scale
        self.window = cfg.window  # a sliding window of keys (Mistral); 0: every earlier key
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        self._qkv = None  # ([Wq; Wk; Wv], views) from decode.concatenate_projections (underscore: not a parameter)

    def project(self, h, ops: Ops):
        """h·Wq, h·Wk, h·Wv: three matmuls, or one on the concatenated weight when ops ask for it."""
        if ops.projections == "concatenated":
            w = joined_weight(self._qkv, (self.q_proj, self.k_proj, self.v_proj))
            if w is not None:
                nq, nkv = self.n_heads * self.head_dim, self.n_kv * self.head_dim
                return mx.split(h @ w.T, [nq, nq + nkv], axis=-1)
        return self.q_proj(h), self.k_proj(h), self.v_proj(h)

    def heads(self, x: mx.array, n: int) -> mx.array:
        B, T, _ = x.shape
        return x.reshape(B, T, n, self.head_dim).transpose(0, 2, 1, 3)  # [B, n, T, D]

    def __call__(self, h, ops: Ops, rope, cache, tap, p: str):
        B, T, _ = h.shape
        offset = cache.offset if cache is not None else 0
        q, k, v = self.project(h, ops)
        q = tap(p + "attn.q", self.heads(q, self.n_heads))
        k = tap(p + "attn.k", self.heads(k, self.n_kv))
        v = tap(p + "attn.v", self.heads(v, self.n_kv))
        q = tap(p + "attn.q_rope", ops.rope(q, offset, rope))
        k = tap(p + "attn.k_rope", ops.rope(k, offset, rope))
        if tap.enabled:  # observed only: the attention ops read KV heads (GQA) without the copy
            for name, x in (("attn.k_rep", k), ("attn.v_rep", v)):
                if tap.wants(p + name):
                    tap(p + name, mx.repeat(x, self.n_heads // self.n_kv, axis=1))
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # all S = offset + T keys/values so far
        visible = getattr(cache, "mask", None)  # a fixed-capacity cache (decode.py) hides unwritten slots
        if ops.fused:
            ctx = ops.fused_attention(q, k, v, self.scale, visible, self.window)
            if tap.enabled and any(tap.wants(p + s) for s in ATTENTION_INTERNALS):  # observed only
                observed = ops.observed_internals(q, k, self.scale, visible, self.window)  # CUDA: one kernel
                if observed is None:
                    self.probs(q, k, ops, tap, p, visible)
                else:
                    for suffix, x in zip(ATTENTION_INTERNALS, observed):
                        tap(p + suffix, x)
        else:
            ctx = ops.pv(self.probs(q, k, ops, tap, p, visible), v)
        ctx = tap(p + "attn.context", ctx.transpose(0, 2, 1, 3).reshape(B, T, -1))
        return self.o_proj(ctx)

    def probs(self, q, k, ops: Ops, tap, p: str, visible=None) -> mx.array:
        T, S = q.shape[2], k.shape[2]
        s = tap(p + "attn.scores", ops.qk(q, k))
        s = tap(p + "attn.scores_scaled", ops.scale(s, self.scale))
        s = tap(p + "attn.scores_masked", ops.add_mask(s, T, S, visible, self.window))
        return tap(p + "attn.probs", ops.softmax(s, q.dtype))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self._gate_up = None  # ([Wg; Wu], views), as Attention._qkv

    def project(self, h, ops: Ops):
        """h·Wg, h·Wu: two matmuls, or one on the concatenated weight (see Attention.project)."""
        if ops.projections == "concatenated":
            w = joined_weight(self._gate_up, (self.gate_proj, self.up_proj))
            if w is not None:
                return mx.split(h @ w.T, 2, axis=-1)
        return self.gate_proj(h), self.up_proj(h)

    def __call__(self, h, ops: Ops, tap, p: str):
        gate, up = self.project(h, ops)
        gate = tap(p + "mlp.gate", gate)
        up = tap(p + "mlp.up", up)
        if ops.fused:
            prod = ops.swiglu(gate, up)  # one kernel: SiLU(gate) is never materialised
            if tap.enabled and tap.wants(p + "mlp.act"):
                tap(p + "mlp.act", ops.silu(gate))  # observed only: the data path above is untouched
        else:
            prod = tap(p + "mlp.act", ops.silu(gate)) * up
        prod = tap(p + "mlp.prod", prod)
        return self.down_proj(prod)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.eps = cfg.rms_norm_eps
        self.prefix = f"layers.{index}."

    def __call__(self, x, ops: Ops, rope, cache, tap):
        p = self.prefix
        h = tap(p + "attn_norm", ops.rms_norm(x, self.input_layernorm.weight, self.eps))
        a = tap(p + "attn.out", self.self_attn(h, ops, rope, cache, tap, p))
        x = tap(p + "resid_mid", x + a)
        h = tap(p + "mlp_norm", ops.rms_norm(x, self.post_attention_layernorm.weight, self.eps))
        m = tap(p + "mlp.down", self.mlp(h, ops, tap, p))
        return tap(p + "out", x + m)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)]
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)


class TinyLlama(nn.Module):
    """`model(ids, cache=None, tap=NO_TAPS, ops=None) -> logits [1, T, vocab]` (ops: the model's own by default)."""

    def __init__(self, cfg: ModelConfig, ops: Ops | None = None):
        super().__init__()
        self.config = cfg
        self.ops = ops or Ops()
        self.model = LlamaModel(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._rope = Rope.from_config(cfg)  # constants, not parameters

    @property
    def layers(self):
        return self.model.layers

    def __call__(self, ids: mx.array, cache: list | None = None, tap=NO_TAPS, ops: Ops | None = None) -> mx.array:
        ops, cfg = ops or self.ops, self.config
        if ids.ndim == 1:
            ids = ids[None]
        x = tap("embed", self.model.embed_tokens(ids))
        for i, layer in enumerate(self.model.layers):
            x = layer(x, ops, self._rope, cache[i] if cache is not None else None, tap)
        x = tap("final_norm", ops.rms_norm(x, self.model.norm.weight, cfg.rms_norm_eps))
        head = self.model.embed_tokens.as_linear if cfg.tie_word_embeddings else self.lm_head
        return tap("logits", head(x))

    def make_cache(self) -> list:
        """One mlx-lm KVCache per layer (offset = number of positions already seen)."""
        from mlx_lm.models.cache import KVCache

        return [KVCache() for _ in self.model.layers]

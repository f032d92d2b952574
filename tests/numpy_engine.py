"""An independent NumPy implementation of TinyLlama (Llama 2) that plays "another engine" in tests:
it reads the same HF checkpoint (config.json + model.safetensors), dumps every canonical tap as a
full tensor, decodes step by step through its own KV cache, and injects faults by name.

Written from the math, not from mlx_tinyllama's ops (nothing from the package is imported):

    x = E[ids];  per layer:  h = rms(x)·g;  q, k, v = h·Wqᵀ, h·Wkᵀ, h·Wvᵀ  (split into heads)
    q, k = rope(q), rope(k)   rotate-half: x·cos + [-x₂, x₁]·sin, angle = pos / θ^(2i/D)
    scores = q·kᵀ (query head h reads KV head h // (H/KV));  × 1/√D;  + causal mask
    probs = softmax over keys;  context = probs·v, heads merged [T, H·D];  x = x + context·Woᵀ
    h = rms(x)·g';  x = x + (SiLU(h·Wgᵀ) ⊙ h·Wuᵀ)·Wdᵀ;  logits = rms(x)·g''·W_lmᵀ

Arithmetic is float64; dumps are float32 (or half precision) through kit/tap_dump.py.

Faults (`Engine(model_dir, faults=["missing_scale@1", "rope_offset:2"])`: NAME[:ARG][@LAYER],
layer 0 unless given). Each is one mistake that real engines make; FAULTS says which stage it
breaks and whether it changes the arithmetic ("compute"; "bias": only on a model whose projections
carry biases), only how a tensor is written to the dump ("dump"), only decode steps ("decode"), or
only a model with a sliding window ("window").
A projection's bias (Qwen2's q/k/v, Llama's attention_bias) is added when the checkpoint has one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# name -> (kind, canonical stage within the layer it breaks, description)
FAULTS = {
    "drift": ("compute", "attn_norm", "RMSNorm output × (1+ARG): a small error, meant to stay under tolerance"),
    "wrong_scale": ("compute", "attn.scores_scaled", "scores × ARG/√D instead of 1/√D (ARG default 1.25)"),
    "fp16_rounding": ("compute", "attn_norm", "the RMSNorm output rounded to float16 (dump says float32)"),
    "transpose": ("dump", "attn.out", "attn.out written column-major under its row-major shape"),
    "ggml_dim_order": ("dump", "attn.q", "attn.q's buffer in ggml's [T, heads, D] order under shape [heads, T, D]"),
    "axis_order": ("dump", "attn.k", "attn.k's buffer in [D, T, KV] order (ggml's ne order) under shape [KV, T, D]"),
    "heads_group_major": ("dump", "attn.q", "attn.q's heads written group-major (head g*n_rep + r at r*KV + g)"),
    "scores_already_scaled": ("dump", "attn.scores", "attn.scores holds the scaled scores (an exporter's scaled MatMul)"),
    "heads_order": ("compute", "attn.context", "heads merged D-major ([T, D, H]) instead of head-major"),
    "rope_interleaved": ("compute", "attn.q_rope", "RoPE rotating interleaved pairs (GPT-J/ggml style)"),
    "rope_offset": ("compute", "attn.q_rope", "RoPE positions start at ARG (default 1) instead of 0"),
    "missing_scale": ("compute", "attn.scores_scaled", "scores not multiplied by 1/√D"),
    "double_scale": ("compute", "attn.scores_scaled", "scores multiplied by 1/√D twice"),
    "softmax_axis": ("compute", "attn.probs", "softmax over the query axis instead of the key axis"),
    "mask_off": ("compute", "attn.scores_masked", "no causal mask"),
    "mask_offset": ("compute", "attn.scores_masked", "query t sees keys up to t+ARG (default 1)"),
    "kv_head_mapping": ("compute", "attn.k_rep", "query head h reads KV head h % KV instead of h // (H/KV)"),
    "bos_shift": ("compute", "embed", "embeds [BOS] + ids[:-1]: every token one position late"),
    # Faults of a projection's bias: only a model whose projections carry biases shows them.
    "v_bias_dropped": ("bias", "attn.v", "v_proj's bias never added (q, k and o keep theirs)"),
    "k_bias_on_v": ("bias", "attn.v", "v_proj gets k_proj's bias instead of its own (needs KV widths equal)"),
    # Kernel faults (issue 22): the tiling and indexing mistakes of hand-written kernels.
    "tile_rows_zero": ("compute", "attn.q", "the q_proj matmul computes token rows 0..ARG-1 only (default 32): "
                                            "rows from ARG on are zero (an M loop bound)"),
    "tail_tile_stale": ("compute", "mlp.gate", "the gate_proj matmul never loads the last partial tile of ARG rows "
                                               "(default 32): those rows keep the first tile's rows"),
    "down_rows_zero": ("compute", "mlp.down", "the down_proj matmul computes token rows 0..ARG-1 only (default 16)"),
    # Faults of an engine that computes q|k|v and gate|up as one matmul each (fused projections).
    "qkv_k_head_wrong": ("compute", "attn.k", "the fused qkv matmul writes KV head ARG's k columns (default 1) "
                                              "from KV head 0's weight rows (a wrong offset in the k block)"),
    "gate_up_rows_zero": ("compute", "mlp.gate", "the fused gate_up matmul computes token rows 0..ARG-1 only "
                                                 "(default 32): both halves' rows from ARG on are zero"),
    "cols_zero": ("compute", "attn.out", "the o_proj matmul writes output columns 0..ARG-1 only (default: hidden - 8)"),
    "rope_sin_sign": ("compute", "attn.q_rope", "RoPE with the sin sign flipped (rotating backwards)"),
    "flash_no_rescale": ("compute", "attn.context", "attention over key blocks of ARG (default 8) without the "
                                                    "online-softmax rescale of the running sum and output"),
    "cache_stops_growing": ("decode", "attn.scores", "the KV cache keeps at most ARG entries (default: prefill + 1)"),
    "positions_stuck": ("decode", "attn.q_rope", "decode steps all use the first decode position"),
    "zeros_after_first_step": ("decode", "attn.context", "attn.context reads as zeros from the second decode step"),
    # KV-cache faults of decode steps (issue 22 item 3): what a step's attention reads from the cache.
    "kv_late": ("decode", "attn.scores", "decode steps write K/V one cache slot late (the prefill's are right): "
                                         "a step reads a zero slot where its own key belongs"),
    "ring": ("decode", "attn.scores", "decode steps read a ring of the last ARG cache slots (default 4)"),
    "extra_key": ("decode", "attn.scores", "decode steps read ARG zero slots past the current position (default 1)"),
    "window_off_by_one": ("window", "attn.scores_masked", "a sliding window of ARG more keys than the config's "
                                                           "(default 1; a model with sliding_window)"),
}
MASK_VALUE = float(np.finfo(np.float32).min)  # what a float32 engine adds above the diagonal


@dataclass(frozen=True)
class Fault:
    name: str
    arg: float | None = None
    layer: int = 0

    @classmethod
    def parse(cls, spec: str) -> "Fault":
        spec, _, layer = spec.partition("@")
        name, _, arg = spec.partition(":")
        if name not in FAULTS:
            raise ValueError(f"unknown fault {name!r}; faults: {', '.join(FAULTS)}")
        return cls(name, float(arg) if arg else None, int(layer) if layer else 0)

    @property
    def stage(self) -> str:
        """The canonical tap where the fault first shows."""
        stage = FAULTS[self.name][1]
        return stage if stage == "embed" else f"layers.{self.layer}.{stage}"


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _rms(x, g, eps):
    return g * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


class Engine:
    """`prefill(ids)` -> {tap: float64 array} (batch dimension dropped), then `step(token)` per
    decode step (T = 1 at position len(cache)). `taps` of the last call stay on the engine."""

    def __init__(self, model_dir, faults=()):
        from safetensors.numpy import load_file  # reads the checkpoint; the math below is ours

        model_dir = Path(model_dir)
        cfg = json.loads((model_dir / "config.json").read_text())
        self.L, self.H, self.KV = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.hidden = cfg["hidden_size"]
        self.D = cfg.get("head_dim") or self.hidden // self.H
        self.eps = cfg["rms_norm_eps"]
        rope = cfg.get("rope_parameters") or {}  # transformers 5.x writes rope_theta there
        assert (rope.get("rope_type") or "default") == "default", "this engine runs the default RoPE only"
        self.theta = cfg["rope_theta"] if "rope_theta" in cfg else rope["rope_theta"]
        self.w = {k: v.astype(np.float64) for k, v in load_file(str(model_dir / "model.safetensors")).items()}
        self.tied = cfg.get("tie_word_embeddings", False)
        # Mistral: query p sees keys p - window + 1 .. p (the config's own key, as HF's MistralConfig reads it)
        self.window = int(cfg.get("sliding_window") or 0) if cfg.get("model_type") == "mistral" else 0
        self.faults = [f if isinstance(f, Fault) else Fault.parse(f) for f in faults]
        self.cache: list[tuple[np.ndarray, np.ndarray]] = []
        self.steps = 0
        self.taps: dict[str, np.ndarray] = {}

    def fault(self, name: str, layer: int | None = None) -> Fault | None:
        return next((f for f in self.faults if f.name == name and (layer is None or f.layer == layer)), None)

    # --- public --------------------------------------------------------------------------------

    def prefill(self, ids) -> dict[str, np.ndarray]:
        self.cache = [(np.zeros((self.KV, 0, self.D)), np.zeros((self.KV, 0, self.D))) for _ in range(self.L)]
        self.steps = 0
        ids = list(ids)
        self._prefill_len = len(ids)
        if self.fault("bos_shift"):
            ids = [1] + ids[:-1]
        return self._forward(np.array(ids), 0)

    def chunk(self, ids) -> dict[str, np.ndarray]:
        """A further prefill chunk (chunked prefill): its T tokens at the positions after the cache's."""
        start = self.cache[0][0].shape[1]
        self._prefill_len = start + len(ids)
        return self._forward(np.array(list(ids)), start)

    def step(self, token: int) -> dict[str, np.ndarray]:
        """One decode step: the token at position len(cache); returns that row's taps."""
        position = self._prefill_len + self.steps
        if self.fault("positions_stuck"):
            position = self._prefill_len  # the position counter is never advanced
        self.steps += 1
        return self._forward(np.array([token]), position)

    # --- the forward pass ------------------------------------------------------------------------

    def _forward(self, ids: np.ndarray, start: int) -> dict[str, np.ndarray]:
        self.taps = taps = {}
        w = self.w
        x = taps["embed"] = w["model.embed_tokens.weight"][ids]
        for i in range(self.L):
            p = f"model.layers.{i}."
            h = _rms(x, w[p + "input_layernorm.weight"], self.eps)
            if (f := self.fault("drift", i)):
                h = h * (1.0 + f.arg)
            if self.fault("fp16_rounding", i):
                h = h.astype(np.float16).astype(np.float64)
            taps[f"layers.{i}.attn_norm"] = h
            a = self._attention(h, i, start, taps)
            x = taps[f"layers.{i}.resid_mid"] = x + a
            h = taps[f"layers.{i}.mlp_norm"] = _rms(x, w[p + "post_attention_layernorm.weight"], self.eps)
            gate = h @ w[p + "mlp.gate_proj.weight"].T
            up = h @ w[p + "mlp.up_proj.weight"].T
            if (f := self.fault("gate_up_rows_zero", i)):
                gate[int(f.arg or 32):], up[int(f.arg or 32):] = 0.0, 0.0
            if (f := self.fault("tail_tile_stale", i)):
                tile = int(f.arg or 32)
                full = gate.shape[0] // tile * tile
                gate[full:] = gate[:gate.shape[0] - full]  # the buffer still holds the first tile
            taps[f"layers.{i}.mlp.gate"] = gate
            taps[f"layers.{i}.mlp.up"] = up
            act = taps[f"layers.{i}.mlp.act"] = _silu(gate)
            prod = taps[f"layers.{i}.mlp.prod"] = act * up
            m = prod @ w[p + "mlp.down_proj.weight"].T
            if (f := self.fault("down_rows_zero", i)):
                m[int(f.arg or 16):] = 0.0
            taps[f"layers.{i}.mlp.down"] = m
            x = taps[f"layers.{i}.out"] = x + m
        h = taps["final_norm"] = _rms(x, w["model.norm.weight"], self.eps)
        head = w["model.embed_tokens.weight"] if self.tied else w["lm_head.weight"]
        taps["logits"] = h @ head.T
        return taps

    def _heads(self, x: np.ndarray, n: int) -> np.ndarray:
        return x.reshape(x.shape[0], n, self.D).transpose(1, 0, 2)  # [T, n*D] -> [n, T, D]

    def _rope(self, x: np.ndarray, positions: np.ndarray, interleaved: bool, sign: float = 1.0) -> np.ndarray:
        half = self.D // 2
        inv_freq = 1.0 / self.theta ** (np.arange(half) * 2.0 / self.D)
        angle = positions[:, None] * inv_freq[None, :]  # [T, D/2]
        cos, sin = np.cos(angle), sign * np.sin(angle)
        if interleaved:  # pairs (2i, 2i+1) rotate together
            x1, x2 = x[..., 0::2], x[..., 1::2]
            out = np.empty_like(x)
            out[..., 0::2] = x1 * cos - x2 * sin
            out[..., 1::2] = x1 * sin + x2 * cos
            return out
        x1, x2 = x[..., :half], x[..., half:]  # rotate-half: (i, i + D/2) rotate together
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    def _attention(self, h: np.ndarray, i: int, start: int, taps: dict) -> np.ndarray:
        w, p, t = self.w, f"model.layers.{i}.self_attn.", f"layers.{i}."
        T = h.shape[0]
        qm = h @ w[p + "q_proj.weight"].T
        if (f := self.fault("tile_rows_zero", i)):
            qm[int(f.arg or 32):] = 0.0
        bias = {n: w.get(p + f"{n}_proj.bias", 0.0) for n in "qkvo"}
        if self.fault("v_bias_dropped", i):
            bias["v"] = 0.0
        if self.fault("k_bias_on_v", i):
            bias["v"] = bias["k"]
        q = taps[t + "attn.q"] = self._heads(qm + bias["q"], self.H)
        k = taps[t + "attn.k"] = self._heads(h @ w[p + "k_proj.weight"].T + bias["k"], self.KV)
        v = taps[t + "attn.v"] = self._heads(h @ w[p + "v_proj.weight"].T + bias["v"], self.KV)
        offset = self.fault("rope_offset", i)
        positions = np.arange(start, start + T, dtype=np.float64) + (offset.arg or 1 if offset else 0)
        interleaved = self.fault("rope_interleaved", i) is not None
        sign = -1.0 if self.fault("rope_sin_sign", i) else 1.0
        if (f := self.fault("qkv_k_head_wrong", i)):  # in place: the attn.k tap is this array
            k[int(f.arg or 1)] = k[0]
        q = taps[t + "attn.q_rope"] = self._rope(q, positions, interleaved, sign)
        k = taps[t + "attn.k_rope"] = self._rope(k, positions, interleaved, sign)
        k_all, v_all = self._cache_update(i, k, v, start)
        S = k_all.shape[1]
        if self.fault("kv_head_mapping", i):
            kv_of = np.arange(self.H) % self.KV
        else:
            kv_of = np.arange(self.H) // (self.H // self.KV)
        taps[t + "attn.k_rep"], taps[t + "attn.v_rep"] = k[kv_of], v[kv_of]  # this step's rows, expanded
        s = taps[t + "attn.scores"] = np.einsum("htd,hsd->hts", q, k_all[kv_of])
        scale = 1.0 / np.sqrt(self.D)
        if self.fault("missing_scale", i):
            scale = 1.0
        if self.fault("double_scale", i):
            scale = scale * scale
        if (f := self.fault("wrong_scale", i)):
            scale = scale * (f.arg or 1.25)
        s = taps[t + "attn.scores_scaled"] = s * scale
        query_pos = np.arange(start, start + T)[:, None]  # absolute position of each query row
        key_pos = self._read_positions(i, S, start + T)
        if (f := self.fault("mask_offset", i)):
            query_pos = query_pos + int(f.arg or 1)
        masked = key_pos[None, :] > query_pos
        window = self.window + (int(f.arg or 1) if (f := self.fault("window_off_by_one", i)) else 0)
        if self.window:
            masked |= key_pos[None, :] <= query_pos - window
        if (T > 1 or self.window) and not self.fault("mask_off", i):
            s = np.where(masked[None], MASK_VALUE, s)
        taps[t + "attn.scores_masked"] = s
        axis = -2 if self.fault("softmax_axis", i) else -1
        e = np.exp(s - s.max(axis=axis, keepdims=True))
        probs = taps[t + "attn.probs"] = e / e.sum(axis=axis, keepdims=True)
        ctx = np.einsum("hts,hsd->htd", probs, v_all[kv_of])  # [H, T, D]
        if (f := self.fault("flash_no_rescale", i)):
            ctx = _blocked_attention_without_rescale(s, v_all[kv_of], int(f.arg or 8))
        if self.fault("heads_order", i):
            ctx = ctx.transpose(1, 2, 0).reshape(T, -1)  # D-major: element (d, h) at d*H + h
        else:
            ctx = ctx.transpose(1, 0, 2).reshape(T, -1)
        if self.fault("zeros_after_first_step", i) and self.steps >= 2:
            ctx = np.zeros_like(ctx)  # read before the GPU wrote it
        taps[t + "attn.context"] = ctx
        out = ctx @ w[p + "o_proj.weight"].T + bias["o"]
        if (f := self.fault("cols_zero", i)):
            out[:, int(f.arg or out.shape[1] - 8):] = 0.0
        taps[t + "attn.out"] = out
        return out

    def _cache_update(self, i: int, k: np.ndarray, v: np.ndarray, position: int):
        """Store this call's K/V (rows from `position`) and return what its attention reads ([KV, S, D] each)."""
        if self.steps and self.fault("kv_late", i):  # written at slot position + 1, read up to the position
            pad = np.zeros((self.KV, position + 1 - self.cache[i][0].shape[1], self.D))
            k_all = np.concatenate([self.cache[i][0], pad, k], axis=1)
            v_all = np.concatenate([self.cache[i][1], pad, v], axis=1)
            self.cache[i] = (k_all, v_all)
            return k_all[:, :position + 1], v_all[:, :position + 1]
        k_all = np.concatenate([self.cache[i][0], k], axis=1)
        v_all = np.concatenate([self.cache[i][1], v], axis=1)
        stop = self.fault("cache_stops_growing")
        if stop and self.steps:
            cap = int(stop.arg) if stop.arg else self._prefill_len + 1
            k_all, v_all = k_all[:, :cap], v_all[:, :cap]  # a fixed-size cache drops what does not fit
        self.cache[i] = (k_all, v_all)
        if self.steps and (f := self.fault("ring", i)):
            cap = int(f.arg or 4)
            return k_all[:, -cap:], v_all[:, -cap:]  # the oldest slots overwritten
        if self.steps and (f := self.fault("extra_key", i)):
            spare = np.zeros((self.KV, int(f.arg or 1), self.D))
            return np.concatenate([k_all, spare], axis=1), np.concatenate([v_all, spare], axis=1)
        return k_all, v_all

    def _read_positions(self, i: int, S: int, end: int) -> np.ndarray:
        """The position each of the S keys read holds, for the mask (`end`: one past the last query)."""
        if self.steps and self.fault("ring", i):
            return np.arange(end - S, end)
        return np.arange(S)

    # --- dumps ---------------------------------------------------------------------------------

    def dump(self, path, ids, position: int = 0, store_as: str = "float32", dtype: str | None = None) -> Path:
        """Write the last call's taps (float32 unless store_as) with kit/tap_dump.py; the dump-layout
        faults change how their tensor is written here, not the arithmetic."""
        tap_dump = _kit_module()
        d = tap_dump.TapDump(tokens=ids, position=position, dtype=dtype or store_as, engine="tests/numpy_engine.py")
        for name, x in self.dumped().items():
            d.add(name, x.astype(np.float32), store_as=store_as)
        d.write(path)
        return Path(path)

    def dumped(self) -> dict[str, np.ndarray]:
        """The last call's taps as they are written to a dump (dump-layout faults applied)."""
        out = dict(self.taps)
        if (f := self.fault("transpose")):
            name = f"layers.{f.layer}.attn.out"
            x = out[name]
            out[name] = np.ascontiguousarray(x.T).reshape(x.shape)  # column-major buffer, row-major shape
        if (f := self.fault("ggml_dim_order")):
            name = f"layers.{f.layer}.attn.q"
            x = out[name]
            out[name] = np.ascontiguousarray(x.transpose(1, 0, 2)).reshape(x.shape)  # [T, H, D] bytes
        if (f := self.fault("axis_order")):
            name = f"layers.{f.layer}.attn.k"
            x = out[name]
            out[name] = np.ascontiguousarray(x.transpose(2, 1, 0)).reshape(x.shape)  # [D, T, KV] bytes
        if (f := self.fault("heads_group_major")):
            name = f"layers.{f.layer}.attn.q"
            n_rep = self.H // self.KV
            out[name] = out[name][[g * n_rep + r for r in range(n_rep) for g in range(self.KV)]]
        if (f := self.fault("scores_already_scaled")):
            name = f"layers.{f.layer}.attn.scores"
            out[name] = out[name] / np.sqrt(self.D)
        return out


def _blocked_attention_without_rescale(s: np.ndarray, v: np.ndarray, block: int) -> np.ndarray:
    """Flash attention over key blocks whose running sum and output are never rescaled when a
    later block raises the row maximum: right for rows whose keys fit in one block."""
    H, T, S = s.shape
    out = np.zeros((H, T, v.shape[-1]))
    total = np.zeros((H, T, 1))
    m = np.full((H, T, 1), -np.inf)
    for j in range(0, S, block):
        blk = s[..., j:j + block]
        m = np.maximum(m, blk.max(axis=-1, keepdims=True))  # the new max, but old terms keep the old one
        e = np.exp(blk - m)
        total += e.sum(axis=-1, keepdims=True)
        out += np.einsum("hts,hsd->htd", e, v[:, j:j + block])
    return out / total


def _kit_module():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "kit" / "tap_dump.py"
    spec = importlib.util.spec_from_file_location("kit_tap_dump", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

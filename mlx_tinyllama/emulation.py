"""The reference computed with another engine's precision choices (llama.cpp's CPU backend).

A correct engine that stores its KV cache in fp16, rounds matmul inputs to fp16 (or
quantizes them to q8_0) and accumulates flash attention in fp16 is *not* within fp32
tolerance of an fp32 reference. Widening the tolerances to fp16 hides real faults, so
instead the reference makes the same roundings, at the same places, and the tolerance
stays tight. What llama.cpp's CPU backend does (ggml-cpu, the sdist in
tests/fixtures/llamacpp/PROVENANCE.md):

- matmul with f16 weights: the f32 activation is converted to f16 first (f16's
  vec_dot_type; llamafile's tinyBLAS on x86 takes f16 x f16 only), products accumulate in
  f32. With q8_0 weights: the activation is quantized to q8_0 blocks of 32 (scale amax/127
  stored as f16, round to nearest even).
- extra buffer types: on a CPU with AMX (ggml-cpu built with __AMX_INT8__), the loader
  puts each weight whose MUL_MAT the AMX buffer supports (amx.cpp supports_op: f16 with
  out_features % 32 == 0 and in_features % 16 == 0, or a quantized type) in the "AMX"
  buffer, and every matmul on it runs ggml_backend_amx_mul_mat. Its f16 kernel
  (tinygemm_kernel_avx) reads the activation as f32 and widens the weight: no rounding
  of the input. Its quantized kernels quantize the input to the same vec_dot_type as the
  plain path. `-nr` (--no-repack) turns the extra buffers off. CPU_REPACK (x86: q4_0,
  q4_K, iq4_nl, ...; none of f16 or q8_0) keeps the vec_dot_type rounding.
- KV cache of type f16: K (after RoPE) and V are stored as f16.
- flash attention (flash_attn_ext, f16 K/V): with fewer than 64 query rows, Q is
  converted to f16, scores are f32 dots, and the output accumulates in an *f16* vector
  with online-softmax rescaling, rounded at every key; with 64 or more (the tiled path)
  everything after the f16 K/V is f32.
- without flash attention: K·Q with f16 K converts Q to f16; softmax is f32; the
  probabilities are converted to f16 for the product with the f16 V.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .errors import UserError
from .ops import Ops

MATMUL_INPUTS = ("f32", "f16", "q8_0")
EXTRA_BUFFERS = ("none", "amx", "unknown")  # unknown: the log cannot tell AMX from -nr (or the plain path)
AMX_N_ALIGN, AMX_K_ALIGN_F16 = 32, 16  # amx.cpp supports_op: op->ne[0] % (TILE_N * 2), src0->ne[0] % 16
KV_TYPES = ("f32", "f16")
FA_TILE_Q = 64  # ggml-cpu's GGML_FA_TILE_Q: from this many query rows on, flash attention is tiled (f32)
Q8_0_BLOCK = 32


@dataclass(frozen=True)
class EnginePrecision:
    """What the other engine rounds, and where. The default is an fp32 engine (no emulation)."""

    matmul_input: str = "f32"  # f32 | f16 | q8_0: what matmul activations are rounded to
    kv_cache: str = "f32"  # f32 | f16
    flash_attn: bool = False
    extra_buffer: str = "none"  # none | amx | unknown: which f16 matmuls keep f32 inputs (amx_path)

    def __post_init__(self):
        if self.extra_buffer not in EXTRA_BUFFERS:
            raise UserError(f"extra buffer {self.extra_buffer!r}: use one of {', '.join(EXTRA_BUFFERS)}")
        if self.matmul_input not in MATMUL_INPUTS:
            raise UserError(f"matmul input precision {self.matmul_input!r}: use one of {', '.join(MATMUL_INPUTS)}")
        if self.kv_cache not in KV_TYPES:
            raise UserError(f"KV cache type {self.kv_cache!r}: use one of {', '.join(KV_TYPES)}")

    @property
    def is_fp32(self) -> bool:
        return self == EnginePrecision()

    @property
    def tolerance_class(self) -> str:
        """The tolerances.py class of a reference computed with this precision."""
        if self.matmul_input == "q8_0":
            # Its budget (0.5 * 2^-16) already exceeds an f16 rounding left unemulated (20 * 2^-22):
            # it covers the f16 matmuls (rows no multiple of 32) whose path is unknown, too.
            return "q8_0-emulated"
        if self.path_unknown:
            # The f16 matmuls' inputs are rounded on one path and not on the other: the reference
            # takes the AMX path, the tolerance is fp16's (it covers an input rounding not made).
            return "float16"
        return "float32" if self.is_fp32 else "float16-emulated"

    @property
    def path_unknown(self) -> bool:
        return self.extra_buffer == "unknown" and self.matmul_input in ("f16", "q8_0")

    def amx_path(self, out_features: int, in_features: int, weight_type: str) -> bool:
        """Whether this matmul runs on the AMX buffer's f16 kernel (f32 input, no rounding)."""
        return (self.extra_buffer in ("amx", "unknown") and weight_type == "f16"
                and out_features % AMX_N_ALIGN == 0 and in_features % AMX_K_ALIGN_F16 == 0)

    def describe(self) -> str:
        text = (f"matmul inputs {self.matmul_input}, KV cache {self.kv_cache}, "
                f"flash attention {'on' if self.flash_attn else 'off'}")
        if self.matmul_input != "f32" and self.extra_buffer == "amx":
            text += ", AMX buffer (its f16 matmuls take f32 inputs)"
        elif self.path_unknown:
            text += (", AMX buffer or not: unknown (AMX path emulated; the tolerance class "
                     f"{self.tolerance_class} covers both)")
        return text

    @classmethod
    def parse(cls, text: str) -> "EnginePrecision":
        """`fp32`, or comma-separated `matmul=f16,kv=f16,fa=on` (unnamed parts keep fp32 defaults)."""
        text = text.strip().lower()
        if text in ("fp32", "f32", "none", "off"):
            return cls()
        fields = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, _, value = part.partition("=")
            if key == "matmul":
                fields["matmul_input"] = value
            elif key == "kv":
                fields["kv_cache"] = value
            elif key == "fa" and value in ("on", "off"):
                fields["flash_attn"] = value == "on"
            elif key == "amx" and value in ("on", "off", "unknown"):
                fields["extra_buffer"] = {"on": "amx", "off": "none"}.get(value, value)
            else:
                raise UserError(f"--emulate {text!r}: expected fp32 or "
                                "matmul=f32|f16|q8_0,kv=f32|f16,fa=on|off,amx=on|off|unknown")
        return cls(**fields)


def round_f16(x: mx.array) -> mx.array:
    return x.astype(mx.float16).astype(mx.float32)


def quantize_q8_0(x: mx.array) -> mx.array:
    """x after ggml's quantize_row_q8_0 and back: per 32 values, d = f16(amax/127), q = rint(x*127/amax)."""
    shape = x.shape
    if shape[-1] % Q8_0_BLOCK:
        raise UserError(f"q8_0 emulation needs rows of a multiple of {Q8_0_BLOCK} values, not {shape[-1]}")
    b = x.astype(mx.float32).reshape(*shape[:-1], shape[-1] // Q8_0_BLOCK, Q8_0_BLOCK)
    amax = mx.max(mx.abs(b), axis=-1, keepdims=True)
    d = amax / 127.0
    inv = mx.where(amax > 0, 127.0 / mx.where(amax > 0, amax, 1.0), 0.0)
    q = mx.round(b * inv)  # ties to even, as _mm256_round_ps(_MM_ROUND_NEAREST)
    return (q * round_f16(d)).reshape(shape)


def round_to(x: mx.array, kind: str) -> mx.array:
    if kind == "f16":
        return round_f16(x)
    if kind == "q8_0":
        return quantize_q8_0(x)
    return x


def input_rounding(engine: "EnginePrecision", out_features: int, in_features: int) -> str:
    """What a matmul on an [out_features, in_features] weight rounds its input to: f32 (none), f16, q8_0."""
    kind = engine.matmul_input
    # A row length that is no multiple of q8_0's block stays f16 in the file (llama.cpp's
    # converter and gguf_write fall back alike): its input is rounded to f16, not quantized.
    weight_type = "f16" if kind == "f16" or (kind == "q8_0" and in_features % Q8_0_BLOCK) else kind
    if weight_type == "f16":
        return "f32" if engine.amx_path(out_features, in_features, weight_type) else "f16"
    return kind


class EmulatedLinear(nn.Module):
    """A Linear whose input is rounded as the engine's matmul rounds it. A bias (Qwen2's q/k/v) is
    added after the matmul in f32, as llama.cpp's separate ADD node does."""

    def __init__(self, linear: nn.Linear, engine: "EnginePrecision | str"):
        super().__init__()
        if isinstance(engine, str):  # a matmul input type alone: the plain CPU path
            engine = EnginePrecision(matmul_input=engine)
        self.weight = linear.weight
        if "bias" in linear:
            self.bias = linear.bias
        self.kind = input_rounding(engine, *linear.weight.shape)

    def __call__(self, x: mx.array) -> mx.array:
        y = round_to(x, self.kind) @ self.weight.T
        return y + self.bias if "bias" in self else y


class EmulatedTiedEmbedding(nn.Embedding):
    """The token embedding of a tied model, whose `as_linear` (the LM head) rounds its input as
    llama.cpp's output matmul does. llama.cpp loads a missing output.weight as a duplicate of
    token_embd (llama-model-loader.cpp, TENSOR_DUPLICATED), placed as the output layer's MUL_MAT
    weight, not as the embedding's GET_ROWS one: in the AMX buffer when amx.cpp takes its shape
    (f32 input), else the plain CPU buffer (f16 or q8_0 input). The loader's -v count of weights
    kept off AMX confirms it (_check_amx_placement). The lookup itself (GET_ROWS) rounds nothing."""

    def __init__(self, embedding: nn.Embedding, engine: "EnginePrecision"):
        nn.Module.__init__(self)  # not nn.Embedding's: it would draw a random table of the full size
        self.weight = embedding.weight
        self.kind = input_rounding(engine, *embedding.weight.shape)

    def as_linear(self, x: mx.array) -> mx.array:
        return round_to(x, self.kind) @ self.weight.T


def flash_attention_f16_acc(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """ggml-cpu's flash_attn_ext one-chunk path for f16 K/V, causal, prefill from position 0.

    q [B, H, T, D] (f32), k/v [B, KV, S, D] (f16 values). Q is rounded to f16; for each key in
    order, the running max M, sum S (f32) and the f16 accumulator are updated exactly as
    ggml_vec_scale_f16 / ggml_vec_mad_f16 do (f32 arithmetic, rounded to f16 at each step).
    Masked keys (later positions) are skipped, as the kernel skips -inf mask entries."""
    B, H, T, D = q.shape
    KV, S_len = k.shape[1], k.shape[2]
    rep = H // KV
    qf = round_f16(q).reshape(B, KV, rep, T, D)
    kf, vf = k.astype(mx.float32), v.astype(mx.float32)
    scores = (qf @ kf[:, :, None].swapaxes(-1, -2)) * scale  # [B, KV, rep, T, S] f32 dots
    offset = S_len - T
    M = mx.full((B, KV, rep, T, 1), -float("inf"))
    Ssum = mx.zeros((B, KV, rep, T, 1))
    acc = mx.zeros((B, KV, rep, T, D), dtype=mx.float16)
    rows = mx.arange(T).reshape(1, 1, 1, T, 1) + offset
    for j in range(S_len):
        s = scores[..., j:j + 1]
        live = rows >= j  # causal: query at position t sees keys 0..t
        new_max = s > M
        ms = mx.where(new_max, mx.exp(M - s), 1.0)
        vs = mx.where(new_max, 1.0, mx.exp(s - M))
        scaled = mx.where(new_max, (acc.astype(mx.float32) * ms).astype(mx.float16), acc)
        stepped = (scaled.astype(mx.float32) + vf[:, :, None, j:j + 1, :] * vs).astype(mx.float16)
        acc = mx.where(live, stepped, acc)
        Ssum = mx.where(live, Ssum * ms + vs, Ssum)
        M = mx.where(live, mx.maximum(M, s), M)
        if j % 32 == 31:
            mx.eval(acc, Ssum, M)  # keep the lazy graph short
    out = acc.astype(mx.float32) / Ssum
    return out.reshape(B, H, T, D)


@dataclass(frozen=True)
class EngineOps(Ops):
    """Ops whose attention stores K/V as the engine's cache does and computes attention as its
    kernel does. Everything else (norms, RoPE, SiLU) is the plain fp32 computation."""

    engine: EnginePrecision = EnginePrecision()

    def _kv(self, x: mx.array) -> mx.array:
        return round_f16(x) if self.engine.kv_cache == "f16" else x

    def qk(self, q, k):
        # llama.cpp's kq = mul_mat(k, q): an f16 K converts Q to f16 too.
        if self.engine.kv_cache == "f16":
            q, k = round_f16(q), round_f16(k)
        return super().qk(q, k)

    def pv(self, probs, v):
        # kqv = mul_mat(v, kq): an f16 V converts the probabilities to f16.
        if self.engine.kv_cache == "f16":
            probs, v = round_f16(probs), round_f16(v)
        return super().pv(probs, v)

    def fused_attention(self, q, k, v, scale, visible=None, window=0):
        T, S = q.shape[2], k.shape[2]
        if visible is not None or (window and S > window):
            # a compiled decode step (decode.py; the emulation is for the prefill it compares), or a
            # sliding window, whose llama.cpp roundings are not emulated: the model's own attention
            return super().fused_attention(q, k, v, scale, visible, window)
        if self.engine.flash_attn:
            k, v = self._kv(k), self._kv(v)
            if self.engine.kv_cache == "f16" and T < FA_TILE_Q:
                return flash_attention_f16_acc(q, k, v, scale)
            return super().fused_attention(q, k, v, scale)  # the tiled path: f32 after the f16 K/V
        s = self.add_mask(self.scale(self.qk(q, k), scale), T, S)
        return self.pv(mx.softmax(s, axis=-1), v)


def emulate(model, engine: EnginePrecision):
    """Make `model` (a float32 TinyLlama) compute with `engine`'s precision; returns it."""
    if engine.is_fp32:
        return model
    model.ops = EngineOps(policy="hf", kernels="fused", engine=engine)
    if engine.matmul_input != "f32":
        for layer in model.model.layers:
            for owner, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                                 (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
                for n in names:
                    setattr(owner, n, EmulatedLinear(getattr(owner, n), engine))
        if model.config.tie_word_embeddings:
            model.model.embed_tokens = EmulatedTiedEmbedding(model.model.embed_tokens, engine)
        else:
            model.lm_head = EmulatedLinear(model.lm_head, engine)
    return model


def _matmul_input(types: list[str]) -> str | None:
    """The matmul input rounding that weights of these types imply (None: unknown or not emulated)."""
    kinds = {t.lower() for t in types} - {"f32"}
    if not types:
        return None
    if not kinds:
        return "f32"
    if kinds <= {"f16"}:
        return "f16"
    if kinds <= {"q8_0", "f16"} and "q8_0" in kinds:
        return "q8_0"
    return None


def _extra_buffer(info: dict) -> tuple[str, list[str]]:
    """Which extra buffer type held the f16 weights, from the log: the loader's "AMX model buffer
    size" line (printed only with -v, like the weight types), else the CPU features of the
    system_info line (AMX_INT8 = 1: the AMX buffer exists, but whether -nr turned it off is not
    printed: a default log and a -nr log differ only in their numbers)."""
    buffers = info.get("model_buffers")
    if buffers:  # a -v log: the loader named every buffer the weights went to
        notes = [f"weights in a {b} buffer: its matmul rounding is not emulated (taken as the plain CPU path)"
                 for b in buffers if b not in ("AMX", "CPU", "CPU_Mapped", "CPU_REPACK")]
        return ("amx" if "AMX" in buffers else "none"), notes
    system_info = info.get("system_info")
    if system_info is None:
        return "unknown", ["the log has no system_info line: whether llama.cpp's AMX buffer ran the f16 matmuls "
                           "(f32 inputs) is unknown: the AMX path is emulated under a tolerance that covers both "
                           "(run llama-eval-callback with -v, or give --emulate ...,amx=on|off)"]
    if "AMX_INT8 = 1" in system_info:
        return "unknown", ["this CPU has AMX (system_info: AMX_INT8 = 1) and the log does not say whether llama.cpp "
                           "used its AMX buffer (default: f16 matmuls take f32 inputs) or ran with -nr (inputs "
                           "rounded to f16): the AMX path is emulated under a tolerance that covers both (run "
                           "llama-eval-callback with -v to have it read, or give --emulate ...,amx=on|off)"]
    return "none", []


def _loader_weights(config) -> list[tuple[str, tuple]]:
    """Every weight llama.cpp's loader places, once per create_tensor call: the file's tensors, plus a
    tied model's output (token_embd again, TENSOR_DUPLICATED, placed for the output MUL_MAT) and
    Llama 3's rope_freqs once per layer (layers after the first take it TENSOR_DUPLICATED)."""
    shapes = list(config.weight_shapes().items())
    if config.tie_word_embeddings:
        shapes.append(("lm_head.weight (token_embd, duplicated)", (config.vocab_size, config.hidden_size)))
    if config.rope_type == "llama3" or config.rope_freq_factors:
        shapes += [(f"rope_freqs (layer {i})", (config.head_dim // 2,)) for i in range(config.num_hidden_layers)]
    return shapes


def amx_weight_count(config, matmul_input: str) -> int:
    """How many weights the rule of amx.cpp's supports_op puts in the AMX buffer (every matmul
    weight but the embedding, which the loader places for GET_ROWS; a tied model's duplicated
    output is a matmul weight). f16 needs out % 32 and in % 16; q8_0 out % 32 and in % 32 (rows no
    multiple of 32 are f16 in the file)."""
    n = 0
    for name, shape in _loader_weights(config):
        if len(shape) != 2 or name == "model.embed_tokens.weight":
            continue
        out_features, in_features = shape
        quantized = matmul_input == "q8_0" and in_features % Q8_0_BLOCK == 0
        n += out_features % AMX_N_ALIGN == 0 and in_features % (Q8_0_BLOCK if quantized else AMX_K_ALIGN_F16) == 0
    return n


def _check_amx_placement(info: dict, config, engine: EnginePrecision) -> list[str]:
    """The loader prints how many weights it kept off the AMX buffer: it must be what the rule
    predicts, or the emulated path is wrong for some matmuls."""
    moved = (info.get("moved_off") or {}).get("AMX")
    if engine.extra_buffer != "amx" or config is None or moved is None:
        return []
    expected = len(_loader_weights(config)) - amx_weight_count(config, engine.matmul_input)
    if moved == expected:
        return []
    return [f"the loader kept {moved} weights off the AMX buffer where the emulated rule (amx.cpp's supports_op) "
            f"predicts {expected}: some matmuls may take another path than emulated"]


def engine_from_log(info: dict, gguf_types: dict | None = None, config=None) -> tuple[EnginePrecision, list[str]]:
    """The precision a llama.cpp log shows (refs.llamacpp.LogInfo.as_dict()), and notes on what it
    could not tell. Weight types come from the log's loader lines (-v) or else from the GGUF the
    reference was loaded from; the matmul path (AMX extra buffer or not) from the loader's buffer
    lines (-v) or the system_info line, checked against the loader's count of weights it kept off
    the AMX buffer when `config` (the model's ModelConfig) is given."""
    notes = []
    types = info.get("weight_types") or list((gguf_types or {}).keys())
    matmul = _matmul_input(types)
    if matmul is None:
        notes.append("the weights' type is unknown (the log has no loader lines: run llama-eval-callback with -v, "
                     "or give --model THE.gguf), or not emulated: matmul inputs taken as f32 (override with --emulate)"
                     if not types else f"weights of types {', '.join(sorted(set(types)))}: their activation "
                     "quantization is not emulated; matmul inputs taken as f32")
        matmul = "f32"
    kv = (info.get("kv_cache") or "f32").lower()
    if kv not in KV_TYPES:
        notes.append(f"a KV cache of type {kv} is not emulated: taken as f32")
        kv = "f32"
    extra = "none"
    if matmul in ("f16", "q8_0"):  # f16 weights (q8_0 files keep some) are the ones AMX changes
        extra, buffer_notes = _extra_buffer(info)
        notes += buffer_notes
    engine = EnginePrecision(matmul_input=matmul, kv_cache=kv, flash_attn=bool(info.get("flash_attn")),
                             extra_buffer=extra)
    return engine, notes + _check_amx_placement(info, config, engine)

"""Throughput profiling: prefill and decode speed, tap overhead, per-stage cost,
side by side with mlx-lm's Llama (and optionally transformers on torch).

Method (docs/benchmarks.md says more):
- Every measurement is one *sample* timed with a host clock around work that
  ends in `mx.eval` / `.item()` (MLX is lazy: nothing runs before that), after
  `warmup` untimed samples. Engines alternate sample by sample (ours, mlx-lm,
  ours, ...) so a machine that slows down mid-run hurts both alike. We report
  the median, min, max and the relative spread (max - min) / median.
- Prefill: a fresh KV cache, one forward pass over T synthetic token ids, the
  whole logits array evaluated. tokens/s = T / median time.
- Decode: prefill `decode_context` tokens (untimed), then N greedy steps
  through the KV cache, pipelined with async_eval (fast.greedy_decode, the loop
  mlx-lm's generate uses). Ours runs twice: eager ("ours") and as generate runs
  it with taps off ("ours_compiled": decode.py's compiled step). tokens/s = N / median time. Decode reads every
  weight once per token (the embedding only one row), so
  achieved weight bandwidth = weight bytes per token x tokens/s.
- mlx-lm's `llama.Model` is built from the same config and loaded with the very
  same weight arrays (no copy), in the same process.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from . import cli_common, fast
from .errors import UserError
from .taps import NO_TAPS, LAYER_STAGES, Taps, select, tap_names

FORMAT = "mlx_tinyllama.bench/1"

# Peak memory bandwidth in GB/s (vendor datasheets), matched against the device
# name, longest key first. Leads, not measurements: binned chips are slower.
PEAK_BANDWIDTH_GBS = {
    "m1": (68.25, "Apple M1 (LPDDR4X-4266)"),
    "m1 pro": (200.0, "Apple M1 Pro"),
    "m1 max": (400.0, "Apple M1 Max"),
    "m1 ultra": (800.0, "Apple M1 Ultra"),
    "m2": (100.0, "Apple M2"),
    "m2 pro": (200.0, "Apple M2 Pro"),
    "m2 max": (400.0, "Apple M2 Max"),
    "m2 ultra": (800.0, "Apple M2 Ultra"),
    "m3": (100.0, "Apple M3"),
    "m3 pro": (150.0, "Apple M3 Pro"),
    "m3 max": (400.0, "Apple M3 Max (300 on the 30-core-GPU bin)"),
    "m3 ultra": (819.0, "Apple M3 Ultra"),
    "m4": (120.0, "Apple M4"),
    "m4 pro": (273.0, "Apple M4 Pro"),
    "m4 max": (546.0, "Apple M4 Max (410 on the 32-core-GPU bin)"),
    "h200": (4800.0, "NVIDIA H200 (HBM3e)"),
    "h100": (3350.0, "NVIDIA H100 SXM (2000 for PCIe)"),
    "a100": (2039.0, "NVIDIA A100 80GB SXM (1555 for 40GB)"),
    "rtx 4090": (1008.0, "NVIDIA GeForce RTX 4090"),
    "l40s": (864.0, "NVIDIA L40S"),
}

STAGE_KINDS = ("embed", "norm", "attention", "mlp", "residual", "lm_head")


@dataclass
class Settings:
    prompt_lengths: list[int] = field(default_factory=lambda: [38, 128, 512, 2048])
    decode_tokens: int = 64
    decode_context: int = 38
    repeats: int = 5
    warmup: int = 1
    seed: int = 0
    tap_layer: int = 0
    tap_prompt_length: int | None = None  # default: the first prompt length
    tap_decode_tokens: int = 16  # stats on every stage cost a host read per tap per step
    with_mlx_lm: bool = True
    with_transformers: bool = False
    tap_overhead: bool = True
    stages: bool = True
    peak_bandwidth_gbs: float | None = None
    vs_dtype: str | None = None  # also time ours in this dtype ("ours_<dtype>"), e.g. fp16 vs fp32 on a CPU


def parse_lengths(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--prompt-lengths takes comma-separated integers, e.g. 38,128,512; got {text!r}") from None
    if not values:
        raise UserError("--prompt-lengths is empty")
    return values


def validate(s: Settings, cfg=None) -> None:
    """Bad numbers -> UserError (exit 2) before any time is spent. Without `cfg`
    only the checks that need no model run."""
    for name in ("decode_tokens", "repeats", "decode_context", "tap_decode_tokens"):
        if getattr(s, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(s, name)})")
    if s.warmup < 0:
        raise UserError(f"--warmup must be 0 or more (got {s.warmup})")
    lengths = s.prompt_lengths + ([s.tap_prompt_length] if s.tap_prompt_length is not None else [])
    for t in lengths:
        if t < 1:
            raise UserError(f"prompt length {t} must be at least 1")
    if s.peak_bandwidth_gbs is not None and not s.peak_bandwidth_gbs > 0:
        raise UserError("--peak-bandwidth must be a positive number of GB/s")
    if cfg is None:
        return
    limit = cfg.max_position_embeddings
    for t in lengths:
        if t > limit:
            raise UserError(f"prompt length {t} is beyond the model's context (max_position_embeddings={limit})")
    if s.decode_context + max(s.decode_tokens, s.tap_decode_tokens) > limit:
        raise UserError(
            f"--decode-context {s.decode_context} + --decode-tokens {s.decode_tokens} (or --tap-decode-tokens "
            f"{s.tap_decode_tokens}) is beyond the model's "
            f"context (max_position_embeddings={limit})"
        )
    if not 0 <= s.tap_layer < cfg.num_hidden_layers:
        raise UserError(f"--tap-layer {s.tap_layer} is not a layer (0..{cfg.num_hidden_layers - 1})")


# --- samples and their summary ------------------------------------------------


def summarize(times: list[float], work: int) -> dict:
    """Times of one measurement -> median, spread and work/second (work = tokens)."""
    med = statistics.median(times)
    return {
        "samples_s": times,
        "median_s": med,
        "min_s": min(times),
        "max_s": max(times),
        "spread": (max(times) - min(times)) / med,
        "tokens_per_s": work / med,
        "ms_per_token": 1e3 * med / work,
    }


def alternate(runners: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Call each runner (name -> () -> seconds) `warmup` times, then `repeats`
    times in turn (a, b, a, b, ...). Returns name -> timed samples."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            times[name].append(run())
    return times


def synthetic_ids(n: int, vocab: int, seed: int) -> mx.array:
    """[1, n] token ids drawn uniformly (ids 0..2 are special tokens: skipped)."""
    rng = np.random.default_rng(seed + n)
    return mx.array(rng.integers(3, vocab, size=(1, n)).astype(np.int32))


# --- engines --------------------------------------------------------------------


class MLXEngine:
    """Ours or mlx-lm's model behind one interface; peak memory per sample."""

    def __init__(self, name: str, model, make_cache):
        self.name = name
        self.step = fast.model_step(model)
        self.make_cache = make_cache
        self.peak_memory = 0
        self.tokens: list[int] | None = None  # the first decode's greedy ids

    def _timed(self, work) -> float:
        mx.synchronize()
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        work()
        elapsed = time.perf_counter() - t0
        self.peak_memory = max(self.peak_memory, mx.get_peak_memory())
        return elapsed

    def prefill(self, ids: mx.array) -> float:
        return self._timed(lambda: fast.prefill(self.step, ids, self.make_cache()))

    def decode(self, context: mx.array, n: int) -> float:
        cache = self.make_cache()
        first = fast.next_token(fast.prefill(self.step, context, cache))
        mx.eval(first)
        out = []
        elapsed = self._timed(lambda: out.extend(fast.greedy_decode(self.step, cache, first, n)))
        if self.tokens is None:
            self.tokens = out
        return elapsed


def mlx_lm_model(lm):
    """mlx-lm's Llama on the same weight arrays (shared, not copied)."""
    from mlx_lm.models import llama

    cfg = lm.config
    args = llama.ModelArgs(
        model_type="llama", hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        intermediate_size=cfg.intermediate_size, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_word_embeddings,
        rope_scaling=None if cfg.rope_type == "default" else {"type": cfg.rope_type, "factor": cfg.rope_factor},
    )
    model = llama.Model(args)
    model.load_weights(tree_flatten(lm.model.parameters()), strict=True)
    return model


def mlx_lm_engine(lm) -> MLXEngine:
    from mlx_lm.models.cache import make_prompt_cache

    model = mlx_lm_model(lm)
    return MLXEngine("mlx_lm", model, lambda: make_prompt_cache(model))


def ours_engine(lm) -> MLXEngine:
    return MLXEngine("ours", lm.model, lm.model.make_cache)


def ours_compiled_engine(lm, capacity: int) -> MLXEngine:
    """Ours with generate's taps-off decode: the compiled step over a fixed-capacity cache."""
    from .decode import CompiledDecoder

    decoder = CompiledDecoder(lm.model)
    engine = MLXEngine("ours_compiled", lm.model, lambda: decoder.make_cache(capacity))
    engine.step = decoder
    return engine


class TorchEngine:
    """transformers' LlamaForCausalLM (SDPA attention) on torch CUDA if available, else CPU."""

    name = "transformers"

    def __init__(self, model_dir: Path, dtype: str):
        try:
            import torch
            from transformers import LlamaForCausalLM
        except ImportError as e:
            raise UserError(f"--with-transformers needs torch and transformers ({e.name} is missing)") from None
        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        torch_dtype = getattr(torch, dtype)
        self.model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype, attn_implementation="sdpa")
        self.model.to(device=self.device, dtype=torch_dtype).eval()  # older transformers ignore dtype=
        self.peak_memory = 0
        self.tokens: list[int] | None = None

    def describe(self) -> str:
        t = self.torch
        where = t.cuda.get_device_name(0) if self.device == "cuda" else f"CPU, {t.get_num_threads()} threads"
        return f"torch {t.__version__} on {self.device} ({where})"

    def _sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def _ids(self, ids: mx.array):
        return self.torch.tensor(np.array(ids), dtype=self.torch.long, device=self.device)

    def _timed(self, work) -> float:
        if self.device == "cuda":
            self.torch.cuda.reset_peak_memory_stats()
        self._sync()
        t0 = time.perf_counter()
        with self.torch.inference_mode():
            work()
        self._sync()
        elapsed = time.perf_counter() - t0
        if self.device == "cuda":
            self.peak_memory = max(self.peak_memory, self.torch.cuda.max_memory_allocated())
        return elapsed

    def prefill(self, ids: mx.array) -> float:
        x = self._ids(ids)
        return self._timed(lambda: self.model(x, use_cache=True))

    def decode(self, context: mx.array, n: int) -> float:
        with self.torch.inference_mode():
            out = self.model(self._ids(context), use_cache=True)
        state = {"pkv": out.past_key_values, "tok": out.logits[:, -1].argmax(-1, keepdim=True)}
        generated = []

        def steps():
            with warnings.catch_warnings():  # transformers 5 renames past_key_values; older ones lack the new name
                warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
                for _ in range(n):
                    o = self.model(state["tok"], past_key_values=state["pkv"], use_cache=True)
                    state["pkv"], state["tok"] = o.past_key_values, o.logits[:, -1].argmax(-1, keepdim=True)
                    generated.append(state["tok"])

        elapsed = self._timed(steps)
        if self.tokens is None:
            self.tokens = [int(t.item()) for t in generated]
        return elapsed


# --- device -----------------------------------------------------------------------


def blas_library() -> str:
    """Which BLAS MLX's CPU backend uses, where knowable: Accelerate on macOS; on
    Linux a preloaded BLAS (LD_PRELOAD) wins over the reference BLAS bundled with mlx."""
    if platform.system() == "Darwin":
        return "Accelerate"
    preloaded = [p for p in os.environ.get("LD_PRELOAD", "").replace(":", " ").split()
                 if any(k in p.lower() for k in ("blas", "mkl", "blis"))]
    if preloaded:
        return f"{preloaded[0]} (LD_PRELOAD)"
    maps = Path("/proc/self/maps")
    if maps.is_file():
        libs = {line.split()[-1] for line in maps.read_text().splitlines() if line.count(" ") >= 5}
        bundled = sorted(lib for lib in libs if "mlx" in lib and "blas" in Path(lib).name.lower())
        if bundled:
            return f"{Path(bundled[0]).name} bundled with mlx (reference BLAS: slow fp32 matmul)"
    return "unknown"


def device_report(override_gbs: float | None) -> dict:
    info = {}
    try:
        info = {k: (v if isinstance(v, (int, float, str)) else str(v)) for k, v in mx.device_info().items()}
    except Exception:  # older MLX or a backend without device info
        pass
    gpu = mx.default_device().type == mx.gpu
    name = str(info.get("device_name", "") or platform.processor() or platform.machine())
    peak, source = lookup_peak(name) if gpu else (None, None)
    if override_gbs:
        peak, source = override_gbs, "--peak-bandwidth"
    return {
        "description": cli_common.device_description(),
        "backend": ("metal" if mx.metal.is_available() else "cuda") if gpu else "cpu",
        "name": name,
        "memory_bytes": info.get("memory_size") or info.get("total_memory"),
        "blas": None if gpu else blas_library(),
        "cpu_count": os.cpu_count(),
        "info": info,
        "peak_bandwidth_gbs": peak,
        "peak_bandwidth_source": source,
    }


def lookup_peak(name: str) -> tuple[float | None, str | None]:
    """Datasheet bandwidth for a device name ("Apple M2 Max", "NVIDIA H200"), by whole words."""
    words = " " + " ".join(name.lower().replace("-", " ").split()) + " "
    for key in sorted(PEAK_BANDWIDTH_GBS, key=len, reverse=True):
        if f" {key} " in words:
            gbs, what = PEAK_BANDWIDTH_GBS[key]
            return gbs, f"datasheet: {what}"
    return None, None


# --- model facts --------------------------------------------------------------------


def weight_bytes(lm) -> dict:
    """Bytes of all weights, and bytes read per decode step (the embedding: one row,
    unless it doubles as the lm_head)."""
    params = dict(tree_flatten(lm.model.parameters()))
    total = sum(p.nbytes for p in params.values())
    embed = params["model.embed_tokens.weight"]
    per_token = total if lm.config.tie_word_embeddings else total - embed.nbytes + embed.nbytes // embed.shape[0]
    return {"parameters": sum(p.size for p in params.values()), "total_bytes": total, "per_decode_token_bytes": per_token}


def bandwidth(per_token_bytes: int, tokens_per_s: float, peak_gbs: float | None) -> dict:
    gbs = per_token_bytes * tokens_per_s / 1e9
    return {"achieved_weight_gbs": gbs, "fraction_of_peak": gbs / peak_gbs if peak_gbs else None}


def ratio(a: float, b: float) -> float:
    return a / b


# --- the sections ---------------------------------------------------------------------


def prefill_section(engines: dict, s: Settings, cfg) -> list[dict]:
    rows = []
    for T in s.prompt_lengths:
        ids = synthetic_ids(T, cfg.vocab_size, s.seed)
        for e in engines.values():
            e.peak_memory = 0
        times = alternate({n: (lambda e=e: e.prefill(ids)) for n, e in engines.items()}, s.repeats, s.warmup)
        row = {"tokens": T, "engines": {}}
        for name, e in engines.items():
            row["engines"][name] = {**summarize(times[name], T), "peak_memory_bytes": e.peak_memory or None}
        add_ratios(row)
        rows.append(row)
        _progress(f"prefill {T}: " + _speeds(row))
    return rows


def decode_section(engines: dict, s: Settings, cfg, per_token_bytes: int, peak: float | None) -> dict:
    context = synthetic_ids(s.decode_context, cfg.vocab_size, s.seed)
    for e in engines.values():
        e.peak_memory = 0
    times = alternate({n: (lambda e=e: e.decode(context, s.decode_tokens)) for n, e in engines.items()},
                      s.repeats, s.warmup)
    out = {"context": s.decode_context, "tokens": s.decode_tokens, "engines": {}}
    for name, e in engines.items():
        summary = summarize(times[name], s.decode_tokens)
        out["engines"][name] = {**summary, **bandwidth(per_token_bytes, summary["tokens_per_s"], peak),
                                "peak_memory_bytes": e.peak_memory or None}
    add_ratios(out)
    out["greedy_tokens_agree"] = tokens_agreement(engines)
    _progress("decode: " + _speeds(out))
    return out


def add_ratios(row: dict) -> None:
    """ours / other engine, from the median tokens/s of each (>1: ours is faster); and
    "ours" / each variant of ours (ours_compiled, ours_float32) from the same run."""
    speeds = {name: e["tokens_per_s"] for name, e in row["engines"].items()}
    for a in (n for n in speeds if n.startswith("ours")):
        for b in (n for n in speeds if not n.startswith("ours") or (a == "ours" and n != a)):
            row[f"ratio_{a}_over_{b}"] = ratio(speeds[a], speeds[b])


def tokens_agreement(engines: dict) -> dict:
    """Fraction of greedy positions where each engine picked the same id as ours
    (a sanity check that both ran the same model; fp16 rounding may split late)."""
    ours = engines["ours"].tokens or []
    out = {}
    for name, e in engines.items():
        if name != "ours" and e.tokens:
            n = min(len(ours), len(e.tokens))
            out[name] = sum(a == b for a, b in zip(ours[:n], e.tokens[:n])) / n if n else None
    return out


def _speeds(row: dict) -> str:
    return ", ".join(f"{n} {e['tokens_per_s']:.1f} tok/s" for n, e in row["engines"].items())


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- tap overhead ------------------------------------------------------------------------

TAP_MODES = ("off", "stats_all", "full_layer")


def tap_recorder(mode: str, n_layers: int, layer: int):
    if mode == "off":
        return None
    if mode == "stats_all":
        return Taps(tap_names(n_layers), "stats")
    return Taps(select([f"layers.{layer}.*"], n_layers), "full")


def collect(taps) -> None:
    """What a user of the taps waits for: stats on the host, or the full tensors evaluated."""
    if taps is None:
        return
    if taps.mode == "stats":
        taps.stats()
    else:
        mx.eval(list(taps.tensors.values()))


def tapped_prefill(model, ids: mx.array, mode: str, layer: int) -> float:
    taps = tap_recorder(mode, model.config.num_hidden_layers, layer)
    cache = model.make_cache()
    mx.synchronize()
    t0 = time.perf_counter()
    logits = model(ids, cache=cache, tap=taps or NO_TAPS)
    mx.eval(logits)
    collect(taps)
    return time.perf_counter() - t0


def tapped_decode(model, context: mx.array, n: int, mode: str, layer: int) -> float:
    """N greedy steps, each recorded with fresh taps; pipelined like the taps-off
    loop: step k's taps are read back after step k+1 is queued."""
    if mode == "off":
        engine = MLXEngine("ours", model, model.make_cache)
        return engine.decode(context, n)
    cache = model.make_cache()
    token = fast.next_token(fast.prefill(fast.model_step(model), context, cache))
    mx.eval(token)
    n_layers = model.config.num_hidden_layers
    mx.synchronize()
    t0 = time.perf_counter()
    previous = None
    for _ in range(n):
        taps = tap_recorder(mode, n_layers, layer)
        token = fast.next_token(model(token, cache=cache, tap=taps))
        mx.async_eval(token)
        collect(previous)
        previous = taps
    collect(previous)
    token.item()
    return time.perf_counter() - t0


def tap_overhead_section(lm, s: Settings) -> dict:
    cfg, model = lm.config, lm.model
    T = s.tap_prompt_length or s.prompt_lengths[0]
    ids = synthetic_ids(T, cfg.vocab_size, s.seed)
    context = synthetic_ids(s.decode_context, cfg.vocab_size, s.seed)
    n = s.tap_decode_tokens
    out = {"prefill_tokens": T, "decode_context": s.decode_context, "decode_tokens": n,
           "full_layer": s.tap_layer, "stats_taps": len(tap_names(cfg.num_hidden_layers)),
           "full_taps": len(LAYER_STAGES)}
    for phase, run, work in (("prefill", lambda m: tapped_prefill(model, ids, m, s.tap_layer), T),
                             ("decode", lambda m: tapped_decode(model, context, n, m, s.tap_layer), n)):
        times = alternate({m: (lambda m=m: run(m)) for m in TAP_MODES}, s.repeats, s.warmup)
        modes = {m: summarize(times[m], work) for m in TAP_MODES}
        off = modes["off"]["median_s"]
        out[phase] = {"modes": modes, "ratios": {m: modes[m]["median_s"] / off for m in TAP_MODES if m != "off"}}
        _progress(f"tap overhead ({phase}): " + ", ".join(f"{m} x{r:.2f}" for m, r in out[phase]["ratios"].items()))
    return out


# --- per-stage cost ----------------------------------------------------------------------

STAGE_METHOD = (
    "Each stage kind is timed in isolation: for every layer, the model's own sub-module "
    "(attention with its KV cache, MLP) or op (RMSNorm, residual add) runs on a random input "
    "of the right shape and dtype, all layers in one evaluated graph, median of the repeats; "
    "decode attention reads a KV cache holding `context` positions. The sum of the parts is "
    "compared with the whole forward pass timed the same way (coverage = sum / whole); the "
    "difference is what fusion across stages and scheduling gain or lose."
)


def _random(shape, dtype, seed) -> mx.array:
    return mx.random.normal(shape, key=mx.random.key(seed)).astype(dtype)


def _filled_caches(lm, context: int, dtype) -> list:
    cfg = lm.config
    caches = lm.model.make_cache()
    for i, c in enumerate(caches):
        shape = (1, cfg.num_key_value_heads, context, cfg.head_dim)
        c.update_and_fetch(_random(shape, dtype, 2 * i), _random(shape, dtype, 2 * i + 1))
    mx.eval([c.state for c in caches])
    return caches


def stage_graphs(lm, T: int, context: int) -> dict:
    """Stage kind -> a function building the outputs of that kind for every layer
    (T query tokens after `context` cached positions)."""
    model, cfg = lm.model, lm.config
    ops, dt = model.ops, lm.model.model.norm.weight.dtype
    x = _random((1, T, cfg.hidden_size), dt, 7)
    ids = synthetic_ids(T, cfg.vocab_size, 0)
    layers = model.model.layers
    caches = _filled_caches(lm, context, dt) if context else None

    def attention():
        outs = []
        for i, layer in enumerate(layers):
            cache = caches[i] if caches else model.make_cache()[0]
            outs.append(layer.self_attn(x, ops, model._rope, cache, NO_TAPS, layer.prefix))
            if caches:
                cache.offset = context  # the next sample writes the same slot again
        return outs

    head = model.model.embed_tokens.as_linear if cfg.tie_word_embeddings else model.lm_head
    return {
        "embed": lambda: [model.model.embed_tokens(ids)],
        "norm": lambda: [ops.rms_norm(x, w, cfg.rms_norm_eps) for layer in layers
                         for w in (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)]
        + [ops.rms_norm(x, model.model.norm.weight, cfg.rms_norm_eps)],
        "attention": attention,
        "mlp": lambda: [layer.mlp(x, ops, NO_TAPS, layer.prefix) for layer in layers],
        "residual": lambda: [x + x * (k + 1) for k in range(2 * len(layers))],
        "lm_head": lambda: [head(x)],
    }, caches


def time_graph(build, repeats: int, warmup: int) -> list[float]:
    times = []
    for k in range(warmup + repeats):
        mx.synchronize()
        t0 = time.perf_counter()
        mx.eval(build())
        if k >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def whole_forward(lm, T: int, context: int):
    """One forward pass of T tokens after `context` cached positions, taps off."""
    cfg = lm.config
    ids = synthetic_ids(T, cfg.vocab_size, 1)
    caches = _filled_caches(lm, context, lm.model.model.norm.weight.dtype) if context else None

    def build():
        cache = caches if caches else lm.model.make_cache()
        out = lm.model(ids, cache=cache)
        if caches:
            for c in caches:
                c.offset = context
        return out

    return build


def stages_section(lm, s: Settings) -> dict:
    T = s.tap_prompt_length or s.prompt_lengths[0]
    out = {"method": STAGE_METHOD}
    for phase, tokens, context in (("prefill", T, 0), ("decode", 1, s.decode_context)):
        graphs, _ = stage_graphs(lm, tokens, context)
        kinds = {k: statistics.median(time_graph(graphs[k], s.repeats, s.warmup)) for k in STAGE_KINDS}
        whole = statistics.median(time_graph(whole_forward(lm, tokens, context), s.repeats, s.warmup))
        parts = sum(kinds.values())
        out[phase] = {
            "tokens": tokens, "context": context,
            "kinds": {k: {"seconds": v, "share_of_parts": v / parts} for k, v in kinds.items()},
            "sum_of_parts_s": parts, "whole_forward_s": whole, "coverage": parts / whole,
        }
        top = max(kinds, key=kinds.get)
        _progress(f"stages ({phase}): {top} {100 * kinds[top] / parts:.0f}% of the parts, coverage {parts / whole:.2f}")
    return out


# --- Metal capture --------------------------------------------------------------------------


def check_metal_capture(path: str | None) -> None:
    if not path:
        return
    if not mx.metal.is_available():
        raise UserError(
            f"--metal-capture records a Metal GPU trace for Xcode and needs MLX's Metal backend (a Mac with "
            f"Apple silicon); this run is on {cli_common.device_description()}"
        )
    if os.environ.get("MTL_CAPTURE_ENABLED") != "1":
        raise UserError("Metal capture needs the environment variable MTL_CAPTURE_ENABLED=1 from the start: "
                        "run again as `MTL_CAPTURE_ENABLED=1 python -m mlx_tinyllama.trace bench ...`")
    p = Path(path)
    if p.suffix != ".gputrace":
        raise UserError("--metal-capture writes an Xcode GPU trace: give a path ending in .gputrace")
    if p.exists():
        raise UserError(f"{p} exists: Metal will not overwrite a capture, remove it or pick another path")
    if not p.resolve().parent.is_dir():
        raise UserError(f"cannot write {p}: its directory does not exist")


def metal_capture(lm, s: Settings, path: str) -> dict:
    """One decode step recorded with MLX's Metal capture API (checked by check_metal_capture)."""
    cache = lm.model.make_cache()
    context = synthetic_ids(s.decode_context, lm.config.vocab_size, s.seed)
    token = fast.next_token(fast.prefill(fast.model_step(lm.model), context, cache))
    mx.eval(token)
    mx.metal.start_capture(path)
    try:
        mx.eval(lm.model(token, cache=cache))
    finally:
        mx.metal.stop_capture()
    return {"path": path, "what": f"one decode step at context {s.decode_context}"}


# --- the whole run ----------------------------------------------------------------------------


def run(lm, s: Settings, metal_capture_path: str | None = None, argv: list[str] | None = None) -> dict:
    cfg = lm.config
    validate(s, cfg)
    check_metal_capture(metal_capture_path)
    device = device_report(s.peak_bandwidth_gbs)
    wb = weight_bytes(lm)
    engines = {"ours": ours_engine(lm)}
    if s.vs_dtype and s.vs_dtype != lm.dtype:
        from .sources import load

        other = load(str(lm.source.path), s.vs_dtype, lm.ops.policy, lm.ops.kernels)
        engines[f"ours_{other.dtype}"] = MLXEngine(f"ours_{other.dtype}", other.model, other.model.make_cache)
    if s.with_mlx_lm:
        engines["mlx_lm"] = mlx_lm_engine(lm)
    result = {
        "format": FORMAT,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": argv,
        "model": {"spec": lm.source.spec, "config": cfg.as_dict(), **wb},
        "dtype": lm.dtype, "policy": lm.ops.policy, "kernels": lm.ops.kernels,
        "device": device, "versions": cli_common.versions(), "settings": asdict(s),
    }
    if s.with_transformers and lm.source.format == "hf":
        torch_engine = TorchEngine(lm.source.path, lm.dtype)
        engines["transformers"] = torch_engine
        result["transformers"] = {"device": torch_engine.describe(), "attention": "sdpa"}
    elif s.with_transformers:
        raise UserError("--with-transformers needs a Hugging Face model directory (not a .gguf file)")
    result["prefill"] = prefill_section(engines, s, cfg)
    decoders = {"ours": engines["ours"], "ours_compiled": ours_compiled_engine(lm, s.decode_context + s.decode_tokens)}
    decoders.update({n: e for n, e in engines.items() if n != "ours"})
    result["decode"] = decode_section(decoders, s, cfg, wb["per_decode_token_bytes"], device["peak_bandwidth_gbs"])
    if s.tap_overhead:
        result["tap_overhead"] = tap_overhead_section(lm, s)
    if s.stages:
        result["stages"] = stages_section(lm, s)
    if metal_capture_path:
        result["metal_capture"] = metal_capture(lm, s, metal_capture_path)
    return result

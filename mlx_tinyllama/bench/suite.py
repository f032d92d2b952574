"""The whole `bench` run: prefill and decode throughput of every engine, then tap overhead,
per-stage cost and a Metal capture when asked, in one result (docs/json.md)."""

from __future__ import annotations

import datetime
from dataclasses import asdict

from ..errors import UserError
from ..results import ResultHeader
from .timing import Settings, alternate, progress, summarize, synthetic_ids, validate
from .engines import TorchEngine, mlx_lm_engine, ours_engine
from .devices import bandwidth, check_metal_capture, device_report, metal_capture, weight_bytes
from .taps import tap_overhead_section
from .stages import stages_section


FORMAT = "mlx_tinyllama.bench/1"


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
        progress(f"prefill {T}: " + _speeds(row))
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
    progress("decode: " + _speeds(out))
    return out


def add_ratios(row: dict) -> None:
    """ours / other engine, from the median tokens/s of each (>1: ours is faster)."""
    speeds = {name: e["tokens_per_s"] for name, e in row["engines"].items()}
    for a in (n for n in speeds if n.startswith("ours")):
        for b in (n for n in speeds if not n.startswith("ours")):
            row[f"ratio_{a}_over_{b}"] = speeds[a] / speeds[b]


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


# --- the whole run ----------------------------------------------------------------------------


def run(lm, s: Settings, metal_capture_path: str | None = None, argv: list[str] | None = None) -> dict:
    cfg = lm.config
    validate(s, cfg)
    check_metal_capture(metal_capture_path)
    device = device_report(s.peak_bandwidth_gbs)
    wb = weight_bytes(lm)
    engines = {"ours": ours_engine(lm)}
    if s.with_mlx_lm:
        engines["mlx_lm"] = mlx_lm_engine(lm)
    result = {
        **ResultHeader.of_run("bench", lm).as_dict(),
        "format": FORMAT,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": argv, "weights": wb, "hardware": device, "settings": asdict(s),
    }
    if s.with_transformers and lm.source.format == "hf":
        torch_engine = TorchEngine(lm.source.path, lm.dtype)
        engines["transformers"] = torch_engine
        result["transformers"] = {"device": torch_engine.describe(), "attention": "sdpa"}
    elif s.with_transformers:
        raise UserError("--with-transformers needs a Hugging Face model directory (not a .gguf file)")
    result["prefill"] = prefill_section(engines, s, cfg)
    result["decode"] = decode_section(engines, s, cfg, wb["per_decode_token_bytes"], device["peak_bandwidth_gbs"])
    if s.tap_overhead:
        result["tap_overhead"] = tap_overhead_section(lm, s)
    if s.stages:
        result["stages"] = stages_section(lm, s)
    if metal_capture_path:
        result["metal_capture"] = metal_capture(lm, s, metal_capture_path)
    return result

"""The machine and what bounds it: the device, its BLAS, its peak memory bandwidth
(a datasheet table), the weight bytes a decode step reads, and Metal GPU capture."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .. import fast, runtime
from ..errors import UserError
from .timing import Settings, synthetic_ids


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
        "description": runtime.device_description(),
        "backend": ("metal" if mx.metal.is_available() else "cuda") if gpu else "cpu",
        "name": name,
        "memory_bytes": info.get("memory_size") or info.get("total_memory"),
        "blas": None if gpu else blas_library(),
        "mlx_max_ops_per_buffer": os.environ.get("MLX_MAX_OPS_PER_BUFFER"),  # MLX's graph batch size, if set
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


# --- Metal capture --------------------------------------------------------------------------


def check_metal_capture(path: str | None) -> None:
    if not path:
        return
    if not mx.metal.is_available():
        raise UserError(
            f"--metal-capture records a Metal GPU trace for Xcode and needs MLX's Metal backend (a Mac with "
            f"Apple silicon); this run is on {runtime.device_description()}"
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

"""Running a loaded model and describing the run: one tapped prefill, the top-k next
tokens, the model's tokenizer, and where it ran (device, library versions)."""

from __future__ import annotations

import platform

import mlx.core as mx

from . import sources
from .taps import Taps, select


def tokenizer_for(lm: sources.LoadedModel, kind: str | None = None):
    """The model's own tokenizer (`kind`: sentencepiece, the default, or hf)."""
    from .tokenizer import load_tokenizer

    return load_tokenizer(lm.source.path, kind or "auto")


def model_header(lm: sources.LoadedModel) -> dict:
    """Which model a result is about: spec, format, where it came from, its config."""
    src = lm.source
    return {"spec": src.spec, "format": src.format, "origin": src.origin, "path": str(src.path),
            "details": src.details, "config": lm.config.as_dict()}


def forward(lm: sources.LoadedModel, ids: list[int], patterns=(), mode: str = "stats"):
    """One prefill of `ids` with the taps matching `patterns`. Returns (Taps or None, logits [T, V])."""
    lm.config.check_ids(ids)
    names = select(patterns, lm.config.num_hidden_layers) if patterns else []
    taps = Taps(names, mode) if names else None
    logits = lm.model(mx.array(ids), tap=taps) if taps else lm.model(mx.array(ids))
    mx.eval(logits)
    return taps, logits[0]


def top_k(logits_row: mx.array, k: int, tokenizer=None) -> list[dict]:
    row = logits_row.astype(mx.float32)
    k = min(k, row.shape[-1])
    idx = mx.argsort(-row)[:k]
    vals = row[idx]
    probs = mx.softmax(row)[idx]
    out = []
    for i, v, p in zip(idx.tolist(), vals.tolist(), probs.tolist()):
        out.append({"token_id": int(i), "logit": float(v), "prob": float(p),
                    "token": tokenizer.piece(int(i)) if tokenizer is not None else None})
    return out


def device_description() -> str:
    dev = mx.default_device()
    if dev.type == mx.gpu:
        try:
            info = mx.device_info()
            name = info.get("device_name") or info.get("architecture") or "GPU"
        except Exception:  # backends differ in what they report
            name = "GPU"
        backend = "Metal" if mx.metal.is_available() else ("CUDA" if _cuda_available() else "GPU")
        return f"{backend} {name}"
    return f"CPU ({platform.machine()})"


def _cuda_available() -> bool:
    try:
        return bool(mx.cuda.is_available())
    except AttributeError:
        return False


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import mlx_tinyllama

    out = {"mlx_tinyllama": mlx_tinyllama.__version__, "mlx": mx.__version__, "python": platform.python_version()}
    try:  # metadata only: importing mlx_lm would pull in transformers and torch (seconds)
        out["mlx_lm"] = version("mlx-lm")
    except PackageNotFoundError:
        pass
    return out

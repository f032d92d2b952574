"""Options and steps that several commands share: which model, which dtype and
policy, loading with progress, running a tapped forward pass, writing JSON."""

from __future__ import annotations

import json
import math
import platform
import sys
from pathlib import Path

import mlx.core as mx

from . import sources
from .errors import UserError
from .ops import KERNELS, POLICIES
from .taps import Taps, select


def add_model_arguments(parser, default_dtype: str = "float16") -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", default="synthetic",
                   help="model directory, .gguf file, Hugging Face repo id, or synthetic[:preset][:seed=N] "
                        "(presets: tiny, small, medium, tinyllama; default: synthetic = TinyLlama-1.1B shape)")
    g.add_argument("--dtype", default=default_dtype, help="float16 (default, as the reference), bfloat16, float32")
    g.add_argument("--policy", default="hf", choices=POLICIES,
                   help="precision policy: hf (RMSNorm statistics and softmax in fp32, as transformers), "
                        "mixed (attention scores in fp32 too), fp16-pure (everything in the model dtype)")
    g.add_argument("--kernels", default=None, choices=KERNELS,
                   help="fused mx.fast kernels or explicit sub-operations (default: fused for --policy hf, "
                        "explicit otherwise)")
    g.add_argument("--download", action="store_true",
                   help="allow downloading a Hugging Face repo id that is not in the local cache")


def _progress():
    """A rich progress bar on a terminal (generating or reading big weights); silent otherwise."""
    if not sys.stderr.isatty():
        return None, None
    from rich.progress import Progress

    prog = Progress(transient=True, console=_console(stderr=True))
    task = prog.add_task("loading", total=None)
    started = [False]

    def update(done, total, label="loading"):
        if not started[0]:
            prog.start()
            started[0] = True
        prog.update(task, completed=done, total=total, description=label)

    return prog, update


def load_model(args) -> sources.LoadedModel:
    prog, update = _progress()
    if sys.stderr.isatty():
        print(f"loading {args.model} ({sources.dtype_name(args.dtype)}) ...", file=sys.stderr)
    try:
        return sources.load(args.model, args.dtype, args.policy, args.kernels,
                            allow_download=args.download, progress=update)
    finally:
        if prog is not None:
            prog.stop()


def check_writable(path, option: str = "") -> None:
    """Checked before the model loads, so a bad output path costs nothing and leaves no partial outputs."""
    if not path:
        return
    what = f"{option} {path}" if option else str(path)
    if not Path(path).expanduser().resolve().parent.is_dir():
        raise UserError(f"cannot write {what}: its directory does not exist")
    if Path(path).expanduser().is_dir():
        raise UserError(f"cannot write {what}: it is a directory; give a file path")


def prompt_for(args, lm: sources.LoadedModel):
    """The prompt options in `args`, tokenized with the model's tokenizer and chat template."""
    from .prompt import resolve_prompt

    location = lm.source.path
    return resolve_prompt(args, location, location if location.is_dir() else None)


def tokenizer_for(lm: sources.LoadedModel, args=None):
    from .tokenizer import load_tokenizer

    return load_tokenizer(lm.source.path, getattr(args, "tokenizer", None) or "sentencepiece")


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


def fmt(v, digits: int = 4) -> str:
    """One number format for every table: `digits` significant digits, scientific when tiny or huge."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.{max(digits - 2, 1)}e}"
        return f"{v:.{digits}g}"
    return str(v)


def _clean(obj):
    """JSON has no NaN/Inf: write them as strings so files stay valid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(path: str | Path, obj) -> None:
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise UserError(f"cannot write {path}: directory {path.parent} does not exist")
    path.write_text(json.dumps(_clean(obj), indent=1) + "\n")


def _console(stderr: bool = False):
    import os

    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Piped output (logs, CI, diffs against another engine) gets wide tables, not 80 columns.
    width = None if stream.isatty() or os.environ.get("COLUMNS") else 200
    return Console(stderr=stderr, highlight=False, width=width)


def console():
    return _console()

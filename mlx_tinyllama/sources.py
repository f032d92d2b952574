"""One resolver for every `--model` spec, and the loader that builds the MLX model.

Specs:
- a local HF directory: config.json + model.safetensors, or shards listed in
  model.safetensors.index.json;
- a `.gguf` file (see gguf.py);
- a Hugging Face repo id (`TinyLlama/TinyLlama-1.1B-Chat-v1.0`): the local HF
  cache first; a download only with `allow_download` and a network;
- `synthetic[:preset][:seed=N]`: a generated model of the TinyLlama architecture
  (synthetic.py), written as an HF directory and loaded like one.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from . import dtypes
from .config import ModelConfig, load_config
from .errors import UserError, read_bytes
from .model import TinyLlama
from .ops import POLICIES, Ops, cpu_half_gemm, use_fp32_gemm

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
HF_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.model",
               "tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json"]
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class ModelSource:
    spec: str
    path: Path  # HF directory or .gguf file
    format: str  # "hf" or "gguf"
    origin: str  # "local", "hf-cache", "download", "synthetic"
    details: dict = field(default_factory=dict)

    def describe(self) -> str:
        extra = f" ({self.details['layout']})" if "layout" in self.details else ""
        return f"{self.spec} [{self.format}, {self.origin}: {self.path}]{extra}"


@dataclass
class LoadedModel:
    model: TinyLlama
    config: ModelConfig
    source: ModelSource
    dtype: str

    @property
    def ops(self) -> Ops:
        return self.model.ops


def dtype_name(name: str) -> str:
    name = dtypes.canonical(name)
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)} (or fp16/bf16/fp32)")
    return name


def resolve(spec: str, allow_download: bool = False, progress=None) -> ModelSource:
    if spec == "synthetic" or spec.startswith("synthetic:"):
        from . import synthetic

        preset, seed = synthetic.parse_spec(spec)
        path = synthetic.materialize(preset, seed, progress=progress)
        return ModelSource(spec, path, "hf", "synthetic", {"preset": preset, "seed": seed})
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" or (path.is_file() and _is_gguf(path)):
        if path.is_dir():
            raise UserError(f"--model {path} is a directory, not a GGUF file")
        if not path.is_file():
            raise UserError(f"GGUF file {path} does not exist")
        return ModelSource(spec, path, "gguf", "local")
    if path.is_dir():
        _check_listable(path)
        return ModelSource(spec, path, "hf", "local")
    if path.exists():
        raise UserError(f"{spec} is a file but neither a GGUF file nor a model directory")
    if REPO_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return _resolve_repo(spec, allow_download)
    raise UserError(
        f"model {spec!r} not found: give a model directory, a .gguf file, a Hugging Face repo id "
        "(e.g. TinyLlama/TinyLlama-1.1B-Chat-v1.0) or synthetic[:preset]"
    )


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError as e:
        raise UserError(f"--model: cannot read {path}: {e.strerror or e}") from None


def _check_listable(path: Path) -> None:
    """An unreadable model directory is one clear line, not "has no config.json" or a traceback."""
    try:
        with os.scandir(path) as entries:
            next(entries, None)
    except OSError as e:
        raise UserError(f"--model: cannot read the directory {path}: {e.strerror or e}") from None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _resolve_repo(repo_id: str, allow_download: bool) -> ModelSource:
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id, allow_patterns=HF_PATTERNS, local_files_only=True))
        if (path / "config.json").is_file():
            return ModelSource(repo_id, path, "hf", "hf-cache")
    except Exception:  # not in the cache (huggingface_hub raises several types here)
        pass
    how = (
        f"download it on a machine with network: `{_hub_cli()} download {repo_id}` "
        f"(or `python -m mlx_tinyllama.trace --model {repo_id} --download`), "
        "or pass a local directory with --model PATH"
    )
    if not allow_download:
        raise UserError(f"{repo_id} is not in the local Hugging Face cache; {how}")
    if _offline():
        raise UserError(f"{repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {how}")
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=HF_PATTERNS))
    except Exception as e:  # network errors, missing repo, auth
        raise UserError(f"could not download {repo_id}: {type(e).__name__}: {e}; {how}") from None
    return ModelSource(repo_id, path, "hf", "download")


def _hub_cli() -> str:
    """The Hub's command-line tool: `hf` since huggingface_hub 0.34; 1.0 removed `huggingface-cli`."""
    import huggingface_hub

    try:
        major, minor = (int(x) for x in huggingface_hub.__version__.split(".")[:2])
    except ValueError:  # a dev build with an odd version string: assume a current one
        return "hf"
    return "hf" if (major, minor) >= (0, 34) else "huggingface-cli"


def read_config(spec: str) -> ModelConfig:
    """The config of a model spec without reading (or generating) its weights."""
    if spec == "synthetic" or spec.startswith("synthetic:"):
        from . import synthetic

        preset, _ = synthetic.parse_spec(spec)
        return synthetic.PRESETS[preset]
    source = resolve(spec)
    if source.format == "gguf":
        from .gguf import read_config as read_gguf_config

        return read_gguf_config(source.path)
    return load_config(source.path)


def tokenizer_location(spec: str) -> Path:
    """Where the tokenizer of a model spec lives (directory or .gguf), without loading weights."""
    if spec == "synthetic" or spec.startswith("synthetic:"):
        from . import synthetic

        synthetic.parse_spec(spec)  # validates the preset
        return synthetic.PACKAGE_TOKENIZER.parent
    return resolve(spec).path


# --- weights --------------------------------------------------------------------


WEIGHT_DTYPES = (mx.float16, mx.bfloat16, mx.float32)  # what a Llama checkpoint stores; others are corrupt
MAX_INDEX_BYTES = 16 << 20


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        if index.stat().st_size > MAX_INDEX_BYTES:
            raise UserError(f"{index} is {index.stat().st_size} bytes; an index is at most a few MB")
        try:
            weight_map = json.loads(read_bytes(index, "safetensors index"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{index} is malformed: {type(e).__name__}: {e}") from None
        # Shards live beside the index: a name that leaves the directory is not a shard.
        bad = [n for n in names if not isinstance(n, str) or Path(n).name != n or n in ("", ".", "..")]
        if bad:
            raise UserError(f"{index}: weight_map names {bad[0]!r}, which is not a file name in {model_dir}")
        files = [model_dir / n for n in names]
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{model_dir} lacks shard(s) listed in its index: {', '.join(missing)}")
        return files
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    others = sorted(model_dir.glob("*.safetensors"))
    if others:
        return others
    raise UserError(
        f"{model_dir} has no weights: expected model.safetensors or model.safetensors.index.json "
        "(PyTorch .bin checkpoints are not read: convert them to safetensors)"
    )


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".npz")


def other_weight_files(model_dir: Path) -> list[str]:
    """Weight files in `model_dir` beside the ones this loader reads. Another loader (transformers)
    ranks them differently (it prefers model.safetensors to an index, and .bin to a stray shard) and
    could run other weights than ours on the same directory."""
    ours = {f.name for f in weight_files(model_dir)} | {"model.safetensors.index.json"}
    found = []
    for f in sorted(model_dir.iterdir()):
        if f.name in ours:  # the index is read whenever it exists
            continue
        if f.name.endswith(_WEIGHT_SUFFIXES) or f.name.endswith(".index.json"):
            found.append(f.name)
    return found


def read_safetensors(files: list[Path]) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for f in files:
        _check_safetensors_header(f)
        try:
            weights.update(mx.load(str(f), format="safetensors"))
        except Exception as e:  # truncated or not a safetensors file
            raise UserError(f"cannot read {f}: {e} (truncated or not a safetensors file?)") from None
    return weights


_SAFETENSORS_FLOATS = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}


def safetensors_header(f: Path) -> dict:
    """The JSON header of a safetensors file, read ourselves and bounded by the bytes the file holds
    (the one reader of it: weights, dumps, their metadata and stored dtypes). UserError, with a
    precise line, for a directory, an unreadable or truncated file, a Git LFS pointer, a header
    that claims more bytes than the file holds or is not a JSON object."""
    import struct

    f = Path(f)
    if f.is_dir():
        raise UserError(f"{f} is a directory, not a safetensors file")
    try:
        with open(f, "rb") as fh:
            head = fh.read(8)
            size = os.fstat(fh.fileno()).st_size
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            body = fh.read(n) if len(head) == 8 and n <= min(size - 8, 100 << 20) else b""
    except OSError as e:
        raise UserError(f"cannot read {f}: {e.strerror or e}") from None
    if head.startswith(b"version "):
        raise UserError(f"cannot read {f}: it is a Git LFS pointer, not the weights (run `git lfs pull`)")
    if len(head) < 8:
        raise UserError(f"cannot read {f}: {size} bytes, too short for a safetensors header (truncated?)")
    if n > size - 8 or n > 100 << 20:
        raise UserError(f"cannot read {f}: its header claims {n} bytes, the file has {size} "
                        "(truncated or not a safetensors file?)")
    try:
        header = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"cannot read {f}: its header is not JSON (not a safetensors file?)") from None
    if not isinstance(header, dict):
        raise UserError(f"cannot read {f}: its header is not a JSON object (not a safetensors file?)")
    return header


def _check_safetensors_header(f: Path) -> None:
    """Read the header ourselves first: a directory, an unreadable file, a header that claims more bytes
    than the file holds, or a non-float tensor gets a precise line instead of MLX's generic error (an
    integer weight would otherwise be converted and run as garbage)."""
    header = safetensors_header(f)
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if dtype not in _SAFETENSORS_FLOATS:
            raise UserError(f"weight {name} in {f} has dtype {dtype}; expected "
                            f"{', '.join(_SAFETENSORS_FLOATS.values())} (a checkpoint's weights are floats)")


def check_weights(weights: dict[str, mx.array], cfg: ModelConfig, where: str) -> None:
    """Refuse missing, unknown, wrongly shaped or non-float weights; drop (in place) the ones a Llama
    checkpoint may carry that this model recomputes or does not use."""
    expected = cfg.weight_shapes()
    if cfg.tie_word_embeddings:
        weights.pop("lm_head.weight", None)  # tied: the embedding serves as lm_head
    for name in [n for n in weights if n.endswith("rotary_emb.inv_freq")]:
        weights.pop(name)  # old transformers checkpoints store this buffer; it is recomputed
    missing = [n for n in expected if n not in weights]
    if missing:
        raise UserError(f"{where} lacks {len(missing)} weight(s), e.g. {', '.join(missing[:3])}")
    unexpected = [n for n in weights if n not in expected]
    if unexpected:
        raise UserError(f"{where} has weights this Llama model does not use, e.g. {', '.join(unexpected[:3])}")
    for n, shape in expected.items():
        if tuple(weights[n].shape) != shape:
            raise UserError(
                f"weight {n} in {where} has shape {tuple(weights[n].shape)}, but config.json implies {shape}"
            )
        if weights[n].dtype not in WEIGHT_DTYPES:
            # An integer or boolean tensor is not a checkpoint's weight: converting it would run garbage.
            raise UserError(f"weight {n} in {where} has dtype {str(weights[n].dtype).replace('mlx.core.', '')}; "
                            "expected float16, bfloat16 or float32")


def build_model(cfg: ModelConfig, weights: dict[str, mx.array], dtype: str, ops: Ops, progress=None) -> TinyLlama:
    model = TinyLlama(cfg, ops)
    dt = DTYPES[dtype]
    model.load_weights([(n, w.astype(dt)) for n, w in weights.items()], strict=True)
    # Weights are read lazily from the file: evaluating them layer by layer shows progress.
    parts = [model.model.embed_tokens, *model.model.layers, model.model.norm]
    parts += [model.lm_head] if not cfg.tie_word_embeddings else []
    for k, part in enumerate(parts):
        mx.eval(part.parameters())
        if progress:
            progress(k + 1, len(parts), f"reading weights ({dtype})")
    if cpu_half_gemm(dt):  # half matmuls on the CPU: fp32 GEMM (ops.py says why)
        use_fp32_gemm(model)
    return model


def check_policy(policy: str) -> str:
    """The one check of a precision policy name the user gave."""
    if policy not in POLICIES:
        raise UserError(f"unknown precision policy {policy!r}; choose one of {', '.join(POLICIES)}")
    return policy


def make_ops(policy: str = "hf", kernels: str | None = None) -> Ops:
    """Ops for a policy and kernels (default: fused for 'hf', else explicit); Ops checks the names."""
    if kernels is None:
        kernels = "fused" if check_policy(policy) == "hf" else "explicit"
    return Ops(policy, kernels)


def load(spec: str, dtype: str = "float16", policy: str = "hf", kernels: str | None = None,
         allow_download: bool = False, progress=None) -> LoadedModel:
    """Resolve `spec`, read its weights, and return the MLX model in `dtype`."""
    dtype = dtype_name(dtype)
    ops = make_ops(policy, kernels)
    source = resolve(spec, allow_download, progress=progress)
    if source.format == "gguf":
        from .gguf import load_gguf

        ckpt = load_gguf(source.path, DTYPES[dtype])
        cfg, weights = ckpt.config, dict(ckpt.weights)
        source.details.update(ckpt.info)
    else:
        cfg = load_config(source.path)
        weights = read_safetensors(weight_files(source.path))
    check_weights(weights, cfg, str(source.path))
    model = build_model(cfg, weights, dtype, ops, progress)
    return LoadedModel(model, cfg, source, dtype)

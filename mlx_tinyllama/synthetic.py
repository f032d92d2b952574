"""Generated models of the TinyLlama architecture, written as normal HF directories.

No TinyLlama weights reach the machines this project is tested on, so correctness
is proven differentially: the same generated weights go through transformers and
through this package. `materialize()` writes config.json + model.safetensors +
tokenizer.model (+ tokenizer_config.json with TinyLlama's chat template) so a
synthetic model takes exactly the same loader path as a real checkpoint.

Weights are deterministic in (preset, seed): each tensor draws from its own
generator seeded by (seed, tensor name). They are stored as float16 values so
that fp16, bf16-free fp32 runs and transformers all see identical numbers.
Scales follow a trained model's shape of activations: O(1) after each RMSNorm,
attention that is neither uniform nor one-hot, a residual stream that grows
slowly over 22 layers, logits with a few clear leaders.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .errors import UserError
from .stress import BASE_PRESET as STRESS_BASE_PRESET, STRESS_PRESETS

TINYLLAMA = ModelConfig()  # the exact TinyLlama-1.1B architecture (defaults of ModelConfig)

PRESETS: dict[str, ModelConfig] = {
    "tinyllama": TINYLLAMA,
    "tiny": replace(TINYLLAMA, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=0),
    "small": replace(TINYLLAMA, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=2, head_dim=0),
    "medium": replace(TINYLLAMA, hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
                      num_attention_heads=16, num_key_value_heads=4, head_dim=0),
}
# The Llama family beside TinyLlama (issue 25): the published configs' shapes, generated weights.
LLAMA3_ROPE = dict(rope_type="llama3", rope_factor=32.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                   rope_original_max_position=8192)
PRESETS.update({
    "llama3.2-1b": replace(TINYLLAMA, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                           num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                           rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=True,
                           bos_token_id=128000, eos_token_id=128001, **LLAMA3_ROPE),
    "smollm2-135m": replace(TINYLLAMA, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                            num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                            rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
                            bos_token_id=0, eos_token_id=0),
    "qwen2.5-0.5b": replace(TINYLLAMA, architecture="Qwen2ForCausalLM", model_type="qwen2", hidden_size=896,
                            intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                            num_key_value_heads=2, head_dim=64, vocab_size=151936, rope_theta=1000000.0,
                            rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=True,
                            bos_token_id=151643, eos_token_id=151645),
    "mistral-7b": replace(TINYLLAMA, architecture="MistralForCausalLM", model_type="mistral", hidden_size=4096,
                          intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, head_dim=128, vocab_size=32000, max_position_embeddings=32768,
                          sliding_window=4096),
})
# Tiny ones of each for tests: the same features (llama3 RoPE whose scaled band the short prompts
# reach, tied embeddings, q/k/v biases, a window shorter than the seed prompt's 38 tokens).
PRESETS.update({
    "llama3-tiny": replace(PRESETS["tiny"], head_dim=16, rope_theta=500000.0, tie_word_embeddings=True,
                           **dict(LLAMA3_ROPE, rope_factor=8.0, rope_original_max_position=32)),
    "qwen2-tiny": replace(PRESETS["tiny"], architecture="Qwen2ForCausalLM", model_type="qwen2",
                          rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "mistral-tiny": replace(PRESETS["tiny"], architecture="MistralForCausalLM", model_type="mistral",
                            sliding_window=8),
})
DEFAULT_PRESET = "tinyllama"

# Presets whose generated weights are changed afterwards (the fp16 stress models of
# stress.py): name -> tweak; a tweak gets (name, array) and returns the array to store.
WEIGHT_TWEAKS: dict[str, object] = {name: p.tweak for name, p in STRESS_PRESETS.items()}
PRESETS.update({name: PRESETS[STRESS_BASE_PRESET] for name in STRESS_PRESETS})

PACKAGE_TOKENIZER = Path(__file__).parent / "data" / "tokenizer.model"
FORMAT_VERSION = 1  # bump when the generator changes, so caches regenerate


def cache_root() -> Path:
    env = os.environ.get("MLX_TINYLLAMA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mlx_tinyllama"


def parse_spec(spec: str) -> tuple[str, int]:
    """`synthetic`, `synthetic:tiny`, `synthetic:tiny:seed=3` -> (preset, seed)."""
    parts = spec.split(":")[1:]
    preset, seed = DEFAULT_PRESET, 0
    for part in parts:
        if part.startswith("seed="):
            try:
                seed = int(part[5:])
            except ValueError:
                raise UserError(f"bad seed in {spec!r}") from None
        elif part:
            preset = part
    if preset not in PRESETS:
        raise UserError(f"unknown synthetic preset {preset!r}; presets: {', '.join(sorted(PRESETS))}")
    return preset, seed


def _std(name: str, shape: tuple[int, ...]) -> float:
    fan_in = shape[-1]
    if name.endswith(".bias"):
        return 0.5  # Qwen2's q/k/v biases are of the order of the projections' outputs
    if "embed_tokens" in name:
        return 0.02  # small embeddings, as in trained Llamas (seed: embed values ~1e-2)
    if "q_proj" in name or "k_proj" in name:
        return 1.6 / np.sqrt(fan_in)  # scaled scores with std ~2: peaked but not one-hot attention
    if "o_proj" in name or "down_proj" in name:
        return 0.7 / np.sqrt(fan_in)  # each layer adds O(1) to the residual stream
    if "lm_head" in name:
        return 3.0 / np.sqrt(fan_in)  # logits std ~3: a few clear leaders
    return 1.0 / np.sqrt(fan_in)


def generate_weight(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        w = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)  # norms near 1, not all equal
    else:
        w = rng.standard_normal(shape, dtype=np.float32) * np.float32(_std(name, shape))
    return w.astype(np.float16)


def materialize(preset: str = DEFAULT_PRESET, seed: int = 0, root: Path | None = None,
                progress=None) -> Path:
    """Write (once) and return the HF directory of a synthetic model."""
    if preset not in PRESETS:
        raise UserError(f"unknown synthetic preset {preset!r}; presets: {', '.join(sorted(PRESETS))}")
    cfg = PRESETS[preset]
    out = (root or cache_root()) / f"synthetic-{preset}-seed{seed}-v{FORMAT_VERSION}"
    if out.exists():
        if verify(out):
            return out
        _discard(out)  # damaged, edited or from an older writer: rebuilt below
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as e:
        raise UserError(f"cannot write the synthetic model cache {out.parent}: {e.strerror or e} "
                        "(set MLX_TINYLLAMA_CACHE to a writable directory)") from None
    try:
        _write_weights(tmp, cfg, preset, seed, progress)
        hf = cfg.to_hf_dict()
        hf["mlx_tinyllama_synthetic"] = {"preset": preset, "seed": seed, "version": FORMAT_VERSION}
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        shutil.copyfile(PACKAGE_TOKENIZER, tmp / "tokenizer.model")
        (tmp / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(), indent=2))
        (tmp / MANIFEST).write_text(json.dumps(_manifest(tmp), indent=1))  # last: its presence means complete
        try:
            tmp.rename(out)
        except OSError:  # another process won the race: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


SHARD_BYTES = 4 << 30  # a model bigger than this is written in shards of at most this size (with
# model.safetensors.index.json, as HF checkpoints are): the generator then holds one shard, not the model
# (written in one piece, Mistral-7B's 14.5 GB of float16 is held twice: the arrays, and safetensors'
# serialized copy of them; estimated from the code, not measured). Every smaller preset,
# TinyLlama-1.1B and Llama-3.2-1B included, stays one model.safetensors, byte for byte as before.
WORKERS = min(8, os.cpu_count() or 1)  # tensors drawn in parallel: numpy's generators and casts release
# the GIL, and each tensor has its own generator, so the bytes do not depend on the order or the count


def shard_plan(shapes: dict[str, tuple[int, ...]], limit: int) -> list[list[str]]:
    """Tensor names in checkpoint order, cut into shards of at most `limit` float16 bytes (a tensor
    bigger than the limit gets a shard of its own); one shard when the whole fits."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * int(np.prod(shape))
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_weights(d: Path, cfg: ModelConfig, preset: str, seed: int, progress=None,
                   shard_bytes: int | None = None) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from safetensors.numpy import save_file

    tweak = WEIGHT_TWEAKS.get(preset)
    shapes = cfg.weight_shapes()
    plan = shard_plan(shapes, shard_bytes or SHARD_BYTES)
    names = ["model.safetensors"] if len(plan) == 1 else [
        f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors" for k in range(len(plan))]
    done = 0

    def one(name: str) -> np.ndarray:
        w = generate_weight(name, shapes[name], seed)
        return tweak(name, w) if tweak else w

    with ThreadPoolExecutor(WORKERS) as pool:
        for file, shard in zip(names, plan):
            tensors = {}
            for name, w in zip(shard, pool.map(one, shard)):
                tensors[name] = w
                done += 1
                if progress:
                    progress(done, len(shapes), "generating synthetic weights")
            save_file(tensors, str(d / file), metadata={"format": "pt"})
            del tensors
    if len(plan) > 1:
        total = sum(2 * int(np.prod(s)) for s in shapes.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {n: file for file, shard in zip(names, plan) for n in shard}}
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


MANIFEST = "manifest.json"
SAMPLED_ABOVE = 64 << 20  # bigger files: size plus the hash of their first and last MiB (a full hash of
# the 2.2 GB TinyLlama-shaped weights would add seconds to every run)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= SAMPLED_ABOVE:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(f.read(1 << 20))
            f.seek(size - (1 << 20))
            h.update(f.read(1 << 20))
    return h.hexdigest()


def _manifest(d: Path) -> dict:
    return {"format": FORMAT_VERSION,
            "files": {p.name: {"size": p.stat().st_size, "sha256": _digest(p)}
                      for p in sorted(d.iterdir()) if p.name != MANIFEST}}


def verify(d: Path) -> bool:
    """The cached model is exactly what was generated: the manifest (written last) lists every file,
    and every size and hash still matches. Anything else (a file replaced by some output, truncated,
    added or removed, no manifest) means: rebuild."""
    try:
        recorded = json.loads((d / MANIFEST).read_text())
        return recorded == _manifest(d)
    except (OSError, ValueError):
        return False


def _discard(d: Path) -> None:
    aside = d.with_name(f".{d.name}.stale.{os.getpid()}")
    try:
        d.rename(aside)  # out of the way at once, so a concurrent run never loads half of it
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def _tokenizer_config() -> dict:
    from .chat_template import TINYLLAMA_CHAT_TEMPLATE

    return {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
        "model_max_length": 2048,
        "chat_template": TINYLLAMA_CHAT_TEMPLATE,
    }


"""Shared fixtures. Synthetic models are generated once per test session into a
temporary cache (MLX_TINYLLAMA_CACHE), so tests never write to the user's home."""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import pytest

_OWN_CACHE = "MLX_TINYLLAMA_CACHE" not in os.environ
if _OWN_CACHE:
    os.environ["MLX_TINYLLAMA_CACHE"] = tempfile.mkdtemp(prefix="mlx_tinyllama_test_cache_")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# The seed's 38 reference ids (no BOS) for its chat prompt.
SEED_IDS = [529, 29989, 5205, 29989, 29958, 13, 3492, 526, 263, 19780, 13563, 7451, 29889, 2, 29871, 13,
            29966, 29989, 1792, 29989, 29958, 13, 10994, 29991, 1128, 526, 366, 29973, 2, 29871, 13,
            29966, 29989, 465, 22137, 29989, 29958, 13]
PACKAGED = REPO / "mlx_tinyllama" / "data" / "tokenizer.model"  # the package's Llama 2 tokenizer.model
SEED_PROMPT = "<|system|>\nYou are a friendly chatbot.</s>\n<|user|>\nHello! How are you?</s>\n<|assistant|>\n"


def has_torch() -> bool:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


# CI sets MLX_TINYLLAMA_REQUIRE_REFERENCE=1: there a missing reference stack fails instead of skipping.
_REQUIRE_REFERENCE = os.environ.get("MLX_TINYLLAMA_REQUIRE_REFERENCE") == "1"
needs_torch = pytest.mark.skipif(not has_torch() and not _REQUIRE_REFERENCE,
                                 reason="needs the dev extra (torch + transformers)")


def pytest_sessionfinish(session, exitstatus):
    """The session's synthetic models (2.2 GB for the full TinyLlama shape) go with it."""
    if _OWN_CACHE:
        shutil.rmtree(os.environ["MLX_TINYLLAMA_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    from mlx_tinyllama.synthetic import materialize

    return materialize("tiny", 0)


@pytest.fixture(scope="session")
def small_dir() -> Path:
    from mlx_tinyllama.synthetic import materialize

    return materialize("small", 0)


@pytest.fixture(scope="session")
def seed_ids() -> list[int]:
    return list(SEED_IDS)


def assert_close(actual, expected, rel: float = 1e-6, abs: float = 0.0, where: str = "") -> None:
    """Nested dicts/lists of numbers equal within rel/abs; other leaves exactly equal.

    Written out rather than `pytest.approx`, whose handling of nested structures and numpy
    scalars changed between pytest releases (9.2 refuses both)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and sorted(actual) == sorted(expected), f"{where}: keys differ"
        for k in expected:
            assert_close(actual[k], expected[k], rel, abs, f"{where}.{k}")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), f"{where}: lengths differ"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, rel, abs, f"{where}[{i}]")
    elif isinstance(expected, (float, int)) and not isinstance(expected, bool) or hasattr(expected, "dtype"):
        a, e = float(actual), float(expected)
        assert (math.isnan(a) and math.isnan(e)) or math.isclose(a, e, rel_tol=rel, abs_tol=float(abs)), \
            f"{where}: {a!r} != {e!r} (rel {rel}, abs {abs})"
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


@pytest.fixture(scope="session")
def write_tokenizer_dir():
    """`write_tokenizer_dir(out, merges_by="score", config=None)`: a model directory with the
    package's tokenizer.model and a TinyLlama-style tokenizer.json (see below)."""
    return _write_tokenizer_dir


def _write_tokenizer_dir(out: Path, merges_by: str = "score", config: dict | None = None) -> Path:
    """A model directory with tokenizer.model and a TinyLlama-style tokenizer.json (BPE with
    byte fallback, legacy normalizer Prepend("▁") + Replace(" ", "▁"), BOS post-processor).

    merges_by="score" orders BPE merges by SentencePiece piece score (agrees with
    SentencePiece); "vocab" orders them by id, as transformers' SentencePieceExtractor
    does, which disagrees on text starting with a space and on runs of spaces."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, decoders, normalizers, processors
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE

    generate_merges = importlib.import_module("transformers.convert_slow_tokenizer").generate_merges
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(PACKAGED, out / "tokenizer.model")
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(PACKAGED.read_bytes())
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    scores = {p.piece: (p.score if i > 2 else 0.0) for i, p in enumerate(proto.pieces)}
    merges = generate_merges(vocab, scores) if merges_by == "score" else generate_merges(vocab)
    tok = Backend(BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.save(str(out / "tokenizer.json"))
    base = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps({**base, **(config or {})}))
    return out

"""Shared fixtures. Synthetic models are generated once per test session into a
temporary cache (MLX_TINYLLAMA_CACHE), so tests never write to the user's home."""

from __future__ import annotations

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


# CI sets MLX_TINYLLAMA_REQUIRE_COMPILERS=1: there a missing cc or rustc (the kit's tests) fails instead of skipping.
_REQUIRE_COMPILERS = os.environ.get("MLX_TINYLLAMA_REQUIRE_COMPILERS") == "1"


def require_tool(path: str | None, what: str) -> str:
    """`path` when the tool was found; else skip the test, or fail it where CI requires the compilers."""
    if path:
        return path
    if _REQUIRE_COMPILERS:
        pytest.fail(f"MLX_TINYLLAMA_REQUIRE_COMPILERS=1 but no {what} was found")
    pytest.skip(f"no {what} (set MLX_TINYLLAMA_REQUIRE_COMPILERS=1 to make this a failure)")


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

"""The engines timed side by side behind one interface: this package's model and
mlx-lm's Llama on the very same weight arrays (MLX), and transformers on torch."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .. import fast
from ..errors import UserError


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
    """mlx-lm's own model of the checkpoint's architecture (its Llama, Qwen2, ...; Mistral is its
    Llama) from the same config.json, on the same weight arrays (shared, not copied)."""
    from mlx_lm.utils import _get_classes  # mlx-lm's own config -> (Model, ModelArgs) lookup

    config = lm.config.to_hf_dict()
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
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
    from ..decode import CompiledDecoder

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

"""Generation through the KV cache: prefill the prompt once, then one token per step.

Step numbering (used by `--tap-step`): step 0 is the prefill of the whole prompt,
whose last logits row gives generated token 0; step n >= 1 feeds generated token
n-1 at position len(prompt) + n - 1 through the cache and gives token n.

With no tap selected and no cache given, the decode steps run as one compiled
function over a fixed-capacity cache (decode.py); otherwise eagerly, a Python
call per stage. `Generation.decode` records which ("compiled" or "eager").

Sampling uses mlx-lm's samplers (`make_sampler`: temperature, top-p, top-k over
log-probabilities); temperature 0 is greedy (argmax). The sequence (prompt plus
generated tokens) never grows past max_position_embeddings: RoPE positions
beyond it were never trained, so generation stops there with a message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx

from .errors import UserError
from .model import TinyLlama
from .taps import Taps

EOS_ID = 2


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # 1: off
    top_k: int = 0  # 0: off
    seed: int | None = None

    def check(self, vocab_size: int | None = None) -> None:
        """Options mlx-lm's samplers and MLX's generator accept; `vocab_size` bounds --top-k."""
        if not 0 <= self.temperature < float("inf"):  # also refuses NaN
            raise UserError(f"--temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"--top-k must be >= 0 (0 = off), got {self.top_k}")
        if vocab_size is not None and self.top_k >= vocab_size and not self.greedy:
            raise UserError(f"--top-k {self.top_k} keeps the whole vocabulary of {vocab_size} tokens or more; "
                            f"give 1..{vocab_size - 1}, or 0 for no top-k")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise UserError(f"--seed must be in 0..2**64-1 (MLX's generator seed), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def sampler(self) -> Callable[[mx.array], mx.array]:
        """logprobs [1, V] -> token [1] (mlx-lm's sampler chain)."""
        from mlx_lm.sample_utils import make_sampler

        self.check()
        return make_sampler(temp=self.temperature, top_p=self.top_p if self.top_p < 1 else 0.0, top_k=self.top_k)


@dataclass
class Generation:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    stop_reason: str = ""  # "eos", "max_tokens", "max_position"
    step_logits: list[mx.array] = field(default_factory=list)  # [V] per generated token (keep_logits)
    taps: Taps | None = None  # the taps of step `tap_step`
    tap_step: int | None = None
    decode: str = "eager"  # "compiled": steps 1.. ran through decode.CompiledDecoder


def generate_tokens(model, prompt_ids: list[int], max_tokens: int, sampling: Sampling = Sampling(),
                    stop_at_eos: bool = True, on_token: Callable[[int], None] | None = None,
                    tap_step: int | None = None, tap_names=(), tap_mode: str = "stats",
                    cache: list | None = None, keep_logits: bool = False, compiled: bool = True) -> Generation:
    """Generate up to `max_tokens` tokens after `prompt_ids` through the KV cache.

    `cache` defaults to a fixed-capacity cache stepped by a compiled function when no
    tap is selected, else `model.make_cache()`; a given cache (e.g. a faulty one, to
    test it), or a model that wraps ours, runs eagerly. `compiled=False` forces the eager path.
    `on_token(id)` is called as each token is chosen (streaming).
    """
    sampling.check(model.config.vocab_size)
    if max_tokens < 0:
        raise UserError(f"--max-tokens must be >= 0, got {max_tokens}")
    model.config.check_ids(list(prompt_ids))
    max_pos = model.config.max_position_embeddings
    if sampling.seed is not None:
        mx.random.seed(sampling.seed)
    sampler = sampling.sampler()
    gen = Generation(prompt_ids=list(prompt_ids), tap_step=tap_step)
    forward = model
    taps_on = bool(tap_names) and tap_step is not None
    if cache is None and compiled and not taps_on and max_tokens > 1 and isinstance(model, TinyLlama):
        from .decode import CompiledDecoder

        forward = CompiledDecoder(model)
        cache = forward.make_cache(min(len(prompt_ids) + max_tokens, max_pos))
        gen.decode = "compiled"
    cache = model.make_cache() if cache is None else cache
    inputs = list(prompt_ids)
    for step in range(max_tokens):
        if len(prompt_ids) + step >= max_pos:
            gen.stop_reason = "max_position"
            return gen
        taps = Taps(tap_names, tap_mode) if step == tap_step and tap_names else None
        logits = model(mx.array(inputs), cache=cache, tap=taps) if taps else forward(mx.array(inputs), cache=cache)
        row = logits[0, -1].astype(mx.float32)
        token = int(sampler((row - mx.logsumexp(row))[None]).item())
        if taps is not None:
            gen.taps = taps
        if keep_logits:
            gen.step_logits.append(row)
        gen.token_ids.append(token)
        if on_token is not None:
            on_token(token)
        if stop_at_eos and token == EOS_ID:
            gen.stop_reason = "eos"
            return gen
        inputs = [token]
    gen.stop_reason = "max_tokens"
    return gen


def greedy_by_recompute(model, prompt_ids: list[int], n: int) -> tuple[list[int], list[mx.array]]:
    """n greedy tokens, each from a fresh full prefill of prompt + tokens so far (no cache).
    Returns (tokens, last-row logits of each step)."""
    seq, tokens, rows = list(prompt_ids), [], []
    for _ in range(n):
        row = model(mx.array(seq))[0, -1].astype(mx.float32)
        token = int(mx.argmax(row).item())
        tokens.append(token)
        rows.append(row)
        seq.append(token)
    return tokens, rows


class TextStream:
    """Turns token ids into text as they come: prints what decoding the ids so far adds.
    Holds back while the tail is an incomplete UTF-8 byte sequence (shown as U+FFFD)."""

    def __init__(self, tokenizer, write: Callable[[str], None]):
        self.tokenizer, self.write = tokenizer, write
        self.ids: list[int] = []
        self.shown = ""

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        if text.startswith(self.shown):
            self.write(text[len(self.shown):])
        self.shown = text

    def finish(self) -> str:
        text = self.tokenizer.decode(self.ids)
        if text.startswith(self.shown):
            self.write(text[len(self.shown):])
        self.shown = text
        return text

"""What each supported Hugging Face architecture changes in the Llama forward pass: the one
place that tests for an architecture by name (issue 25). Everything else reads the facts
from the model's config (`ModelConfig.arch`).

| class | model_type | differs from Llama 2 by |
| --- | --- | --- |
| LlamaForCausalLM | llama | nothing (TinyLlama, Llama 2); Llama 3.x and SmolLM2 use RoPE `llama3` scaling and tied embeddings, which the config says |
| Qwen2ForCausalLM | qwen2 | biases on q/k/v (not o_proj); no Q/K permutation in its GGUF |
| MistralForCausalLM | mistral | a sliding attention window (`sliding_window`, may be null) |
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    hf_class: str  # transformers' class name, as config.json's "architectures" lists it
    model_type: str  # config.json's "model_type"
    qkv_bias: bool  # q_proj/k_proj/v_proj carry biases whatever the config says (Qwen2)
    bias_key: str | None  # the config key that turns on projection biases (Llama: attention_bias), if any
    sliding_window: bool  # honours config.json's sliding_window
    rope_types: tuple[str, ...]  # RoPE variants this architecture's checkpoints use and this tool runs
    gguf_arch: str  # general.architecture in a GGUF
    gguf_permutes_qk: bool  # llama.cpp's converter reorders Q/K rows into interleaved pairs
    bos_default: bool  # does the tokenizer add BOS by default (the chat templates then write it themselves)
    # What transformers' config class of this architecture assumes for a key config.json leaves out
    # (not null: null means "none" or "as many as the heads"); a hand-written config.json must read
    # here as it reads there (tests/test_family_random.py compares the two).
    absent: tuple[tuple[str, int | None], ...] = ()


ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture("LlamaForCausalLM", "llama", False, "attention_bias", False,
                                     ("default", "linear", "llama3"), "llama", True, True,
                                     (("num_key_value_heads", None), ("max_position_embeddings", 2048))),
    "Qwen2ForCausalLM": Architecture("Qwen2ForCausalLM", "qwen2", True, None, False,
                                     ("default", "linear"), "qwen2", False, False,
                                     (("num_key_value_heads", 32), ("max_position_embeddings", 32768))),
    "MistralForCausalLM": Architecture("MistralForCausalLM", "mistral", False, None, True,
                                       ("default",), "llama", True, True,
                                       (("num_key_value_heads", 8), ("max_position_embeddings", 131072),
                                        ("sliding_window", 4096))),
}
BY_MODEL_TYPE = {a.model_type: a for a in ARCHITECTURES.values()}
DEFAULT = ARCHITECTURES["LlamaForCausalLM"]


def by_name(name: str) -> Architecture:
    return ARCHITECTURES[name]

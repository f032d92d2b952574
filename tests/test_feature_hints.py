"""The hint names what the model adds at the diverging stage (a projection's bias, RoPE's
per-frequency divisors, a sliding window), read from facts: the stage table's `feature`, the
config and the architecture table; never from an architecture's name. Proven here away from
llama.cpp and its Qwen2/Llama 3 logs (tests/test_llamacpp_family.py): a Llama 2 with
`attention_bias: true` that transformers makes and initialises, dumped by the independent NumPy
engine with a bias fault; the error-shape primitive on its own; each feature's facts both ways."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SEED_IDS, has_torch
from mlx_tinyllama.config import ModelConfig
from mlx_tinyllama.divergence import feature_hint, feature_leads
from mlx_tinyllama.errorshape import explain
from mlx_tinyllama.synthetic import PRESETS
from mlx_tinyllama.trace import main as cli
from numpy_engine import Engine


@pytest.fixture(scope="module")
def biased_llama(tmp_path_factory):
    """A Llama 2 (LlamaForCausalLM) with attention_bias: true, written by transformers from its own
    initialisation; the biases (zero at init) drawn at the projections' size so that a fault shows."""
    if not has_torch():
        pytest.skip("needs torch + transformers")
    import torch
    import transformers

    torch.manual_seed(7)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=32000, max_position_embeddings=256,
                                   initializer_range=0.2, attention_bias=True)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    out = tmp_path_factory.mktemp("llama-attention-bias")
    model.save_pretrained(str(out))
    return out


def _compare(engine: Engine, model_dir, tmp_path) -> tuple[int, dict]:
    engine.prefill(SEED_IDS)
    dump = engine.dump(tmp_path / "dump.safetensors", SEED_IDS)
    rc = cli(["compare", "--against", str(dump), "--model", str(model_dir), "--dtype", "float32",
              "--json", str(tmp_path / "r.json")])
    return rc, json.loads((tmp_path / "r.json").read_text())


def test_biased_llama_clean_engine_matches(biased_llama, tmp_path):
    # the NumPy engine adds the checkpoint's biases: clean, it matches everywhere (no false alarm)
    rc, result = _compare(Engine(biased_llama), biased_llama, tmp_path)
    assert rc == 0 and result["first_divergence"] is None


@pytest.mark.parametrize("fault", ["v_bias_dropped@1", "k_bias_on_v"])
def test_biased_llama_bias_fault_named_from_the_config(fault, biased_llama, tmp_path):
    rc, result = _compare(Engine(biased_llama, [fault]), biased_llama, tmp_path)
    div = result["first_divergence"]
    layer = fault.partition("@")[2] or "0"
    assert rc == 1 and div["tap"] == f"layers.{layer}.attn.v", div
    assert div["pattern"]["name"] == "offset", div["pattern"]  # the full tensor: one vector off in every row
    hint = div["hint"]
    assert hint.startswith("every token row is off by the same vector"), hint
    named = "this model's v_proj adds a bias (config.json's attention_bias is true)"
    assert named in hint and hint.index(named) < hint.index("v_proj weight orientation"), hint


def test_a_matmul_fault_on_a_biased_model_leads_with_its_own_shape(biased_llama, tmp_path):
    # the other way: q_proj's M loop stopping at row 32 is not a bias fault; its rows shape leads and
    # the bias comes after the stage's own hint
    rc, result = _compare(Engine(biased_llama, ["tile_rows_zero"]), biased_llama, tmp_path)
    div = result["first_divergence"]
    assert rc == 1 and div["tap"] == "layers.0.attn.q" and div["pattern"]["name"] != "offset", div["pattern"]
    hint = div["hint"]
    assert hint.index("q_proj weight orientation") < hint.index("this model's q_proj adds a bias"), hint


def _cfg(preset: str, **changes) -> dict:
    from dataclasses import replace

    return replace(PRESETS[preset], **changes).as_dict()


def test_feature_facts_both_ways():
    llama2, qwen2 = _cfg("tiny"), _cfg("qwen2-tiny")
    assert all(feature_hint(f"layers.0.attn.{s}", llama2) is None
               for s in ("q", "k", "v", "out", "q_rope", "context"))  # Llama 2 adds nothing
    assert "v_proj adds a bias (Qwen2ForCausalLM" in feature_hint("layers.1.attn.v", qwen2)
    assert feature_hint("layers.0.attn.out", qwen2) is None  # Qwen2's o_proj has no bias
    assert "o_proj adds a bias (config.json's attention_bias" in feature_hint(
        "layers.0.attn.out", _cfg("tiny", attention_bias=True))
    assert feature_hint("layers.0.mlp.up", qwen2) is None and feature_hint("logits", qwen2) is None
    llama3 = feature_hint("layers.0.attn.k_rope", _cfg("llama3-tiny"))
    assert "rope_scaling llama3: factor 8" in llama3 and "pair 0: 1, pairs 1-7: 8" in llama3
    assert "reach Q's rotation" not in llama3  # q_rope was not compared: no evidence for either side
    for matched, said in (({"layers.1.attn.q_rope"}, True), ({"layers.0.attn.q_rope"}, False)):
        assert ("reach Q's rotation" in feature_hint("layers.1.attn.k_rope", _cfg("llama3-tiny"), matched)) == said
    gguf = feature_hint("layers.0.attn.q_rope", _cfg("tiny", rope_freq_factors=(1.0, 1.0, 2.5, 4.0) + (4.0,) * 4))
    assert "the GGUF's rope_freqs tensor; here pairs 0-1: 1, pair 2: 2.5, pairs 3-7: 4" in gguf
    assert "divided by 4 before the rotation" in feature_hint(
        "layers.0.attn.q_rope", _cfg("tiny", rope_type="linear", rope_factor=4.0))
    assert "last 8 keys only" in feature_hint("layers.0.attn.probs", _cfg("mistral-tiny"))
    assert feature_hint("layers.0.attn.probs", _cfg("mistral-tiny", sliding_window=0)) is None
    # a window in a config whose architecture has none is not the model's (Llama ignores sliding_window)
    assert feature_hint("layers.0.attn.probs", _cfg("tiny", sliding_window=8)) is None


def test_feature_leads_only_with_its_own_shape():
    assert feature_leads("layers.0.attn.v", None) and feature_leads("layers.0.attn.v", "offset")
    assert not feature_leads("layers.0.attn.v", "rows_zero_from")
    assert feature_leads("layers.0.attn.q_rope", "all_rows_but_first")
    assert not feature_leads("layers.0.attn.q_rope", "offset")


def test_offset_shape_on_full_tensors_both_ways():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(4, 39, 16))  # [heads, T, D]: a head-major stage
    bias = rng.normal(size=(4, 1, 16))
    found = explain(ref + bias, ref, token_axis=1, budget=1e-6, head_axis=0, kernel="v_proj matmul")
    assert found.name == "offset" and found.evidence["nmse_after_offset"] < 1e-20
    assert explain(ref, ref, token_axis=1, budget=1e-6, head_axis=0) is None  # clean: nothing
    # an error that depends on the token (a wrong weight) is no offset
    wrong = explain(ref + rng.normal(size=ref.shape), ref, token_axis=1, budget=1e-6, head_axis=0)
    assert wrong is None or wrong.name != "offset"
    # another stage and layout: the token-major MLP, a constant added to the down projection's rows
    mlp = rng.normal(size=(39, 64))
    assert explain(mlp + rng.normal(size=64), mlp, token_axis=0, budget=1e-6).name == "offset"
    assert ModelConfig(**_cfg("tiny")).qkv_bias is False  # the facts the hints read are the config's own

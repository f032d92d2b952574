"""config.json -> ModelConfig: TinyLlama's real file, transformers 5.x layout, round trips, bad files."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from conftest import needs_torch
from mlx_tinyllama.config import ModelConfig, config_from_hf_dict, load_config
from mlx_tinyllama.errors import UserError
from mlx_tinyllama.synthetic import PRESETS

# TinyLlama/TinyLlama-1.1B-Chat-v1.0's config.json, as published on the Hub.
TINYLLAMA_CONFIG_JSON = """{
  "architectures": [
    "LlamaForCausalLM"
  ],
  "attention_bias": false,
  "bos_token_id": 1,
  "eos_token_id": 2,
  "hidden_act": "silu",
  "hidden_size": 2048,
  "initializer_range": 0.02,
  "intermediate_size": 5632,
  "max_position_embeddings": 2048,
  "model_type": "llama",
  "num_attention_heads": 32,
  "num_hidden_layers": 22,
  "num_key_value_heads": 4,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": null,
  "rope_theta": 10000.0,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.35.0",
  "use_cache": true,
  "vocab_size": 32000
}
"""


def tinyllama_dict() -> dict:
    return json.loads(TINYLLAMA_CONFIG_JSON)


def write_config(tmp_path, text: str):
    (tmp_path / "config.json").write_text(text)
    return tmp_path


def test_real_tinyllama_config_is_the_synthetic_tinyllama_preset(tmp_path):
    cfg = load_config(write_config(tmp_path, TINYLLAMA_CONFIG_JSON))
    assert cfg == PRESETS["tinyllama"]
    # The numbers the forward pass depends on, spelled out (not only via the preset).
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (2048, 5632, 22)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.n_rep) == (32, 4, 64, 8)
    assert (cfg.rms_norm_eps, cfg.rope_theta, cfg.rope_type, cfg.rope_factor) == (1e-5, 10000.0, "default", 1.0)
    assert (cfg.vocab_size, cfg.max_position_embeddings, cfg.tie_word_embeddings) == (32000, 2048, False)
    assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)
    assert cfg.attn_scale == pytest.approx(0.125)
    assert cfg.num_parameters() == 1_100_048_384  # TinyLlama-1.1B's published parameter count


def test_transformers5_rope_parameters_are_read():
    d = tinyllama_dict()
    del d["rope_theta"], d["rope_scaling"]
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    cfg = config_from_hf_dict(d)
    assert (cfg.rope_theta, cfg.rope_type, cfg.rope_factor) == (500000.0, "default", 1.0)

    d["rope_parameters"] = {"rope_type": "linear", "factor": 4.0, "rope_theta": 20000.0}
    cfg = config_from_hf_dict(d)
    assert (cfg.rope_theta, cfg.rope_type, cfg.rope_factor) == (20000.0, "linear", 4.0)


def test_transformers4_linear_rope_scaling_is_read():
    d = {**tinyllama_dict(), "rope_scaling": {"type": "linear", "factor": 2.0}}
    cfg = config_from_hf_dict(d)
    assert (cfg.rope_type, cfg.rope_factor) == ("linear", 2.0)


def test_null_rope_theta_means_the_default_as_in_transformers():
    assert config_from_hf_dict({**tinyllama_dict(), "rope_theta": None}).rope_theta == 10000.0


def test_absent_num_key_value_heads_means_no_gqa():
    d = tinyllama_dict()
    del d["num_key_value_heads"]
    assert config_from_hf_dict(d).num_key_value_heads == 32


def test_eos_list_takes_the_first_id():
    assert config_from_hf_dict({**tinyllama_dict(), "eos_token_id": [2, 32000]}).eos_token_id == 2


@pytest.mark.parametrize("model_type, words", [
    ("gpt2", r"model_type is 'gpt2'; this tool runs llama \(LlamaForCausalLM\), qwen2"),
    (None, r"model_type is None; this tool runs"),
    ("mistral", r"for model_type 'mistral' this tool runs MistralForCausalLM only"),  # the class disagrees
])
def test_unknown_model_type_or_class_is_rejected(model_type, words):
    d = {**tinyllama_dict(), "model_type": model_type}
    with pytest.raises(UserError, match=words):
        config_from_hf_dict(d)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048},
    {"rope_type": "longrope", "factor": 8.0, "original_max_position_embeddings": 8192},
    {"type": "dynamic", "factor": 2.0},
])
def test_unsupported_rope_scaling_is_rejected(scaling):
    kind = scaling.get("rope_type", scaling.get("type"))
    with pytest.raises(UserError, match=f"unsupported rope scaling '{kind}'"):
        config_from_hf_dict({**tinyllama_dict(), "rope_scaling": scaling})
    d = tinyllama_dict()
    del d["rope_scaling"]
    d["rope_parameters"] = {**scaling, "rope_theta": 10000.0}
    with pytest.raises(UserError, match=f"unsupported rope scaling '{kind}'"):
        config_from_hf_dict(d)


@pytest.mark.parametrize("field", ["hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads", "vocab_size"])
def test_missing_required_field_is_named(field):
    d = tinyllama_dict()
    del d[field]
    with pytest.raises(UserError, match=f"config.json lacks {field}"):
        config_from_hf_dict(d)


@pytest.mark.parametrize("change, words", [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_size": "wide"}, "expected an integer"),
    ({"num_key_value_heads": 5}, "not a multiple of num_key_value_heads"),
])
def test_other_unrunnable_configs_are_rejected(change, words):
    with pytest.raises(UserError, match=words):
        config_from_hf_dict({**tinyllama_dict(), **change})


@pytest.mark.parametrize("change, words", [
    ({"rope_scaling": "linear"}, "rope_scaling"),
    ({"rope_theta": "fast"}, "rope_theta"),
    ({"eos_token_id": []}, "eos_token_id"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"num_key_value_heads": 0}, "num_key_value_heads"),
    ({"vocab_size": -1}, "vocab_size"),
    ({"rms_norm_eps": -1e-5}, "rms_norm_eps"),
    ({"rope_scaling": {"type": "linear", "factor": 0}}, "factor"),
])
def test_malformed_values_are_user_errors_not_crashes(change, words):
    with pytest.raises(UserError, match=words):
        config_from_hf_dict({**tinyllama_dict(), **change})


def test_directory_without_config_json(tmp_path):
    with pytest.raises(UserError, match="has no config.json"):
        load_config(tmp_path)


@pytest.mark.parametrize("text, words", [
    ('{"model_type": "llama", ', "is not valid JSON"),
    ("", "is not valid JSON"),
    ("[1, 2]", "does not hold a JSON object"),
])
def test_invalid_json(tmp_path, text, words):
    with pytest.raises(UserError, match=words):
        load_config(write_config(tmp_path, text))


def test_config_json_that_is_not_utf8(tmp_path):
    (tmp_path / "config.json").write_bytes(b'{"model_type": "llama\xff"}')
    with pytest.raises(UserError, match="is not valid JSON"):
        load_config(tmp_path)


ROUND_TRIP_CONFIGS = {
    "tinyllama": PRESETS["tinyllama"],
    "tiny": PRESETS["tiny"],
    "linear-rope-tied": replace(PRESETS["small"], rope_type="linear", rope_factor=4.0, rope_theta=50000.0,
                                tie_word_embeddings=True, max_position_embeddings=4096),
    "explicit-head-dim": replace(PRESETS["tiny"], head_dim=32, eos_token_id=7, rms_norm_eps=1e-6),
}


@pytest.mark.parametrize("name", ROUND_TRIP_CONFIGS)
def test_round_trip_through_our_own_dict(name):
    cfg = ROUND_TRIP_CONFIGS[name]
    assert config_from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict()))) == cfg


@needs_torch
@pytest.mark.parametrize("name", ROUND_TRIP_CONFIGS)
def test_round_trip_through_transformers_llamaconfig(name, tmp_path):
    from transformers import LlamaConfig

    cfg = ROUND_TRIP_CONFIGS[name]
    hf = LlamaConfig(**cfg.to_hf_dict())
    # transformers sees the same model ...
    assert (hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers) == (
        cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers)
    assert (hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim) == (
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
    assert (hf.vocab_size, hf.max_position_embeddings, hf.rms_norm_eps) == (
        cfg.vocab_size, cfg.max_position_embeddings, cfg.rms_norm_eps)
    assert (hf.tie_word_embeddings, hf.bos_token_id, hf.eos_token_id) == (
        cfg.tie_word_embeddings, cfg.bos_token_id, cfg.eos_token_id)
    rope = _transformers_rope(hf)
    assert rope["rope_theta"] == cfg.rope_theta
    assert rope.get("rope_type", rope.get("type")) == cfg.rope_type
    if cfg.rope_type == "linear":
        assert rope["factor"] == cfg.rope_factor
    # ... and the config.json it writes (5.x: rope_parameters) reads back to the same ModelConfig.
    hf.save_pretrained(tmp_path)
    assert load_config(tmp_path) == cfg
    assert config_from_hf_dict(hf.to_dict()) == cfg


def _transformers_rope(hf) -> dict:
    """rope settings from a LlamaConfig of transformers 5.x (rope_parameters) or 4.x (rope_theta/rope_scaling)."""
    params = getattr(hf, "rope_parameters", None)
    if params:
        return dict(params)
    return {"rope_theta": hf.rope_theta, **(hf.rope_scaling or {"rope_type": "default"})}


def test_modelconfig_defaults_are_tinyllama():
    assert ModelConfig() == PRESETS["tinyllama"]

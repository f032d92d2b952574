"""The precision emulation of another engine (emulation.py): each rounding is the engine's own
(q8_0 against gguf-py's reference quantizer, flash attention's f16 accumulator against exact
attention), the settings read from a log, and the flag that overrides them."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_tinyllama.emulation import (EnginePrecision, engine_from_log, flash_attention_f16_acc, quantize_q8_0,
                                     round_f16)
from mlx_tinyllama.errors import UserError


def test_q8_0_activation_rounding_is_ggml_q8_0():
    import gguf

    x = np.random.default_rng(0).standard_normal((6, 256)).astype(np.float32)
    q = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
    ref = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
    ours = np.array(quantize_q8_0(mx.array(x)))
    assert np.array_equal(ours, ref)
    assert 0 < np.abs(ours - x).max() <= np.abs(x).max() / 254 * 1.001  # half a step of 127 levels
    with pytest.raises(UserError, match="multiple of 32"):
        quantize_q8_0(mx.zeros((2, 40)))


def test_flash_attention_emulation_is_attention_with_fp16_accumulation():
    rng = np.random.default_rng(1)
    q = mx.array(rng.standard_normal((1, 4, 20, 16)).astype(np.float32))
    k, v = (round_f16(mx.array(rng.standard_normal((1, 2, 20, 16)).astype(np.float32))) for _ in range(2))
    exact = np.array(mx.fast.scaled_dot_product_attention(round_f16(q), k, v, scale=0.25, mask="causal"))
    ours = np.array(flash_attention_f16_acc(q, k, v, 0.25))
    err = np.abs(ours - exact).max() / np.abs(exact).max()
    assert 1e-5 < err < 2 ** -11 * 8  # fp16 accumulation: not exact, within a few fp16 ulps
    np.testing.assert_allclose(ours[:, :, 0], np.array(v)[:, [0, 0, 1, 1], 0], rtol=0, atol=0)  # token 0 sees itself


def test_settings_come_from_the_log_and_the_gguf():
    log = {"kv_cache": "f16", "flash_attn": True, "weight_types": []}
    engine, notes = engine_from_log(log, {"F32": 9, "F16": 30})
    assert engine == EnginePrecision("f16", "f16", True) and not notes
    engine, _ = engine_from_log(dict(log, weight_types=["f32", "q8_0", "f16"]))
    assert engine.matmul_input == "q8_0" and engine.tolerance_class == "q8_0-emulated"
    engine, notes = engine_from_log(dict(log, kv_cache="f32", flash_attn=False))
    assert engine.is_fp32 and "unknown" in notes[0]
    engine, notes = engine_from_log(dict(log, weight_types=["q4_0", "f32"], kv_cache="q8_0"))
    assert engine.matmul_input == "f32" and engine.kv_cache == "f32" and len(notes) == 2


def test_emulate_flag():
    assert EnginePrecision.parse("fp32").is_fp32
    assert EnginePrecision.parse("matmul=q8_0,kv=f16,fa=on") == EnginePrecision("q8_0", "f16", True)
    for bad in ("matmul=f8", "kv=bf16", "flash"):
        with pytest.raises(UserError):
            EnginePrecision.parse(bad)

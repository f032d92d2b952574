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
    log = {"kv_cache": "f16", "flash_attn": True, "weight_types": [], "system_info": "AVX2 = 1 | F16C = 1 |"}
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


def test_amx_path_is_the_loaders_rule_per_matmul():
    import mlx.nn as nn

    from mlx_tinyllama.emulation import EmulatedLinear

    amx = EnginePrecision("f16", "f16", True, extra_buffer="amx")
    # amx.cpp supports_op: f16 weights with out_features % 32 == 0 and in_features % 16 == 0
    assert amx.amx_path(256, 256, "f16") and amx.amx_path(32000, 2048, "f16")
    assert not amx.amx_path(688, 256, "f16")  # synthetic:small's gate/up: 688 % 32 = 16, the plain path
    assert not amx.amx_path(256, 40, "f16") and not amx.amx_path(256, 256, "q8_0")
    assert not EnginePrecision("f16", "f16", True).amx_path(256, 256, "f16")  # -nr, or no AMX
    kinds = {(o, i): EmulatedLinear(nn.Linear(i, o, bias=False), amx).kind for o, i in ((256, 256), (688, 256))}
    assert kinds == {(256, 256): "f32", (688, 256): "f16"}
    q8 = EnginePrecision("q8_0", "f16", True, extra_buffer="amx")
    # a q8_0 file keeps rows of 688 values as f16: on the AMX buffer those take f32 inputs
    assert EmulatedLinear(nn.Linear(688, 256, bias=False), q8).kind == "f32"
    assert EmulatedLinear(nn.Linear(256, 256, bias=False), q8).kind == "q8_0"
    assert EmulatedLinear(nn.Linear(256, 256, bias=False), "f16").kind == "f16"  # a type alone: the plain path


def test_matmul_path_comes_from_the_loaders_buffers_or_is_said_unknown():
    log = {"kv_cache": "f16", "flash_attn": True, "weight_types": ["f32", "f16"]}
    amx_cpu = "AVX512 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | REPACK = 1 |"
    engine, notes = engine_from_log(dict(log, model_buffers=["AMX", "CPU_Mapped"], system_info=amx_cpu))
    assert engine.extra_buffer == "amx" and engine.tolerance_class == "float16-emulated" and not notes
    engine, notes = engine_from_log(dict(log, model_buffers=["CPU_Mapped"], system_info=amx_cpu))  # -nr -v
    assert engine.extra_buffer == "none" and engine.tolerance_class == "float16-emulated" and not notes
    engine, notes = engine_from_log(dict(log, system_info=amx_cpu))  # no -v: default or -nr?
    assert engine.extra_buffer == "unknown" and engine.tolerance_class == "float16" and "-v" in notes[0]
    engine, notes = engine_from_log(dict(log, system_info="AVX2 = 1 | F16C = 1 | REPACK = 1 |"))  # no AMX
    assert engine.extra_buffer == "none" and not notes
    engine, notes = engine_from_log(dict(log))  # no system_info line at all
    assert engine.extra_buffer == "unknown" and "system_info" in notes[0]
    engine, notes = engine_from_log(dict(log, model_buffers=["KLEIDIAI", "CPU_Mapped"]))
    assert "KLEIDIAI" in notes[0] and "not emulated" in notes[0]
    engine, notes = engine_from_log(dict(log, weight_types=["f32"], system_info=amx_cpu))  # f32: no path to read
    assert engine.matmul_input == "f32" and engine.extra_buffer == "none" and not notes


def test_emulate_flag_sets_the_matmul_path():
    assert EnginePrecision.parse("matmul=f16,kv=f16,fa=on,amx=on").extra_buffer == "amx"
    assert EnginePrecision.parse("matmul=f16,amx=off").extra_buffer == "none"
    assert EnginePrecision.parse("matmul=f16,amx=unknown").tolerance_class == "float16"
    with pytest.raises(UserError, match="amx=on"):
        EnginePrecision.parse("amx=maybe")


def test_the_loaders_amx_placement_is_checked_against_the_emulated_rule():
    import lzma
    from pathlib import Path

    from mlx_tinyllama.emulation import amx_weight_count
    from mlx_tinyllama.refs import parse_llamacpp_tensors
    from mlx_tinyllama.refs.llamacpp import parse_log_info
    from mlx_tinyllama.synthetic import PRESETS

    small, tinyllama = PRESETS["small"], PRESETS["tinyllama"]
    # synthetic:small: q/k/v/o, down and output on AMX (21), gate/up (688 outputs) not; 1.1B: all 155
    assert amx_weight_count(small, "f16") == amx_weight_count(small, "q8_0") == 21
    assert amx_weight_count(tinyllama, "f16") == 22 * 7 + 1
    fixtures = Path(__file__).parent / "fixtures" / "llamacpp"
    for case, config, moved in (("amx_default_short_verbose", small, 18),
                                ("amx_default_short_verbose_tinyllama", tinyllama, 46)):
        text = lzma.decompress((fixtures / f"{case}.log.xz").read_bytes()).decode()
        info = parse_log_info(text, parse_llamacpp_tensors(text)).as_dict()
        assert info["moved_off"] == {"AMX": moved}  # what llama.cpp's loader itself printed
        engine, notes = engine_from_log(info, None, config)
        assert engine.extra_buffer == "amx" and not notes  # the rule predicts the loader's placement
        # a loader that placed otherwise (another llama.cpp, another rule) is said, not silently emulated
        engine, notes = engine_from_log(dict(info, moved_off={"AMX": moved - 1}), None, config)
        assert len(notes) == 1 and f"kept {moved - 1} weights off the AMX buffer" in notes[0]

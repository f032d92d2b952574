"""llama.cpp's own logs of the Llama family beside TinyLlama (tests/fixtures/llamacpp, the `family_*`
cases of PROVENANCE.md): Llama 3 RoPE + tied embeddings (llama3-tiny), Qwen2's q/k/v biases
(qwen2-tiny) and Mistral (mistral-tiny, whose GGUF llama.cpp's converter writes as `llama` without
the sliding window). Each clean log matches at llama.cpp's true defaults with the emulation read off
the log; each norm_eps fault is found at layers.0.attn_norm.

The GGUFs are written by gguf_write from the same synthetic seed: tensor for tensor those of llama.cpp's
converter (scripts/llamacpp/check_family_gguf.py)."""

from __future__ import annotations

import json
import lzma
import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import REPO

from mlx_tinyllama import trace
from mlx_tinyllama.emulation import EmulatedLinear, EnginePrecision
from mlx_tinyllama.gguf_write import convert
from mlx_tinyllama.refs.llamacpp import parse_llamacpp_log
from mlx_tinyllama.synthetic import materialize

FIXTURES = REPO / "tests" / "fixtures" / "llamacpp"
CASES = json.loads((FIXTURES / "cases.json").read_text())["cases"]
PRESETS = ("llama3-tiny", "qwen2-tiny", "mistral-tiny")


def key(preset: str) -> str:
    return preset.replace("-", "_")


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    out = tmp_path_factory.mktemp("family_gguf")
    files = {}
    for p in PRESETS:
        files[p] = out / f"{p}-f16.gguf"
        convert(materialize(p, 0), files[p], out_type="f16")
    return files


def log(tmp_path, case: str):
    path = tmp_path / f"{case}.log"
    path.write_bytes(lzma.decompress((FIXTURES / CASES[case]["log"]).read_bytes()))
    return path


def run_compare(tmp_path, *args) -> tuple[int, dict | None]:
    out = tmp_path / "result.json"
    rc = trace.main(["compare", *map(str, args), "--json", str(out)])
    return rc, (json.loads(out.read_text()) if out.exists() else None)


def worst_ratio(result: dict) -> float:
    return max(e["value"] / e["tolerance"] for e in result["entries"] if e["tolerance"] > 0)


@pytest.mark.parametrize("preset", PRESETS)
def test_clean_family_log_matches_its_gguf(preset, ggufs, tmp_path, capsys):
    case = f"family_{key(preset)}_default_short_verbose"
    rc, result = run_compare(tmp_path, "--against", log(tmp_path, case), "--model", ggufs[preset])
    assert rc == 0, result["first_divergence"]
    assert result["status"] == "match" and worst_ratio(result) < 0.75
    compared = {e["tap"] for e in result["entries"]}
    assert {"embed", "layers.0.attn.q", "layers.0.attn.k", "layers.0.attn.v", "layers.0.attn.q_rope",
            "layers.0.attn.k_rope", "layers.0.attn.context", "layers.0.attn.out", "layers.1.out", "final_norm",
            "logits"} <= compared  # qwen2: attn.out is an unnamed node_N, known by its weight operand
    reasons = {n["key"]: n["reason"] for n in result["not_compared"]}
    assert all(r != "no canonical tap for this name" for r in reasons.values()), reasons
    # Qwen2's projections are printed twice (MUL_MAT, then the bias ADD): only the ADD is compared
    assert ("before its bias" in reasons.get("Qcur-0 (MUL_MAT)", "")) == (preset == "qwen2-tiny")
    err = capsys.readouterr().err
    assert "matmul inputs f16" in err and "flash attention on" in err  # the emulation, read off the -v log


@pytest.mark.parametrize("preset", ["llama3-tiny", "qwen2-tiny"])
def test_clean_family_log_matches_the_checkpoint(preset, tmp_path):
    case = f"family_{key(preset)}_default_short_verbose"
    rc, result = run_compare(tmp_path, "--against", log(tmp_path, case), "--model", materialize(preset, 0))
    assert rc == 0, result["first_divergence"]


def test_mistral_log_is_its_gguf_without_the_window(tmp_path):
    # llama.cpp's converter writes Mistral as `llama` without sliding_window: the engine attends to all
    # 39 tokens, the checkpoint (window 8) does not. Against the checkpoint that is a real difference,
    # first seen where attention mixes the tokens, and the hint names the window (from the config).
    rc, result = run_compare(tmp_path, "--against", log(tmp_path, "family_mistral_tiny_default_short_verbose"),
                             "--model", materialize("mistral-tiny", 0))
    assert rc == 1 and result["first_divergence"]["tap"] == "layers.0.attn.context"
    assert "last 8 keys only (sliding_window 8)" in result["first_divergence"]["hint"]


@pytest.mark.parametrize("preset", PRESETS)
def test_family_norm_eps_fault_found_at_its_stage(preset, ggufs, tmp_path):
    rc, result = run_compare(tmp_path, "--against", log(tmp_path, f"family_{key(preset)}_fault_norm_eps"),
                             "--model", ggufs[preset])
    assert rc == 1
    div = result["first_divergence"]
    assert div["tap"] == "layers.0.attn_norm" and div["error"]["ratio"] >= 10, div
    assert "eps" in div["hint"], div["hint"]


def test_log_qk_order_follows_its_gguf_architecture(tmp_path):
    # qwen2's GGUF keeps Q/K in Hugging Face order; llama's (TinyLlama's, Llama 3's, Mistral's) permutes
    layouts = {case: parse_llamacpp_log(log(tmp_path, case).read_text()).layout
               for case in ("family_qwen2_tiny_default_short_verbose", "family_llama3_tiny_default_short_verbose",
                            "clean_default_short")}
    assert layouts == {"family_qwen2_tiny_default_short_verbose": "hf",
                       "family_llama3_tiny_default_short_verbose": "gguf", "clean_default_short": "gguf"}
    text = log(tmp_path, "family_qwen2_tiny_default_short_verbose").read_text()
    no_arch = "\n".join(x for x in text.splitlines() if "general.architecture" not in x)
    assert parse_llamacpp_log(no_arch).layout == "gguf"  # unknown: llama's order, as before


def test_qwen2_log_read_in_llama_order_diverges_at_q(ggufs, tmp_path):
    # the other way: forcing the permuted order on Qwen2's log is found at the projection
    rc, result = run_compare(tmp_path, "--against", log(tmp_path, "family_qwen2_tiny_default_short_verbose"),
                             "--model", ggufs["qwen2-tiny"], "--layout", "gguf")
    assert rc == 1 and result["first_divergence"]["tap"] == "layers.0.attn.q"


@pytest.mark.parametrize("matmul_input", ["f16", "q8_0"])
def test_emulated_linear_keeps_the_bias(matmul_input):
    lin = nn.Linear(32, 64, bias=True)
    lin.bias = mx.arange(64, dtype=mx.float32)
    x = mx.random.normal((3, 32), key=mx.random.key(0))
    em = EmulatedLinear(lin, EnginePrecision(matmul_input=matmul_input))
    y, y0 = em(x), EmulatedLinear(nn.Linear(32, 64, bias=False), matmul_input)
    assert np.allclose(np.array(y - x @ lin.weight.T - lin.bias), 0, atol=0.05)  # f16/q8_0 input rounding only
    assert "bias" not in y0  # a bias-free Linear stays bias-free


@pytest.mark.skipif(os.name == "nt", reason="a shebang script stands in for the binary")
@pytest.mark.parametrize("case,rc_expected", [("family_qwen2_tiny_default_short_verbose", 0),
                                              ("family_qwen2_tiny_fault_norm_eps", 1),
                                              ("family_qwen2_tiny_fault_qkv_bias_k_to_v", 1)])
def test_llamacpp_command_on_a_qwen2_gguf(case, rc_expected, ggufs, tmp_path):
    # the one-shot command reads the log the same way: Qwen2's Q/K order and its biases, by the log itself
    from test_llamacpp_compare import fake_binary

    out = tmp_path / "r.json"
    rc = trace.main(["llamacpp", "--gguf", str(ggufs["qwen2-tiny"]), "--llama-cpp", str(fake_binary(tmp_path, case)),
                     "--prompt-file", str(FIXTURES / "prompts" / "short.txt"), "--json", str(out)])
    result = json.loads(out.read_text())
    assert rc == rc_expected, result["first_divergence"]
    expected = None if rc_expected == 0 else FEATURE_FAULTS[case][1] if case in FEATURE_FAULTS else "layers.0.attn_norm"
    assert (result["first_divergence"] or {}).get("tap") == expected
    if case in FEATURE_FAULTS:  # the one-shot command names the bias as compare does
        assert FEATURE_FAULTS[case][2] in result["first_divergence"]["hint"]


def test_llama3_log_used_the_llama3_frequencies(tmp_path):
    # The ROPE nodes print two operands (rope_freqs, the third, is not shown), so the match at q_rope is
    # the evidence: the same log against the checkpoint with its rope_scaling removed diverges there.
    import shutil

    d = tmp_path / "llama3-plain-rope"
    shutil.copytree(materialize("llama3-tiny", 0), d)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg.pop("rope_scaling")["rope_type"] == "llama3"
    (d / "config.json").write_text(json.dumps(cfg))
    rc, result = run_compare(tmp_path, "--against", log(tmp_path, "family_llama3_tiny_default_short_verbose"),
                             "--model", d)
    assert rc == 1 and result["first_divergence"]["tap"] == "layers.0.attn.q_rope"
    assert result["first_divergence"]["error"]["ratio"] >= 10


# Faults inside what an architecture adds (scripts/llamacpp/patches, FAMILY_FAULTS of make_fixtures.py):
# case -> (preset, the stage it breaks, what the hint must name, the error shape found on the printed rows)
FEATURE_FAULTS = {
    "family_qwen2_tiny_fault_qkv_bias_k_to_v": ("qwen2-tiny", "layers.0.attn.v", "this model's v_proj adds a bias "
                                                "(Qwen2ForCausalLM projects q, k and v with biases)", "offset"),
    "family_qwen2_tiny_fault_qkv_bias_q_dropped": ("qwen2-tiny", "layers.0.attn.q", "this model's q_proj adds a bias "
                                                   "(Qwen2ForCausalLM projects q, k and v with biases)", "offset"),
    "family_llama3_tiny_fault_rope_freqs_mul": ("llama3-tiny", "layers.0.attn.q_rope", "this model's RoPE divides "
                                                "each frequency by its own factor (the GGUF's rope_freqs tensor; "
                                                "here pair 0: 1, pairs 1-7: 8)", "all_rows_but_first"),
    "family_llama3_tiny_fault_rope_freqs_k_dropped": ("llama3-tiny", "layers.0.attn.k_rope", "this model's RoPE "
                                                      "divides each frequency by its own factor (the GGUF's "
                                                      "rope_freqs tensor; here pair 0: 1, pairs 1-7: 8)", None),
    "family_llama3_tiny_fault_rope_freqs_ignored": ("llama3-tiny", "layers.0.attn.q_rope", "this model's RoPE "
                                                    "divides each frequency by its own factor (the GGUF's "
                                                    "rope_freqs tensor; here pair 0: 1, pairs 1-7: 8)", None),
}


@pytest.mark.parametrize("case", sorted(FEATURE_FAULTS))
def test_family_feature_fault_found_at_its_stage_with_its_cause(case, ggufs, tmp_path):
    preset, tap, feature, shape = FEATURE_FAULTS[case]
    rc, result = run_compare(tmp_path, "--against", log(tmp_path, case), "--model", ggufs[preset])
    assert rc == 1
    div = result["first_divergence"]
    assert div["tap"] == tap and div["error"]["ratio"] >= 10, div
    assert div["before"]["ok"], div["before"]  # every stage before it matched
    assert (div["pattern"] or {}).get("name") == shape, div["pattern"]
    hint = div["hint"]
    # the model's own feature is named, and ahead of the generic stage hint (a weight orientation, theta)
    assert feature in hint, hint
    generic = hint.index("inputs to this stage match")
    assert hint.index(feature) < generic, hint
    if shape == "offset":  # the printed rows say "the same error in every token row" before anything else
        assert hint.startswith("every printed token row (0-2, 36-38) is off by the same values"), hint


def test_rope_freqs_on_k_only_leaves_q_rope_matching(ggufs, tmp_path):
    # the K-only fault: Q's rotation (with the factors) matches, K's (without) does not
    rc, result = run_compare(tmp_path, "--against", log(tmp_path, "family_llama3_tiny_fault_rope_freqs_k_dropped"),
                             "--model", ggufs["llama3-tiny"])
    stages = {s["tap"]: s for s in result["stages"]}
    assert rc == 1 and stages["layers.0.attn.q_rope"]["ok"] and not stages["layers.0.attn.k_rope"]["ok"]
    assert ("layers.0.attn.q_rope matched, rotated with the same frequencies and factors, so they reach Q's "
            "rotation and not K's") in result["first_divergence"]["hint"]
    # the other way: where Q's rotation is the one that diverges, nothing is said of K
    rc, result = run_compare(tmp_path, "--against", log(tmp_path, "family_llama3_tiny_fault_rope_freqs_ignored"),
                             "--model", ggufs["llama3-tiny"])
    assert rc == 1 and "reach Q's rotation" not in result["first_divergence"]["hint"]


def test_rope_freqs_fault_against_the_checkpoint_names_its_rope_scaling(tmp_path):
    # Against the Hugging Face checkpoint the divisors come from config.json's rope_scaling (no GGUF):
    # the hint says which, with the same factors llama.cpp's converter writes.
    rc, result = run_compare(tmp_path, "--against", log(tmp_path, "family_llama3_tiny_fault_rope_freqs_mul"),
                             "--model", materialize("llama3-tiny", 0))
    div = result["first_divergence"]
    assert rc == 1 and div["tap"] == "layers.0.attn.q_rope"
    assert ("rope_scaling llama3: factor 8, low_freq_factor 1, high_freq_factor 4, original context 32" in div["hint"]
            and "here pair 0: 1, pairs 1-7: 8" in div["hint"]), div["hint"]


@pytest.mark.parametrize("preset", PRESETS)
def test_clean_family_logs_name_no_feature(preset, ggufs, tmp_path):
    # the other way: the clean logs match, so no feature is blamed anywhere in the result
    rc, result = run_compare(tmp_path, "--against", log(tmp_path, f"family_{key(preset)}_default_short_verbose"),
                             "--model", ggufs[preset])
    assert rc == 0 and result["first_divergence"] is None
    assert "adds a bias" not in json.dumps(result) and "its own factor" not in json.dumps(result)


@pytest.mark.parametrize("preset,moved", [("llama3-tiny", 14), ("qwen2-tiny", 18)])
def test_tied_lm_head_takes_the_output_matmuls_path(preset, moved, ggufs, tmp_path, capsys):
    # llama.cpp loads a tied model's output as a duplicate of token_embd placed for the output MUL_MAT:
    # [32000, 64] f16 fits amx.cpp's supports_op, so on these AMX logs it sits in the AMX buffer (f32
    # input). The loader's count of weights kept off AMX says so: the file's weights, rope_freqs once
    # per layer (Llama 3) and the duplicated output, less those on AMX (the Q/K/V/O and the output).
    from mlx_tinyllama.config import load_config
    from mlx_tinyllama.emulation import EmulatedTiedEmbedding, _check_amx_placement, emulate
    from mlx_tinyllama.sources import load

    case = f"family_{key(preset)}_default_short_verbose"
    info = parse_llamacpp_log(log(tmp_path, case).read_text()).provenance["llama.cpp"]
    assert info["moved_off"]["AMX"] == moved
    cfg = load_config(materialize(preset, 0))
    amx, plain = (EnginePrecision(matmul_input="f16", kv_cache="f16", flash_attn=True, extra_buffer=b)
                  for b in ("amx", "none"))
    assert _check_amx_placement(info, cfg, amx) == []  # was: "kept 14 weights off ... predicts 12"
    lm = load(str(ggufs[preset]), "float32")
    head = emulate(lm.model, amx).model.embed_tokens
    assert isinstance(head, EmulatedTiedEmbedding) and head.kind == "f32"
    assert EmulatedTiedEmbedding(head, plain).kind == "f16"  # -nr, or a CPU without AMX: f16 input
    # the compare reads the AMX path off the log: no placement note, logits well within tolerance
    rc, result = run_compare(tmp_path, "--against", log(tmp_path, case), "--model", ggufs[preset])
    assert rc == 0 and "kept" not in capsys.readouterr().err
    logits = max(e["value"] / e["tolerance"] for e in result["entries"] if e["tap"] == "logits")
    assert logits < 0.2  # measured 0.083 (llama3-tiny), 0.019 (qwen2-tiny): unchanged, the head is unrounded there
    # forcing the plain path rounds the tied head's input too; the AMX log still matches (0.17, 0.21)
    rc, result = run_compare(tmp_path, "--against", log(tmp_path, case), "--model", ggufs[preset],
                             "--emulate", "matmul=f16,kv=f16,fa=on,amx=off")
    assert rc == 0


def test_tied_lm_head_rounds_as_the_output_matmul_does():
    # the head's input rounding follows the output matmul's path; the lookup rounds nothing
    from mlx_tinyllama.emulation import EmulatedTiedEmbedding, round_f16

    emb = nn.Embedding(96, 48)  # 96 % 32 == 0, 48 % 16 == 0: AMX takes it
    x = mx.random.normal((3, 48), key=mx.random.key(1))
    ids = mx.array([0, 5, 95])
    for extra, rounded in (("amx", False), ("none", True)):
        tied = EmulatedTiedEmbedding(emb, EnginePrecision(matmul_input="f16", extra_buffer=extra))
        want = (round_f16(x) if rounded else x) @ emb.weight.T
        assert np.array_equal(np.array(tied.as_linear(x)), np.array(want)), extra
        assert np.array_equal(np.array(tied(ids)), np.array(emb(ids)))
    odd = EmulatedTiedEmbedding(nn.Embedding(100, 48), EnginePrecision(matmul_input="f16", extra_buffer="amx"))
    assert odd.kind == "f16"  # 100 outputs: no multiple of 32, the plain path even on AMX
    q8 = EnginePrecision(matmul_input="q8_0", extra_buffer="none")
    assert EmulatedTiedEmbedding(nn.Embedding(96, 64), q8).kind == "q8_0"  # a q8_0 file's token_embd
    assert EmulatedTiedEmbedding(emb, q8).kind == "f16"  # rows of 48: no multiple of 32, f16 in the file

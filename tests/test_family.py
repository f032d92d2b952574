"""The Llama family beside TinyLlama (issue 25), proven on models that transformers itself makes
and initialises (nobody on the project chose their weights): Llama 3 RoPE scaling with tied
embeddings (Llama 3.x, SmolLM2), Qwen2's q/k/v biases, Mistral's sliding window shorter than the
prompt. Every tap against transformers in fp32; prefill = token-by-token decode = chunked prefill
= the compiled step; greedy tokens equal transformers' generate; and each feature switched off on
our side diverges where it should (so the agreement is not vacuous)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from conftest import SEED_IDS, has_torch
from mlx_tinyllama import paths, sources
from mlx_tinyllama.compare import run_side
from mlx_tinyllama.config import ModelConfig, config_from_hf_dict
from mlx_tinyllama.errors import UserError
from mlx_tinyllama.tolerances import tolerance_for
from mlx_tinyllama.metrics import metrics

pytestmark = pytest.mark.skipif(not has_torch(), reason="needs torch + transformers")

BASE = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=32000, max_position_embeddings=256, initializer_range=0.2,
            rms_norm_eps=1e-5)
FAMILY = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM",
               dict(BASE, head_dim=16, rope_theta=500000.0, tie_word_embeddings=True,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(BASE, rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(BASE, sliding_window=8, tie_word_embeddings=False)),
}


def _make(kind: str, out):
    """A checkpoint written by transformers from its own random initialisation."""
    import torch
    import transformers

    cfg_cls, model_cls, kwargs = FAMILY[kind]
    torch.manual_seed(1234)
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kwargs))
    with torch.no_grad():  # biases of the order of the projections, so that dropping them shows
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module", params=sorted(FAMILY))
def family(request, tmp_path_factory):
    from mlx_tinyllama.reference import hf

    d = _make(request.param, tmp_path_factory.mktemp(request.param))
    hf_model = hf.load_hf_model(d, "float32")
    ref, _ = hf.capture(hf_model, SEED_IDS)
    return request.param, d, hf_model, {k: v.double().numpy() for k, v in ref.items()}


def _worst(side_tensors: dict, ref: dict, n_layers: int) -> tuple[float, str]:
    out = []
    for tap, r in ref.items():
        m = metrics(np.asarray(side_tensors[tap], np.float64), r, masked=tap.endswith("scores_masked"))
        out.append((m["nmse"] / tolerance_for(tap, "nmse", "float32", "float32", n_layers), tap))
    return max(out)


def _first_over(side_tensors: dict, ref: dict, n_layers: int) -> str | None:
    for tap, r in ref.items():
        m = metrics(np.asarray(side_tensors[tap], np.float64), r, masked=tap.endswith("scores_masked"))
        if not m["nmse"] <= tolerance_for(tap, "nmse", "float32", "float32", n_layers) or m["mask_mismatch"]:
            return tap
    return None


@pytest.mark.parametrize("kernels", ["fused", "explicit"])
def test_every_tap_matches_transformers_in_fp32(family, kernels):
    kind, d, _, ref = family
    lm = sources.load(str(d), "float32", kernels=kernels)
    assert lm.config.architecture == FAMILY[kind][1]
    ratio, tap = _worst(run_side(lm, SEED_IDS).tensors, ref, 2)
    assert ratio < 0.5, (kind, kernels, tap, ratio)


def test_each_feature_switched_off_diverges_where_it_acts(family):
    """The agreement above is not vacuous: without the llama3 frequencies, without the biases, or
    without the window, our run leaves transformers' at the stage that feature acts on."""
    kind, d, _, ref = family
    lm = sources.load(str(d), "float32")
    cfg = lm.config
    off = {"llama3": dict(rope_type="default", rope_factor=1.0),
           "qwen2": dict(architecture="LlamaForCausalLM", model_type="llama"),
           "mistral": dict(sliding_window=0)}[kind]
    where = {"llama3": "layers.0.attn.q_rope", "qwen2": "layers.0.attn.q", "mistral": "layers.0.attn.scores_masked"}
    weights = dict(sources.read_safetensors(sources.weight_files(d)))
    if kind == "qwen2":
        weights = {k: v for k, v in weights.items() if not k.endswith(".bias")}
    broken = sources.build_model(replace(cfg, **off), weights, "float32", lm.model.ops)
    lm.model = broken
    assert _first_over(run_side(lm, SEED_IDS).tensors, ref, 2) == where[kind]


def test_prefill_decode_chunks_and_compiled_step_agree(family):
    kind, d, _, _ = family
    lm = sources.load(str(d), "float32")
    r = paths.check_paths(lm.model, SEED_IDS, chunks=(3, 7), continue_n=0, dtype="float32")
    assert r["first_divergence"] is None and r["agree"], r["first_divergence"]
    assert [p["path"] for p in r["paths"]] == ["decode", "chunk-3", "chunk-7", "compiled"]


def test_greedy_tokens_equal_transformers_generate(family):
    import torch

    kind, d, hf_model, _ = family
    lm = sources.load(str(d), "float32")
    ours = paths.greedy_continuation(lm.model, SEED_IDS, 24).cached
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor([SEED_IDS]), max_new_tokens=24, do_sample=False, min_new_tokens=24,
                                   eos_token_id=None, pad_token_id=0)[0, len(SEED_IDS):].tolist()
    assert ours == theirs


def test_the_window_and_the_llama3_frequencies_are_what_transformers_computes(family):
    """Directly: masked keys past the window get no weight; the scaled inverse frequencies equal
    transformers' rotary embedding's."""
    kind, d, hf_model, ref = family
    if kind == "mistral":
        probs = ref["layers.0.attn.probs"]  # [H, T, S]
        T = probs.shape[1]
        far = np.arange(T)[None, :] <= np.arange(T)[:, None] - 8
        assert far.any() and np.all(probs[:, far] == 0)
    if kind == "llama3":
        from mlx_tinyllama.ops import Rope

        lm = sources.load(str(d), "float32")
        theirs = hf_model.model.rotary_emb.inv_freq.numpy()
        ours = np.array(Rope.from_config(lm.config).inv_freq)
        assert np.array_equal(ours, theirs.astype(np.float32))
        assert not np.array_equal(ours, np.array(Rope.make(16, 500000.0).inv_freq))


# ---------------------------------------------------------------------------
# Config: what each architecture accepts, what is refused by name


def test_configs_of_each_architecture_round_trip():
    for preset in ("llama3-tiny", "qwen2-tiny", "mistral-tiny", "llama3.2-1b", "qwen2.5-0.5b", "smollm2-135m",
                   "mistral-7b"):
        from mlx_tinyllama.synthetic import PRESETS

        cfg = PRESETS[preset]
        assert config_from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict()))) == cfg, preset


@pytest.mark.parametrize("change, words", [
    ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True}, "max_window_layers"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope scaling 'yarn'"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"],
      "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 32}}, "unsupported rope scaling 'llama3'"),
    ({"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}, "model_type is 'gemma'"),
    ({"model_type": "qwen2", "architectures": ["LlamaForCausalLM"]}, "Qwen2ForCausalLM only"),
    ({"mlp_bias": True}, "mlp_bias"),
])
def test_unsupported_variants_are_refused_by_name(change, words):
    d = {**ModelConfig().to_hf_dict(), **change}
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
        config_from_hf_dict(d)


def test_default_rope_frequencies_are_transformers_bits():
    """TinyLlama's own RoPE (theta 1e4, head_dim 64), and other thetas: the same float32 bits as
    transformers' rotary embedding (torch raises the base to the exponents in double)."""
    import transformers

    from mlx_tinyllama.ops import rope_inv_freq

    for head_dim, theta in ((64, 10000.0), (64, 1000000.0), (128, 500000.0), (16, 100000.0)):
        cfg = transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                                       rope_theta=theta)
        theirs = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(cfg).inv_freq.numpy()
        assert np.array_equal(np.array(rope_inv_freq(head_dim, theta)), theirs), (head_dim, theta)


# ---------------------------------------------------------------------------
# tokenizer.json (byte-level BPE, the Llama 3 / Qwen2 kind) through `tokenizers`

TRICKY = ["Hello! How are you?", "  two leading spaces", "tabs\tand\nnewlines\n\n", "café naïve Ünïcödé",
          "中文字符和日本語", "emoji 🙂🚀 mixed", "numbers 1234567890 and 3.14159", "don't won't it's",
          "<|eot_id|> inline special", "trailing space ", "", "a" * 50, "mixedCASE_snake-case/path.py"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                 "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A model directory with a byte-level BPE tokenizer.json and no tokenizer.model, trained here
    by `tokenizers` (Llama 3's pre-tokenizer kind), with a Llama-3-style chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = _make("llama3", tmp_path_factory.mktemp("bpe"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["The quick brown fox jumps over the lazy dog. " * 5, "Hello! How are you? I am fine.",
              "café naïve 中文 🙂 12345"] * 20
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False}))
    return d


def test_tokenizer_json_ids_equal_autotokenizer(bpe_dir):
    from transformers import AutoTokenizer

    from mlx_tinyllama.tokenizer import load_tokenizer

    ours = load_tokenizer(bpe_dir)  # auto: no tokenizer.model here, so tokenizer.json
    theirs = AutoTokenizer.from_pretrained(str(bpe_dir))
    assert ours.kind == "hf" and ours.bos_id == theirs.bos_token_id and ours.eos_id == theirs.eos_token_id
    for text in TRICKY:
        assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"], text
        ids = ours.encode(text)
        assert ours.decode(ids) == theirs.decode(ids), text


def test_tokens_command_runs_on_a_tokenizer_json_model_and_its_chat_template(bpe_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    from mlx_tinyllama.trace import main as cli

    out = tmp_path / "t.json"
    assert cli(["tokens", "--model", str(bpe_dir), "--chat", "Hello! How are you?", "--system", "Be brief.",
                "--json", str(out)]) == 0
    ids = json.loads(out.read_text())["prompt"]["ids"]
    theirs = AutoTokenizer.from_pretrained(str(bpe_dir)).apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello! How are you?"}],
        add_generation_prompt=True, tokenize=True)
    theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
    assert ids == list(theirs)
    # --compare-ids names a difference in this vocabulary too: an extra BOS in front
    rc = cli(["tokens", "--model", str(bpe_dir), "--chat", "Hello! How are you?", "--system", "Be brief.",
              "--compare-ids", ",".join(map(str, [ids[0]] + ids))])
    assert rc == 1 and "BOS" in capsys.readouterr().out


# ---------------------------------------------------------------------------
# GGUF: per architecture (gguf_write writes what llama.cpp's converter writes:
# scripts/llamacpp/check_family_gguf.py compares the two byte for byte, docs/gguf.md has its output)


@pytest.mark.parametrize("preset, arch, permuted", [("qwen2-tiny", "Qwen2ForCausalLM", False),
                                                     ("llama3-tiny", "LlamaForCausalLM", True)])
def test_a_family_gguf_loads_with_its_layout_and_runs_like_its_checkpoint(preset, arch, permuted, tmp_path):
    import gguf

    from mlx_tinyllama import synthetic
    from mlx_tinyllama.gguf import permute_qk
    from mlx_tinyllama.gguf_write import convert

    d = synthetic.materialize(preset, 0)
    path = tmp_path / f"{preset}.gguf"
    convert(d, path, "f32")
    raw = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(path)).tensors}
    hf = dict(sources.read_safetensors(sources.weight_files(d)))
    import mlx.core as mx

    q = np.array(hf["model.layers.0.self_attn.q_proj.weight"].astype(mx.float32))
    want = permute_qk(q, 4) if permuted else q  # llama permutes Q/K rows; Qwen2's GGUF keeps HF's order
    assert np.array_equal(raw["blk.0.attn_q.weight"], want)
    assert ("blk.0.attn_q.bias" in raw) == (arch == "Qwen2ForCausalLM")
    assert ("rope_freqs.weight" in raw) == (preset == "llama3-tiny")
    lm = sources.load(str(path), "float32")
    assert lm.config.architecture == arch and lm.config.tie_word_embeddings
    ours = run_side(lm, SEED_IDS).tensors
    ref = run_side(sources.load(str(d), "float32"), SEED_IDS).tensors
    ratio, tap = _worst(ours, {k: np.asarray(v, np.float64) for k, v in ref.items()}, 2)
    assert ratio < 0.5, (tap, ratio)


def test_a_gguf_of_an_unknown_architecture_is_refused_by_name(tmp_path):
    import gguf

    path = tmp_path / "x.gguf"
    w = gguf.GGUFWriter(str(path), "gemma")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UserError, match="general.architecture is 'gemma'; this tool runs llama, qwen2"):
        sources.load(str(path), "float32")


@pytest.mark.parametrize("preset", ["llama3-tiny", "qwen2-tiny", "mistral-tiny"])
def test_bench_runs_mlx_lms_own_class_of_each_architecture_on_the_same_weights(preset):
    """bench's side-by-side engine: mlx-lm's model of the architecture, same weight arrays; its
    logits equal ours (a wrong class or a dropped bias would not), for a prompt inside Mistral's
    window (mlx-lm's Llama, which Mistral maps to, has no window)."""
    import mlx.core as mx

    from mlx_tinyllama.bench.engines import mlx_lm_model

    lm = sources.load(f"synthetic:{preset}", "float32")
    ids = mx.array([SEED_IDS[:8]])
    ours = np.array(lm.model(ids), np.float64)
    theirs = np.array(mlx_lm_model(lm)(ids), np.float64)
    assert metrics(theirs, ours)["nmse"] < tolerance_for("logits", "nmse", "float32", "float32", 2)


# ---------------------------------------------------------------------------
# gguf-check per architecture


def _gguf_check(path, hf_dir, tmp_path):
    from mlx_tinyllama.trace import main as cli

    out = tmp_path / "check.json"
    rc = cli(["gguf-check", "--gguf", str(path), "--hf", str(hf_dir), "--json", str(out)])
    return rc, json.loads(out.read_text())


def _rewrite(src, dst, change):
    """A copy of a GGUF with its tensors changed by `change(name, array) -> array | None` (None drops it)."""
    import gguf

    r = gguf.GGUFReader(str(src))
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), arch)
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        w.add_key_value(key, field.contents(), field.types[0],
                        sub_type=field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    for t in r.tensors:
        x = change(t.name, np.array(t.data))
        if x is not None:
            w.add_tensor(t.name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.mark.parametrize("preset", ["qwen2-tiny", "llama3-tiny"])
def test_gguf_check_passes_a_family_gguf_and_names_its_conversion_faults(preset, tmp_path):
    from mlx_tinyllama import synthetic
    from mlx_tinyllama.gguf import permute_qk
    from mlx_tinyllama.gguf_write import convert

    d = synthetic.materialize(preset, 0)
    clean = tmp_path / "clean.gguf"
    convert(d, clean, "f32")
    rc, result = _gguf_check(clean, d, tmp_path)
    assert rc == 0 and not result["mismatches"], result["mismatches"]
    if preset == "qwen2-tiny":  # a converter that permutes Qwen2's Q like Llama's
        bad = _rewrite(clean, tmp_path / "bad.gguf",
                       lambda n, x: permute_qk(x, 4) if n == "blk.0.attn_q.weight" else x)
        rc, result = _gguf_check(bad, d, tmp_path)
        assert rc == 1 and any("blk.0.attn_q.weight" in m and "permuted per head" in m for m in result["mismatches"])
    else:  # a converter that drops Llama 3's RoPE scaling
        bad = _rewrite(clean, tmp_path / "bad.gguf", lambda n, x: None if n == "rope_freqs.weight" else x)
        rc, result = _gguf_check(bad, d, tmp_path)
        assert rc == 1 and any("rope_freqs" in m and "unscaled" in m for m in result["mismatches"])


def test_gguf_check_says_a_mistral_gguf_lost_its_window(tmp_path):
    from mlx_tinyllama import synthetic
    from mlx_tinyllama.gguf_write import convert

    d = synthetic.materialize("mistral-tiny", 0)
    convert(d, tmp_path / "m.gguf", "f32")
    rc, result = _gguf_check(tmp_path / "m.gguf", d, tmp_path)
    assert rc == 1 and any(m.startswith("sliding window") for m in result["mismatches"])


def test_fp16_error_against_fp32_is_no_worse_than_transformers_own_fp16(family):
    """In float16 each architecture's taps stay within the fp16 tolerance of transformers' own fp16
    forward, and our error against the fp32 truth is no worse than transformers' fp16 error
    (within 2x: the two round in different orders, so neither is exact)."""
    from mlx_tinyllama.reference import hf

    kind, d, _, ref32 = family
    ref16 = {k: v.double().numpy() for k, v in hf.capture(hf.load_hf_model(d, "float16"), SEED_IDS)[0].items()}
    ours16 = {k: np.asarray(v, np.float64) for k, v in run_side(sources.load(str(d), "float16"), SEED_IDS).tensors.items()}
    for tap in ref32:
        masked = tap.endswith("scores_masked")
        vs_theirs = metrics(ours16[tap], ref16[tap], masked=masked, mask_dtype="float16")["nmse"]
        assert vs_theirs <= tolerance_for(tap, "nmse", "float16", "float16", 2), (kind, tap, vs_theirs)
    for tap in ("final_norm", "logits"):
        ours, theirs = (metrics(x[tap], ref32[tap])["nmse"] for x in (ours16, ref16))
        assert ours <= 2 * theirs + 1e-12, (kind, tap, ours, theirs)

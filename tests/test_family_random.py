"""The Llama family on configs nobody on the project chose (issue 25, "done when"): a seeded
generator draws transformers configs of LlamaForCausalLM, Qwen2ForCausalLM and
MistralForCausalLM over everything those classes allow and this tool claims to run (sizes,
MHA/GQA/MQA, an explicit head_dim unlike hidden/heads, odd vocabularies and intermediate sizes,
eps, theta, RoPE none/linear/llama3, tied or not, Llama's attention_bias, Mistral's window null,
shorter or longer than the prompt, BOS/EOS ids, context). transformers builds and initialises each
model; every tap of ours must equal transformers' at fp32 within tolerances.py's bound, the
four run paths must agree, and a few must generate transformers' greedy tokens. Configs the tool
does not run (yarn, mlp_bias, ...) drawn the same way must be refused in one line, exit 2.

The seeds are fixed (a failure names its config and reproduces); MLX_TINYLLAMA_FAMILY_SEED=N
draws another set, MLX_TINYLLAMA_FAMILY_N=M more of them."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest

from conftest import has_torch
from mlx_tinyllama import paths, sources
from mlx_tinyllama.compare import run_side
from mlx_tinyllama.config import load_config
from mlx_tinyllama.errors import UserError
from mlx_tinyllama.metrics import metrics
from mlx_tinyllama.tolerances import tolerance_for

pytestmark = pytest.mark.skipif(not has_torch(), reason="needs torch + transformers")

SEED = int(os.environ.get("MLX_TINYLLAMA_FAMILY_SEED", "25"))
N_MODELS = int(os.environ.get("MLX_TINYLLAMA_FAMILY_N", "21"))
CLASSES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")


def draw_config(seed: int, cls: str, j: int = 0) -> tuple[dict, int]:
    """transformers config kwargs of class `cls`, and the prompt length to run it on. The j-th
    draw of a class cycles the categorical choices (attention kind, explicit head_dim, RoPE
    variant, tying, bias, window) with coprime periods, so that any 7 draws of a class cover each;
    sizes and numbers are random."""
    r = random.Random(f"{seed}:{cls}")
    attention = ("mha", "gqa", "mqa")[j % 3]
    heads = r.choice([1, 2, 3, 4, 6, 8]) if attention == "mha" else r.choice([4, 6, 8]) if attention == "gqa" \
        else r.choice([1, 2, 3, 5, 8])
    kv = {"mha": heads, "mqa": 1, "gqa": r.choice([d for d in range(2, heads) if heads % d == 0] or [1])}[attention]
    T = r.randrange(5, 41)
    kw = dict(
        hidden_size=heads * r.choice([4, 6, 8, 10, 16, 24]),  # transformers wants a multiple of heads
        num_hidden_layers=r.randint(1, 3), num_attention_heads=heads, num_key_value_heads=kv,
        intermediate_size=r.randrange(5, 257), vocab_size=r.randrange(67, 1500),
        rms_norm_eps=r.choice([1e-6, 1e-5, 1e-4, 1e-2]), rope_theta=r.choice([10000.0, 500000.0, 1e6, 321.5, 1e7]),
        tie_word_embeddings=(j // 2) % 2 == 1, initializer_range=r.choice([0.02, 0.1, 0.3]),
        max_position_embeddings=max(T + 24, r.choice([T + 24, 64, 128, 4096, 131072])),
    )
    kw["bos_token_id"], kw["eos_token_id"] = r.sample(range(kw["vocab_size"]), 2)
    if j % 2 == 0:  # an explicit head_dim unlike hidden/heads (Qwen3, Mistral-Nemo shapes)
        kw["head_dim"] = r.choice([d for d in (4, 6, 8, 12, 16, 32, 64) if d != kw["hidden_size"] // heads])
    ropes = {"LlamaForCausalLM": ("none", "linear", "llama3"), "Qwen2ForCausalLM": ("none", "linear"),
             "MistralForCausalLM": ("none",)}[cls]
    rope = ropes[j % len(ropes)]
    if rope == "linear":
        kw["rope_scaling"] = {"rope_type": "linear", "factor": r.choice([1.5, 2.0, 4.0, 8.0])}
    elif rope == "llama3":
        low = r.choice([0.5, 1.0, 2.0])
        kw["rope_scaling"] = {"rope_type": "llama3", "factor": r.choice([2.0, 8.0, 32.0]), "low_freq_factor": low,
                              "high_freq_factor": low * r.choice([2.0, 4.0, 8.0]),
                              "original_max_position_embeddings": r.choice([8, 32, 256, 8192])}
    if cls == "LlamaForCausalLM":
        kw["attention_bias"] = (j // 3) % 2 == 0  # q/k/v and o_proj
    if cls == "Qwen2ForCausalLM":
        kw["use_sliding_window"] = False
    if cls == "MistralForCausalLM":  # null, shorter than the prompt (down to 1 key), or longer
        kw["sliding_window"] = (None, 1 if j == 1 else r.randrange(1, T), r.randrange(T, 3 * T))[j % 3]
    return kw, T


def drawn() -> list[tuple[int, str, int]]:
    """(seed, class, j): the j-th draw of each class in turn."""
    return [(SEED * 1000 + i, CLASSES[i % len(CLASSES)], i // len(CLASSES)) for i in range(N_MODELS)]


DRAWN = drawn()
IDS = [f"{s}-{c[:-11].lower()}" for s, c, _ in DRAWN]


def make_model(seed: int, cls: str, j: int, out):
    """transformers builds, initialises and saves the model (biases drawn too: it zeroes them)."""
    import torch
    import transformers

    kw, T = draw_config(seed, cls, j)
    config_cls = getattr(transformers, cls.replace("ForCausalLM", "Config"))
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(config_cls(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.3)
    model.save_pretrained(str(out))
    from mlx_tinyllama.reference import hf

    ids = random.Random(seed).choices(range(kw["vocab_size"]), k=T)
    return hf.load_hf_model(out, "float32"), ids  # as saved, with the eager attention the capture checks


def _ratios(ours: dict, ref: dict, n_layers: int) -> dict[str, float]:
    out = {}
    for tap, r in ref.items():
        m = metrics(np.asarray(ours[tap], np.float64), r, masked=tap.endswith("scores_masked"))
        out[tap] = np.inf if m["mask_mismatch"] else m["nmse"] / tolerance_for(tap, "nmse", "float32", "float32",
                                                                                n_layers)
    return out


def compare_drawn(seed: int, cls: str, j: int, out) -> tuple:
    """(loaded model, ids, {tap: NMSE / fp32 tolerance}, {tap: NMSE}) of one drawn model vs transformers."""
    from mlx_tinyllama.reference import hf

    kw, _ = draw_config(seed, cls, j)
    model, ids = make_model(seed, cls, j, out)
    ref, _ = hf.capture(model, ids)
    ref = {k: v.double().numpy() for k, v in ref.items()}
    lm = sources.load(str(out), "float32")
    ours = run_side(lm, ids).tensors
    nmse = {t: metrics(np.asarray(ours[t], np.float64), r, masked=t.endswith("scores_masked"))["nmse"]
            for t, r in ref.items()}
    return lm, ids, ref, _ratios(ours, ref, kw["num_hidden_layers"]), nmse


@pytest.mark.parametrize("seed, cls, j", DRAWN, ids=IDS)
def test_a_drawn_model_matches_transformers_at_every_tap_and_on_every_path(seed, cls, j, tmp_path):
    kw, _ = draw_config(seed, cls, j)
    lm, ids, _, ratios, _ = compare_drawn(seed, cls, j, tmp_path)
    assert lm.config.architecture == cls
    worst = max(ratios, key=ratios.get)
    assert ratios[worst] < 0.5, (kw, worst, ratios[worst])
    r = paths.check_paths(lm.model, ids, chunks=(2, len(ids) - 2), continue_n=0, dtype="float32")
    assert r["first_divergence"] is None and r["agree"], (kw, r["first_divergence"])


# One fact of a drawn model's config read wrong on our side, and the stage it must show at first.
MISREAD = [
    ("LlamaForCausalLM", 1, dict(rope_factor=1.0, rope_type="default"), "layers.0.attn.q_rope"),  # linear factor
    ("LlamaForCausalLM", 2, dict(rope_type="default", rope_factor=1.0), "layers.0.attn.q_rope"),  # llama3
    ("LlamaForCausalLM", 1, dict(attention_bias=False), "layers.0.attn.q"),  # q/k/v/o biases dropped
    ("Qwen2ForCausalLM", 0, dict(rope_theta=20000.0), "layers.0.attn.q_rope"),
    ("MistralForCausalLM", 1, dict(sliding_window=0), "layers.0.attn.scores_masked"),  # the window (< T)
    ("MistralForCausalLM", 0, dict(rms_norm_eps=0.5), "layers.0.attn_norm"),
]


@pytest.mark.parametrize("cls, j, change, where", MISREAD,
                         ids=[f"{c[:-11].lower()}{j}-{'-'.join(ch)}" for c, j, ch, _ in MISREAD])
def test_a_drawn_model_with_one_fact_misread_diverges_where_it_acts(cls, j, change, where, tmp_path):
    """The agreement above is not vacuous on these shapes either: our model built from the same
    weights with one config fact wrong leaves transformers' at the stage that fact acts on."""
    from dataclasses import replace

    seed = next(s for s, c, k in DRAWN if c == cls and k == j)
    lm, ids, ref, ratios, _ = compare_drawn(seed, cls, j, tmp_path)
    assert max(ratios.values()) < 0.5  # clean first
    weights = dict(sources.read_safetensors(sources.weight_files(tmp_path)))
    if change.get("attention_bias") is False:
        weights = {k: v for k, v in weights.items() if not k.endswith(".bias")}
    lm.model = sources.build_model(replace(lm.config, **change), weights, "float32", lm.model.ops)
    bad = _ratios(run_side(lm, ids).tensors, ref, lm.config.num_hidden_layers)
    assert next(t for t, v in bad.items() if not v <= 1.0) == where, bad


# GGUF-relevant shapes: Llama with biases (explicit head_dim; linear RoPE; llama3 and MQA), Qwen2's
# biases with an explicit head_dim, Mistral with a window at least the prompt's length (a GGUF stores none).
GGUF_DRAWS = [d for d in DRAWN if (d[1], d[2]) in {("LlamaForCausalLM", 0), ("LlamaForCausalLM", 1),
                                                    ("LlamaForCausalLM", 2), ("Qwen2ForCausalLM", 0),
                                                    ("MistralForCausalLM", 2)}]


@pytest.mark.parametrize("seed, cls, j", GGUF_DRAWS, ids=[f"{s}-{c[:-11].lower()}" for s, c, _ in GGUF_DRAWS])
def test_a_drawn_model_through_gguf_runs_like_its_checkpoint(seed, cls, j, tmp_path):
    """gguf_write's file of a drawn model loads back to the same computation: explicit head_dim,
    MQA, linear and llama3 RoPE, Qwen2's biases, and Llama's attention_bias (which no GGUF key
    states: llama.cpp reads the bias tensors where they are; this loader refused them). A file
    with the o_proj biases dropped is refused by name, not run without them."""
    import gguf

    from mlx_tinyllama.gguf_write import convert

    kw, _ = draw_config(seed, cls, j)
    _, ids = make_model(seed, cls, j, tmp_path)
    convert(tmp_path, tmp_path / "m.gguf", "f32")
    g = sources.load(str(tmp_path / "m.gguf"), "float32")
    assert g.config.qkv_bias == (cls == "Qwen2ForCausalLM" or kw.get("attention_bias", False))
    ref = {k: np.asarray(v, np.float64) for k, v in run_side(sources.load(str(tmp_path), "float32"), ids).tensors.items()}
    ratios = _ratios(run_side(g, ids).tensors, ref, kw["num_hidden_layers"])
    assert max(ratios.values()) < 0.5, max(ratios, key=ratios.get)
    if kw.get("attention_bias"):
        r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
        w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "llama")
        for key, field in r.fields.items():
            if not key.startswith("GGUF.") and key != "general.architecture":
                w.add_key_value(key, field.contents(), field.types[0],
                                sub_type=field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
        for t in r.tensors:
            if not t.name.endswith("attn_output.bias"):
                w.add_tensor(t.name, np.array(t.data))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with pytest.raises(UserError, match="missing model.layers.0.self_attn.o_proj.bias"):
            sources.load(str(tmp_path / "bad.gguf"), "float32")


def test_the_drawn_set_covers_every_variation_it_claims():
    """The set above is not a lucky handful: each class's categorical choices all occur in it."""
    seen = set()
    for seed, cls, j in DRAWN:
        kw, T = draw_config(seed, cls, j)
        heads, kv = kw["num_attention_heads"], kw["num_key_value_heads"]
        seen.add((cls, "mqa" if kv == 1 else "mha" if kv == heads else "gqa"))
        seen.add((cls, "head_dim" if "head_dim" in kw else "hidden/heads"))
        seen.add((cls, (kw.get("rope_scaling") or {}).get("rope_type", "none")))
        seen.add((cls, f"tied={kw['tie_word_embeddings']}"))
        if cls == "LlamaForCausalLM":
            seen.add((cls, f"attention_bias={kw['attention_bias']}"))
        if cls == "MistralForCausalLM":
            w = kw["sliding_window"]
            seen.add((cls, "window=null" if w is None else "window<T" if w < T else "window>=T"))
    want = {(c, v) for c in CLASSES for v in ("mha", "gqa", "mqa", "head_dim", "hidden/heads", "none", "tied=True",
                                              "tied=False")}
    want |= {("LlamaForCausalLM", v) for v in ("linear", "llama3", "attention_bias=True", "attention_bias=False")}
    want |= {("Qwen2ForCausalLM", "linear")}
    want |= {("MistralForCausalLM", v) for v in ("window=null", "window<T", "window>=T")}
    assert want <= seen, sorted(want - seen)


# two of each class: GQA and MQA, tied and not, windows 1 and >= T (the second of each is slow)
GREEDY = [pytest.param(*d, marks=[pytest.mark.slow] if d[2] == 2 else [], id=f"{d[0]}-{d[1][:-11].lower()}")
          for d in DRAWN if d[2] in (1, 2)]


@pytest.mark.parametrize("seed, cls, j", GREEDY)
def test_greedy_tokens_of_a_drawn_model_equal_transformers_generate(seed, cls, j, tmp_path):
    """24 greedy tokens equal transformers' greedy search, which is defined by its forward
    (generate without a cache); and its cached generate too, except for one transformers
    fault: its sliding-window cache keeps `-(window - 1):` keys, i.e. all of them for a window of
    1 (transformers 5.x cache_utils.DynamicSlidingWindowLayer), so only there does its cached
    run leave its own forward (and ours follows the forward)."""
    import torch

    kw, _ = draw_config(seed, cls, j)
    model, ids = make_model(seed, cls, j, tmp_path)
    lm = sources.load(str(tmp_path), "float32")
    ours = paths.greedy_continuation(lm.model, ids, 24).cached
    runs = {}
    for use_cache in (False, True):
        with torch.no_grad():
            runs[use_cache] = model.generate(torch.tensor([ids]), max_new_tokens=24, min_new_tokens=24,
                                             do_sample=False, eos_token_id=None, pad_token_id=0,
                                             use_cache=use_cache)[0, len(ids):].tolist()
    assert ours == runs[False], kw
    assert runs[True] == runs[False] or kw.get("sliding_window") == 1, kw


MINIMAL = dict(hidden_size=256, intermediate_size=300, num_hidden_layers=2, num_attention_heads=32, vocab_size=1000)


@pytest.mark.parametrize("cls", CLASSES)
def test_a_config_json_that_leaves_keys_out_reads_as_transformers_reads_it(cls):
    """A hand-written config.json with only the sizes: every field left out is what transformers'
    class of that architecture assumes (Mistral: 8 KV heads and a 4096-key window; Qwen2: 32 KV
    heads, 32768 positions), and null is what it makes of null."""
    import transformers

    from mlx_tinyllama.config import config_from_hf_dict

    model_type = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}[cls]
    nulls = {"sliding_window": None, "head_dim": None} if cls == "MistralForCausalLM" else \
        {"num_key_value_heads": None, "head_dim": None}  # (transformers 5 refuses Mistral's null KV heads)
    for extra in ({}, nulls):
        d = dict(MINIMAL, architectures=[cls], **extra)
        theirs = transformers.AutoConfig.for_model(model_type, **d)
        ours = config_from_hf_dict(dict(d, model_type=model_type))
        assert ours.num_key_value_heads == theirs.num_key_value_heads, (cls, extra)
        assert ours.max_position_embeddings == theirs.max_position_embeddings, (cls, extra)
        assert ours.head_dim == (getattr(theirs, "head_dim", None) or 256 // 32), (cls, extra)
        assert (ours.rms_norm_eps, ours.rope_theta, ours.tie_word_embeddings) == \
            (theirs.rms_norm_eps, theirs.rope_parameters["rope_theta"], theirs.tie_word_embeddings), (cls, extra)
        window = getattr(theirs, "sliding_window", None) if cls == "MistralForCausalLM" else None
        assert ours.window == (window or 0), (cls, extra)


REFUSED = [
    ("LlamaForCausalLM", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}},
     "unsupported rope scaling 'yarn'"),
    ("LlamaForCausalLM", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "unsupported rope scaling 'dynamic'"),
    ("LlamaForCausalLM", {"mlp_bias": True}, "mlp_bias"),
    ("LlamaForCausalLM", {"hidden_act": "gelu"}, "hidden_act is 'gelu'"),
    ("Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
     "max_window_layers"),
    ("Qwen2ForCausalLM", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 32}},
     "unsupported rope scaling 'llama3'"),
    ("MistralForCausalLM", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "unsupported rope scaling 'linear'"),
    ("MistralForCausalLM", {"head_dim": 7}, "head_dim is 7"),
]


@pytest.mark.parametrize("cls, change, words", REFUSED, ids=[f"{c[:-11].lower()}-{w.split()[0]}" for c, _, w in REFUSED])
def test_a_drawn_config_with_a_variant_the_tool_does_not_run_is_refused_in_one_line(cls, change, words, tmp_path,
                                                                                    capsys):
    """A drawn config.json plus one thing this tool does not run: `trace run` says so in one line and
    exits 2 before anything is computed (transformers itself would run most of these)."""
    import transformers

    from mlx_tinyllama.trace import main as cli

    seed, _, j = next(d for d in DRAWN if d[1] == cls)
    kw, _ = draw_config(seed, cls, j)
    getattr(transformers, cls.replace("ForCausalLM", "Config"))(**kw).save_pretrained(str(tmp_path))
    d = json.loads((tmp_path / "config.json").read_text())
    d.update(change)
    if "rope_scaling" in change:  # transformers 5 writes rope_parameters; the change replaces both
        d["rope_parameters"] = dict(change["rope_scaling"], rope_theta=kw["rope_theta"])
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert cli(["run", "--model", str(tmp_path), "--dtype", "float32", "--token-ids", "1,2,3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and words in err, err
    with pytest.raises(UserError, match=words.replace("(", r"\(")):
        load_config(tmp_path)


if __name__ == "__main__":  # the figures of docs/family.md: python tests/test_family_random.py
    import sys
    import tempfile

    print("seed   class               T  layers heads/kv head_dim  worst tap                        NMSE      /tol")
    worst_all = (0.0, "")
    for seed, cls, j in DRAWN:
        kw, T = draw_config(seed, cls, j)
        with tempfile.TemporaryDirectory() as d:
            _, _, _, ratios, nmse = compare_drawn(seed, cls, j, __import__("pathlib").Path(d))
        tap = max(ratios, key=ratios.get)
        worst_all = max(worst_all, (max(nmse.values()), f"{seed} {cls}"))
        print(f"{seed} {cls:19s} {T:2d} {kw['num_hidden_layers']:6d} {kw['num_attention_heads']:5d}/{kw['num_key_value_heads']:<2d}"
              f" {kw.get('head_dim', kw['hidden_size'] // kw['num_attention_heads']):8d}  {tap:32s} "
              f"{nmse[tap]:.2e} {ratios[tap]:.2e}", flush=True)
    print(f"worst NMSE over the {len(DRAWN)} models and all their taps: {worst_all[0]:.2e} ({worst_all[1]})")
    sys.exit(0)

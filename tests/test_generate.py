"""Generation through the KV cache: greedy tokens (compiled decode and eager) equal transformers' and mlx-lm's,
sampling is reproducible, stops are reported, tapped steps record the right rows."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from mlx_tinyllama import sources
from mlx_tinyllama.generate import Sampling, generate_tokens
from mlx_tinyllama.paths import row_errors
from mlx_tinyllama.taps import tap_names
from mlx_tinyllama.tolerances import tolerance_for
from mlx_tinyllama.trace import main as trace

from conftest import needs_torch

STEPS = 64


@pytest.fixture(scope="module")
def small32(small_dir):
    return sources.load(str(small_dir), "float32")


@pytest.fixture(scope="module")
def greedy_small(small32, seed_ids):
    """The default path with taps off: the compiled decode step."""
    gen = generate_tokens(small32.model, seed_ids, STEPS, stop_at_eos=False)
    assert gen.decode == "compiled"
    return gen.token_ids


def test_compiled_decode_equals_the_eager_path(small32, seed_ids, greedy_small, monkeypatch):
    from mlx_tinyllama import decode

    eager = generate_tokens(small32.model, seed_ids, STEPS, stop_at_eos=False, compiled=False)
    assert eager.decode == "eager" and eager.token_ids == greedy_small
    steps = []  # the compiled function really runs every decode step
    call = decode.CompiledDecoder.__call__
    monkeypatch.setattr(decode.CompiledDecoder, "__call__", lambda self, ids, cache: steps.append(ids.size) or call(self, ids, cache))
    assert generate_tokens(small32.model, seed_ids, 8, stop_at_eos=False).token_ids == greedy_small[:8]
    assert steps == [len(seed_ids)] + [1] * 7


def test_taps_select_the_eager_path(small32, seed_ids, greedy_small):
    gen = generate_tokens(small32.model, seed_ids, 6, stop_at_eos=False, tap_step=2, tap_names=["logits"])
    assert gen.decode == "eager" and gen.token_ids == greedy_small[:6] and gen.taps is not None


@needs_torch
def test_greedy_equals_transformers_generate(small_dir, seed_ids, greedy_small):
    import torch
    import transformers

    hf = transformers.LlamaForCausalLM.from_pretrained(small_dir, dtype=torch.float32).eval()
    with torch.no_grad():  # greedy; no EOS so that both run all 32 steps
        out = hf.generate(torch.tensor([seed_ids]), max_new_tokens=STEPS, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    theirs = out[0, len(seed_ids):].tolist()
    assert len(theirs) == STEPS
    assert greedy_small == theirs


def test_greedy_equals_mlx_lm_generate(small_dir, seed_ids, greedy_small):
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model

    model, _ = load_model(small_dir)  # mlx-lm's own Llama on the same weights
    steps = generate_step(mx.array(seed_ids), model, max_tokens=STEPS)
    theirs = [int(token) for token, _ in steps]
    assert greedy_small == theirs


def test_sampling_is_reproducible_with_a_seed(small32, seed_ids, greedy_small):
    def sample(**kw):
        return generate_tokens(small32.model, seed_ids, 12, Sampling(**kw), stop_at_eos=False).token_ids

    a = sample(temperature=1.0, top_p=0.95, seed=7)
    assert a == sample(temperature=1.0, top_p=0.95, seed=7)
    assert a != sample(temperature=1.0, top_p=0.95, seed=8)
    assert a != greedy_small[:12]
    assert sample(temperature=1.0, top_k=1, seed=3) == greedy_small[:12]  # top-1 sampling is greedy


class EosAfter:
    """A model whose logits make EOS the argmax once `n` tokens were fed after the prompt."""

    def __init__(self, inner, prompt_len: int, n: int):
        self.inner, self.config, self.at = inner, inner.config, prompt_len + n

    def make_cache(self):
        return self.inner.make_cache()

    def __call__(self, ids, cache=None, tap=None):
        logits = self.inner(ids, cache=cache)
        if cache[0].offset >= self.at:
            logits = logits + mx.where(mx.arange(logits.shape[-1]) == 2, 1e4, 0.0)
        return logits


def test_stops_at_eos(small32, seed_ids):
    gen = generate_tokens(EosAfter(small32.model, len(seed_ids), 3), seed_ids, 20)
    assert gen.stop_reason == "eos" and len(gen.token_ids) == 4 and gen.token_ids[-1] == 2


def test_tapped_step_records_the_rows_of_that_step(small32, seed_ids):
    names = tap_names(4)
    gen = generate_tokens(small32.model, seed_ids, 5, stop_at_eos=False, tap_step=3, tap_names=names, tap_mode="full")
    seq = seed_ids + gen.token_ids[:3]  # step 3 feeds generated token 2 at position len(prompt) + 2
    full = {}
    from mlx_tinyllama.taps import Taps

    taps = Taps(names, "full")
    small32.model(mx.array(seq), tap=taps)
    pos = len(seq) - 1
    assert gen.taps.tensors["layers.0.attn.probs"].shape == (8, 1, len(seq))
    for name in ("layers.0.attn.q_rope", "layers.3.out", "logits"):
        ax = 1 if name.endswith("q_rope") else 0
        step = np.array(gen.taps.tensors[name])
        full[name] = np.take(np.array(taps.tensors[name]), [pos], axis=ax)
        # The project's rule, not a fixed rtol: a BLAS rounds a 1-row and a T-row product differently.
        nmse = row_errors(step[None], full[name][None])[0]
        assert nmse < tolerance_for(name, "nmse", "float32", "float32", 4), name


@pytest.fixture()
def short_context_dir(tiny_dir, tmp_path):
    """The tiny model with max_position_embeddings = 42."""
    d = tmp_path / "short"
    shutil.copytree(tiny_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["max_position_embeddings"] = 42
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_generation_stops_at_max_position_embeddings(short_context_dir, tmp_path, capfd):
    out = tmp_path / "g.json"
    rc = trace(["generate", "--model", str(short_context_dir), "--dtype", "float32", "--max-tokens", "10",
                "--ignore-eos", "--json", str(out)])
    r = json.loads(out.read_text())
    assert rc == 0 and r["stop_reason"] == "max_position" and len(r["token_ids"]) == 42 - 38
    assert "max_position_embeddings=42" in capfd.readouterr().err


def test_command_streams_text_and_writes_json(tiny_dir, tmp_path, capfd):
    out = tmp_path / "g.json"
    rc = trace(["generate", "--model", str(tiny_dir), "--dtype", "float32", "--chat", "Hi!", "--max-tokens", "8",
                "--tap-step", "2", "--taps", "layers.0.attn.probs", "--json", str(out)])
    r = json.loads(out.read_text())
    assert rc == 0 and len(r["token_ids"]) == 8 and r["stop_reason"] == "max_tokens"
    assert capfd.readouterr().out == r["text"] + "\n"
    assert r["prompt"]["source"] == "--chat" and "Hi!" in r["prompt"]["text"]
    probs = r["taps"]["layers.0.attn.probs"]
    assert probs["shape"] == [4, 1, len(r["prompt"]["ids"]) + 2]
    assert 0 < r["prefill_seconds"] <= r["seconds"] and r["decode_tokens_per_s"] > 0
    assert r["decode"] == "eager"  # taps on


def test_temperature_zero_is_greedy(tiny_dir, tmp_path):
    """Greedy by default and at --temperature 0; sampling options are refused there, not ignored."""
    assert trace(["generate", "--model", str(tiny_dir), "--temperature", "0", "--top-p", "0.5", "--seed", "1"]) == 2
    outs = []
    for extra in ([], ["--temperature", "0"]):
        out = tmp_path / f"g{len(extra)}.json"
        trace(["generate", "--model", str(tiny_dir), "--dtype", "float32", "--max-tokens", "6", "--json", str(out),
               *extra])
        r = json.loads(out.read_text())
        outs.append(r["token_ids"])
        assert r["decode"] == "compiled"  # taps off
    assert outs[0] == outs[1]


@pytest.mark.parametrize("argv", [["--temperature", "-0.5"], ["--temperature", "0.7", "--top-p", "0"],
                                  ["--temperature", "0.7", "--top-p", "1.5"], ["--temperature", "0.7", "--top-k", "-1"],
                                  ["--max-tokens", "0"], ["--taps", "logits"], ["--tap-step", "64"],
                                  ["--tap-step", "0", "--taps", "nope"], ["--json", "/nonexistent/g.json"]])
def test_bad_input_exits_2(tiny_dir, argv, capsys):
    assert trace(["generate", "--model", str(tiny_dir), *argv]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_concatenated_projections_change_no_number(small_dir, seed_ids):
    """decode.concatenate_projections: the separate weights become views of the joined ones (no
    memory added), every eager logit is bit-identical, and the compiled step on the joined
    weights picks the same 64 greedy tokens as the eager path (fp32)."""
    from mlx_tinyllama import decode, fast

    lm = sources.load(str(small_dir), "float32")
    ids = mx.array([seed_ids])
    before = lm.model(ids)
    mx.eval(before)
    memory = mx.get_active_memory()
    assert decode.concatenate_projections(lm.model)
    assert mx.get_active_memory() <= memory  # views of the joined buffers: nothing copied
    layer = lm.model.layers[0]
    assert layer.self_attn._qkv[0].shape[0] == sum(m.weight.shape[0] for m in (
        layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj))
    from mlx.utils import tree_flatten

    names = [k for k, _ in tree_flatten(lm.model.parameters())]
    assert not any("_qkv" in k or "_gate_up" in k for k in names)  # not parameters: checkpoints, mlx-lm unchanged
    assert mx.array_equal(lm.model(ids), before).item()

    def greedy(step, cache):
        first = fast.next_token(fast.prefill(step, ids, cache))
        mx.eval(first)
        return fast.greedy_decode(step, cache, first, STEPS)

    joined = decode.CompiledDecoder(lm.model, concatenate=True)
    assert joined.concatenated
    tokens = greedy(joined, joined.make_cache(len(seed_ids) + STEPS + 1))
    assert tokens == greedy(fast.model_step(lm.model), lm.model.make_cache())
    # by default only on a GPU, where launches bound a step; on the CPU it is matmul-bound
    assert decode.CompiledDecoder(lm.model).concatenated == (mx.default_device().type == mx.gpu)


def test_a_replaced_weight_is_never_read_through_a_stale_concatenation(tiny_dir, seed_ids):
    """After concatenate_projections, a reloaded weight or a replaced Linear (llama.cpp's input
    rounding wraps them) must be what the concatenated path computes with; joining again
    picks the new weight up."""
    from mlx_tinyllama import decode
    from mlx_tinyllama.emulation import EmulatedLinear
    from mlx_tinyllama.ops import Ops

    lm = sources.load(str(tiny_dir), "float32")
    ids = mx.array([seed_ids])
    joined_ops = Ops(projections="concatenated")
    assert decode.concatenate_projections(lm.model)
    attn = lm.model.layers[0].self_attn
    before = lm.model(ids)
    attn.q_proj.weight = attn.q_proj.weight * 2  # a new array: the joined buffer is stale now
    want = lm.model(ids)  # separate projections, the model's own ops
    def near(a, b):  # one matmul instead of three moves fp32 logits by ~1e-6 of their range here
        return (mx.abs(a - b).max() <= 1e-5 * mx.abs(b).max()).item()

    assert not near(before, want)  # the doubled weight shows in the logits
    assert near(lm.model(ids, ops=joined_ops), want)
    assert decode.concatenate_projections(lm.model)  # joins layer 0's q/k/v again, with the new weight
    assert mx.array_equal(attn._qkv[0][: attn.q_proj.weight.shape[0]], attn.q_proj.weight).item()
    assert near(lm.model(ids, ops=joined_ops), want)
    mlp = lm.model.layers[0].mlp
    mlp.up_proj = EmulatedLinear(mlp.up_proj, "f16")  # a module of another kind: not concatenated
    h = mx.random.normal((1, 5, lm.config.hidden_size), key=mx.random.key(0))
    gate, up = mlp.project(h, joined_ops)
    assert mx.array_equal(gate, mlp.gate_proj(h)).item() and mx.array_equal(up, mlp.up_proj(h)).item()
    assert not mx.array_equal(up, h @ mlp.up_proj.weight.T).item()  # the emulated rounding is in it


def test_half_weights_on_the_cpu_are_not_concatenated(small_dir):
    lm = sources.load(str(small_dir), "float16")  # Fp32GemmLinear on the CPU
    if mx.default_device().type == mx.gpu:
        pytest.skip("on a GPU half weights are plain nn.Linear")
    from mlx_tinyllama import decode

    assert not decode.concatenate_projections(lm.model)
    assert lm.model.layers[0].self_attn._qkv is None


def test_the_causal_mask_is_built_once_per_shape():
    from mlx_tinyllama.ops import Ops, mask_value

    ops = Ops()
    a, b = ops.causal_mask(5, 9, mx.float16), ops.causal_mask(5, 9, mx.float16)
    assert a is b  # shared by every layer of a forward pass
    rows, cols = np.arange(4, 9)[:, None], np.arange(9)[None, :]
    want = np.where(cols > rows, mask_value(mx.float16), 0).astype(np.float16)
    assert np.array_equal(np.array(a), want) and ops.causal_mask(1, 9, mx.float16) is None

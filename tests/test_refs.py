"""Reference formats: the seed's JSON files and their traps, the carried-over bundle,
layouts, dumps and stats JSON from the run command, and the tolerance rules."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import SEED_IDS, SHARED
from mlx_tinyllama import refs as R
from mlx_tinyllama.errors import UserError
from mlx_tinyllama.stages import tap_names
from mlx_tinyllama.tolerances import Tolerances, tolerance_for
from mlx_tinyllama.metrics import metrics
from mlx_tinyllama.trace import main as cli

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "refs" / "tinyllama-1.1b-chat-v1.0.seed.json"
FP32 = REPO / "refs" / "synthetic-tiny-fp32.json"


def _items(side):
    return {(i.tap, i.selector.key): i for i in side.items}


def test_bundle_maps_the_seed_keys_with_their_traps():
    sides = {s.name.split("#")[1]: s for s in R.load(BUNDLE)}
    hf = _items(sides["transformers_reference_values"])
    assert hf[("final_norm", "last[0:3]")].key.endswith("layer_21_output.sample_last_0_3")  # not layers.21.out
    assert "TRAP" in hf[("final_norm", "last[0:3]")].note
    assert [e["token_id"] for e in hf[("logits", "top10(last)")].value][0] == 29902
    assert sides["transformers_reference_values"].ids == SEED_IDS
    candle = sides["candle_22layers_reference"]
    assert candle.n_tokens == 39 and candle.ids is None and "BOS" in candle.ids_note
    assert {i.tap for i in candle.items if i.selector.kind == "sum"} >= {f"layers.{n}.out" for n in range(22)}
    one = sides["candle_1layer_reference"]
    assert all(i.tap != "layers.0.out" for i in one.items)  # its layer_0 fields are norm(layer 0), not layer 0
    assert {n["key"] for n in one.not_comparable} == {"layer_0.output_sum", "layer_0.output_first_3"}
    assert _items(one)[(R.SHORTCUT_LOGITS, "top10(last)")].value[0]["token_id"] == 26012


@pytest.mark.skipif(not (SHARED / "refs").is_dir(), reason="../shared/refs is not beside this checkout")
def test_committed_bundle_is_what_the_import_script_makes_from_shared():
    import importlib.util

    spec = importlib.util.spec_from_file_location("imp", REPO / "scripts" / "import_seed_refs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.build(SHARED / "refs") == json.loads(BUNDLE.read_text())
    for name in mod.FILES:  # the raw files read the same as the bundle
        raw = R.load(SHARED / "refs" / "tinyllama-1.1b-chat-v1.0" / f"{name}.json")[0]
        assert set(_items(raw)) == set(_items(next(s for s in R.load(BUNDLE) if s.name.endswith(name))))


@pytest.mark.parametrize("text", ["full", "sum", "row0[0:3]", "last[0:3]", "last.sum", "top10(last)", "last[:]"])
def test_selector_keys_round_trip(text):
    assert R.Selector.parse(text).key == text


def test_selector_rows_follow_the_stats_convention():
    x = np.arange(2 * 5 * 4, dtype=np.float32).reshape(2, 5, 4)  # head-major [H, T, D]
    assert R.Selector.parse("last[0:3]").extract(x, 1).tolist() == x[0, -1, :3].tolist()  # head 0, last token
    assert R.Selector.parse("row0[0:3]").extract(x[0], 0).tolist() == x[0, 0, :3].tolist()
    with pytest.raises(UserError):
        R.Selector.parse("row0[0:3")


def test_gguf_permutation_is_undone():
    D, H, T = 8, 3, 4
    hf = np.random.default_rng(0).normal(size=(H, T, D))
    # convert_hf_to_gguf's permute: rows of a head reordered as (half, i) -> (i, half)
    gguf = hf.reshape(H, T, 2, D // 2).swapaxes(-1, -2).reshape(H, T, D)
    assert not np.allclose(gguf, hf)
    np.testing.assert_array_equal(R.unpermute_gguf(gguf), hf)


def test_to_canonical_layouts():
    cfg = {"hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 12,
           "vocab_size": 10, "num_hidden_layers": 1}
    q = np.random.default_rng(1).normal(size=(2, 5, 4))  # [H, T, D]
    flat = q.transpose(1, 0, 2).reshape(5, 8)
    for given in (flat, flat[None], q.transpose(1, 0, 2)):
        got, _, rows, _ = R.to_canonical("layers.0.attn.q", given, None, cfg, 5)
        np.testing.assert_array_equal(got, q)
        assert rows is None
    got, _, _, _ = R.to_canonical("layers.0.attn.context", q, None, cfg, 5)
    np.testing.assert_array_equal(got, flat)
    got, _, rows, notes = R.to_canonical("logits", np.ones((1, 10)), None, cfg, 5)
    assert rows == [4] and "last 1" in notes[0]
    got, _, _, _ = R.to_canonical("embed", flat.T, None, cfg, 5)
    np.testing.assert_array_equal(got, flat)
    with pytest.raises(ValueError):
        R.to_canonical("embed", np.ones((5, 7)), None, cfg, 5)


def test_run_dump_and_stats_json_compare_against_the_reference(tmp_path):
    dump, stats = tmp_path / "d.safetensors", tmp_path / "s.json"
    assert cli(["run", "--model", "synthetic:tiny", "--dtype", "float32", "--taps", "*", "--dump", str(dump)]) == 0
    assert cli(["run", "--model", "synthetic:tiny", "--taps", "*", "--json", str(stats)]) == 0
    out = tmp_path / "c.json"
    for against in (dump, stats):
        assert cli(["compare", "--against", str(against), "--ref", str(FP32), "--json", str(out)]) == 0
        result = json.loads(out.read_text())
        assert result["status"] == "match" and len(result["stages"]) == len(tap_names(2))
    # their dump against this package's own run of --model (the dump's ids are used)
    assert cli(["compare", "--against", str(dump), "--model", "synthetic:tiny", "--json", str(out)]) == 0
    # a user name map: their names -> canonical taps
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(dump))
    renamed = tmp_path / "r.safetensors"
    save_file({"emb": tensors["embed"], "h0": tensors["layers.0.out"]}, str(renamed))
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"emb": "embed", "h0": "layers.0.out"}))
    # (two stages that stop at layer 0: a cut unless --partial says it holds only these by design)
    assert cli(["compare", "--against", str(renamed), "--ref", str(FP32), "--map", str(mapping)]) == 2
    assert cli(["compare", "--against", str(renamed), "--ref", str(FP32), "--map", str(mapping), "--partial",
                "--json", str(out)]) == 0
    assert {s["tap"] for s in json.loads(out.read_text())["stages"]} == {"embed", "layers.0.out"}
    mapping.write_text(json.dumps({"emb": "embedding"}))
    assert cli(["compare", "--against", str(renamed), "--ref", str(FP32), "--map", str(mapping)]) == 2


# --- tolerances -------------------------------------------------------------------------


def test_tolerances_follow_dtype_and_depth():
    t = lambda tap, a, b: tolerance_for(tap, "nmse", a, b, 22)  # noqa: E731
    assert t("embed", "float32", "float32") < t("embed", "float16", "float16") < t("embed", "bfloat16", "float16")
    assert t("embed", "float32", "float16") == t("embed", "float16", "float16")  # the coarser side decides
    assert t("layers.0.out", "fp16", "fp16") < t("layers.10.out", "fp16", "fp16") < t("logits", "fp16", "fp16")
    assert tolerance_for("logits", "top1", "fp16", "fp16", 22) == 0


def test_tolerance_overrides():
    tol = Tolerances.from_overrides(["nmse=1e-6", "layers.0.attn.probs:nmse=1e-4", "scale=3"])
    assert tol.get("layers.0.attn.probs", "nmse", "fp16", "fp16", 2) == 1e-4
    assert tol.get("layers.1.attn.probs", "nmse", "fp16", "fp16", 2) == 1e-6
    assert tol.get("embed", "rel_rms", "fp16", "fp16", 2) == 3 * tolerance_for("embed", "rel_rms", "fp16", "fp16", 2)
    for bad in ("nmse", "nmse=x", "bogus=1", "nmse=-1"):
        with pytest.raises(UserError):
            Tolerances.from_overrides([bad])


def test_metrics():
    b = np.array([[1.0, -2.0, 3.0], [0.5, -65504.0, -65504.0]])
    m = metrics(b, b, masked=True)
    assert m["nmse"] == 0 and m["mask_mismatch"] == 0 and m["cosine"] == pytest.approx(1.0)
    a = b.copy()
    a[1, 1] = 0.0  # unmasked where the reference is masked
    assert metrics(a, b, masked=True)["mask_mismatch"] == 1
    a = b.copy()
    a[0, 2] = np.nan
    m = metrics(a, b)
    assert m["first_nonfinite_a"] == (0, 2) and m["nonfinite"] == 1 and math.isinf(m["nmse"])


def test_stats_json_ids_come_from_prompt_ids_or_the_older_tokens_key(tmp_path):
    """Schema 1 writes the ids under prompt.ids; files written before it have them under tokens."""
    base = {"dtype": "float32", "taps": {"embed": {"first": [0.0, 0.0, 0.0]}}}
    path = tmp_path / "s.json"
    for data, ids in (({**base, "prompt": {"ids": [5, 6, 7]}}, [5, 6, 7]), ({**base, "tokens": [8, 9]}, [8, 9]),
                      (base, None)):
        path.write_text(json.dumps(data))
        (side,) = R.load(path)
        assert side.ids == ids and side.n_tokens == (len(ids) if ids else None)


def test_reference_manifest_reads_bos_from_the_models_config(tiny_dir, tmp_path):
    """The manifest's prompt.bos compares the first id with the model's own BOS id (config.json),
    not with 1: a model whose BOS is 529 marks the seed ids (which start with 529) as having one."""
    import json
    import shutil

    pytest.importorskip("torch")
    from mlx_tinyllama.reference.hf import write_reference

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["bos_token_id"] = SEED_IDS[0]
    (model / "config.json").write_text(json.dumps(cfg))
    m = json.loads(write_reference(tmp_path / "ref", model, SEED_IDS, taps=["embed"]).read_text())
    assert m["prompt"]["bos"] is True
    m = json.loads(write_reference(tmp_path / "ref2", tiny_dir, SEED_IDS, taps=["embed"]).read_text())
    assert m["prompt"]["bos"] is False  # BOS 1, ids start with 529

"""The verdict on engines the project did not build (issue 21): the tolerance follows what the
candidate is (its declared dtype, else its tensors' storage dtypes), in every format, with the
reference computed at that precision when no --dtype is given; masks equal by effect; last-row-only
tensors; token-count mismatches and decode steps given to --against refused (exit 2); decode-step
key-count notes. Each fault is found at its stage and the clean run of the same format matches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import numpy_engine
from conftest import SEED_IDS
from mlx_tinyllama.trace import main as cli
from numpy_engine import Engine

MODEL = ["--model", "synthetic:tiny"]  # no --dtype: the candidate's precision decides
IDS = ",".join(map(str, SEED_IDS))
P0 = len(SEED_IDS)


def _rms_eps_after_sqrt(x, g, eps):
    """RMSNorm with eps added after the square root (a real fault: 5.6e4x the fp32 tolerance on TinyLlama)."""
    return g * (x / (np.sqrt(np.mean(x * x, axis=-1, keepdims=True)) + eps))


def _silu_half_exp(x):
    """SiLU through a float16 exp (a half-precision intrinsic in a float32 engine): within fp16's tolerance,
    far outside fp32's."""
    return x / (1.0 + np.exp(-x).astype(np.float16).astype(np.float64))


FAULTS = {"clean": (None, None), "eps_after_sqrt": ("_rms", _rms_eps_after_sqrt),
          "silu_half_exp": ("_silu", _silu_half_exp)}
FAULT_STAGE = {"eps_after_sqrt": "layers.0.attn_norm", "silu_half_exp": "layers.0.mlp.act"}


def _taps(tiny_dir, monkeypatch, fault: str, ids=SEED_IDS) -> dict[str, np.ndarray]:
    name, fn = FAULTS[fault]
    with monkeypatch.context() as m:
        if name:
            m.setattr(numpy_engine, name, fn)
        engine = Engine(tiny_dir)
        engine.prefill(ids)
    return dict(engine.taps)


def _write(fmt: str, taps: dict, path: Path, dtype: str = "float32", ids=SEED_IDS) -> Path:
    """One dump of `taps` in `fmt`: kit (safetensors with dtype and tokens metadata), bare safetensors,
    npz, or a stats JSON with full values."""
    if fmt == "kit":
        kit = numpy_engine._kit_module()
        d = kit.TapDump(tokens=ids, position=0, dtype=dtype, engine="test")
        for n, x in taps.items():
            d.add(n, x.astype(np.float32), store_as=dtype)
        d.write(path)
    elif fmt == "safetensors":
        from safetensors.numpy import save_file

        save_file({n: np.ascontiguousarray(x.astype(dtype)) for n, x in taps.items()}, str(path))
    elif fmt == "npz":
        np.savez(path, **{n: x.astype(dtype) for n, x in taps.items()})
    else:
        path.write_text(json.dumps({"dtype": dtype, "prompt": {"ids": list(ids)},
                                    "taps": {n: {"values": x.astype(np.float32).tolist()} for n, x in taps.items()}}))
    return path


SUFFIX = {"kit": ".safetensors", "safetensors": ".safetensors", "npz": ".npz", "stats": ".json"}


def _compare(path: Path, tmp_path: Path, capsys, *extra) -> tuple[int, dict, str]:
    out = tmp_path / "r.json"
    ids = [] if path.suffix == ".json" or "kit" in path.name else ["--token-ids", IDS]
    rc = cli(["compare", "--against", str(path), *MODEL, *ids, "--json", str(out), *extra])
    captured = capsys.readouterr()
    result = json.loads(out.read_text()) if out.exists() else {}
    return rc, result, captured.out + captured.err


def _never_localized_beside_match(result: dict, text: str) -> None:
    if result.get("status") == "match":
        assert result["localized"] is None and "localized:" not in text


@pytest.mark.parametrize("fmt", ["kit", "safetensors", "npz", "stats"])
@pytest.mark.parametrize("fault", ["clean", "eps_after_sqrt", "silu_half_exp"])
def test_a_float32_dump_is_judged_at_float32_in_every_format(fmt, fault, tiny_dir, tmp_path, monkeypatch, capsys):
    dump = _write(fmt, _taps(tiny_dir, monkeypatch, fault), tmp_path / f"{fmt}_{fault}{SUFFIX[fmt]}")
    rc, result, text = _compare(dump, tmp_path, capsys)
    basis = result["tolerance_basis"]
    assert basis["dtype"] == "float32" and basis["reference_dtype"] == "float32"
    assert result["model"]["spec"] == "synthetic:tiny" and result["dtype"] == "float32"  # the reference ran in fp32
    assert f"tolerance: float32 ({basis['reason']})" in text
    assert ("declares dtype float32" if fmt in ("kit", "stats") else "tensors are float32") in basis["reason"]
    _never_localized_beside_match(result, text)
    if fault == "clean":
        assert rc == 0 and result["status"] == "match"
        return
    assert rc == 1 and result["first_divergence"]["tap"] == FAULT_STAGE[fault]
    assert result["localized"]["stage"] == FAULT_STAGE[fault]


@pytest.mark.parametrize("fmt", ["npz", "safetensors", "kit"])
def test_a_float16_dump_is_recognised_as_float16(fmt, tiny_dir, tmp_path, monkeypatch, capsys):
    dump = _write(fmt, _taps(tiny_dir, monkeypatch, "clean"), tmp_path / f"h{SUFFIX[fmt]}", dtype="float16")
    rc, result, text = _compare(dump, tmp_path, capsys)
    assert rc == 0, text
    assert result["tolerance_basis"]["dtype"] == "float16" and result["dtype"] == "float16"
    assert "tolerance: float16" in text and result["candidate"]["dtype"] == "float16" and "(?)" not in text
    # the same fp16 storage of a faulty engine still diverges where the fault is
    dump = _write(fmt, _taps(tiny_dir, monkeypatch, "eps_after_sqrt"), tmp_path / f"e{SUFFIX[fmt]}", dtype="float16")
    rc, result, _ = _compare(dump, tmp_path, capsys)
    assert rc == 1 and result["first_divergence"]["tap"] == "layers.0.attn_norm"


@pytest.mark.parametrize("declared,stored", [(None, "bfloat16"), ("bfloat16", "float32")])
def test_bfloat16_from_storage_or_metadata(declared, stored, tiny_dir, tmp_path, monkeypatch, capsys):
    """bf16 read off a safetensors header (no metadata) or declared over float32 storage: the reference
    computes in bfloat16 and a correct engine matches at bf16's tolerance."""
    kit = numpy_engine._kit_module()
    d = kit.TapDump(tokens=SEED_IDS, position=0, dtype=declared)
    for n, x in _taps(tiny_dir, monkeypatch, "clean").items():
        d.add(n, x.astype(np.float32), store_as=stored)
    d.write(tmp_path / "kit_b.safetensors")
    rc, result, text = _compare(tmp_path / "kit_b.safetensors", tmp_path, capsys)
    basis = result["tolerance_basis"]
    assert rc == 0, text
    assert basis["dtype"] == "bfloat16" and result["dtype"] == "bfloat16"
    assert basis["source"] == ("declared" if declared else "storage")


def test_a_float64_npz_is_judged_at_float32_against_a_float32_reference(tiny_dir, tmp_path, monkeypatch, capsys):
    """NumPy engines often keep float64: the reference cannot compute finer than float32, whose class decides."""
    dump = _write("npz", _taps(tiny_dir, monkeypatch, "clean"), tmp_path / "c.npz", dtype="float64")
    rc, result, text = _compare(dump, tmp_path, capsys)
    assert rc == 0, text
    assert result["tolerance_basis"]["reference_dtype"] == "float32" and result["dtype"] == "float32"
    dump = _write("npz", _taps(tiny_dir, monkeypatch, "silu_half_exp"), tmp_path / "e.npz", dtype="float64")
    rc, result, _ = _compare(dump, tmp_path, capsys)
    assert rc == 1 and result["first_divergence"]["tap"] == "layers.0.mlp.act"


def test_mixed_dtypes_are_judged_per_tensor_from_the_coarsest_upstream(tiny_dir, tmp_path, monkeypatch, capsys):
    """float32 layers then a float16 layer 1: the eps fault of layer 0 is still judged at fp32; the clean
    run's float16 layer 1 (and the float32 logits after it) at fp16, so it matches."""
    from safetensors.numpy import save_file

    def mixed(taps):
        return {n: np.ascontiguousarray(x.astype("float16" if n.startswith("layers.1.") else "float32"))
                for n, x in taps.items()}

    save_file(mixed(_taps(tiny_dir, monkeypatch, "clean")), str(tmp_path / "clean.safetensors"))
    rc, result, text = _compare(tmp_path / "clean.safetensors", tmp_path, capsys)
    basis = result["tolerance_basis"]
    assert rc == 0, text
    assert basis["dtype"] == "float16" and basis["reference_dtype"] == "float32"
    assert basis["per_tap"]["layers.0.out"] == "float32" and "logits" not in basis["per_tap"]  # logits: fp16
    assert "float16 from layers.1." in basis["reason"]
    save_file(mixed(_taps(tiny_dir, monkeypatch, "eps_after_sqrt")), str(tmp_path / "bad.safetensors"))
    rc, result, _ = _compare(tmp_path / "bad.safetensors", tmp_path, capsys)
    assert rc == 1 and result["first_divergence"]["tap"] == "layers.0.attn_norm"


def test_a_coarser_reference_says_so_and_localization_agrees_with_the_verdict(tiny_dir, tmp_path, monkeypatch, capsys):
    """--dtype float16 against a float32 dump: the user asked for fp16 tolerances; the header says the
    reference is coarser, and the replay judges on the same basis (before: match beside `localized: ...
    1926x its tolerance` on TinyLlama's eps fault)."""
    dump = _write("kit", _taps(tiny_dir, monkeypatch, "silu_half_exp"), tmp_path / "kit_e.safetensors")
    rc, result, text = _compare(dump, tmp_path, capsys, "--dtype", "float16")
    assert result["tolerance_basis"]["dtype"] == "float16" and "coarser" in result["tolerance_basis"]["reason"]
    assert rc == 0 and result["status"] == "match"  # within fp16's tolerance: what --dtype float16 asks
    _never_localized_beside_match(result, text)
    assert all(s["local_ratio"] is None or s["local_ratio"] <= 1 for s in result["stages"])


def test_a_dump_against_a_stored_reference_with_the_model_needs_no_dtype(tiny_dir, tmp_path, monkeypatch, capsys):
    """--against DUMP --ref REF --model M (the model's weights for the replay) without --dtype: it loaded
    the model with dtype None."""
    ref = str(Path(__file__).resolve().parents[1] / "refs" / "synthetic-tiny-fp32.json")
    dump = _write("kit", _taps(tiny_dir, monkeypatch, "eps_after_sqrt"), tmp_path / "kit_e.safetensors")
    out = tmp_path / "r.json"
    assert cli(["compare", "--against", str(dump), "--ref", ref, *MODEL, "--json", str(out)]) == 1
    result = json.loads(out.read_text())
    assert result["first_divergence"]["tap"] == "layers.0.attn_norm" and result["tolerance_basis"]["dtype"] == "float32"
    assert result["localized"]["stage"] == "layers.0.attn_norm"
    dump = _write("kit", _taps(tiny_dir, monkeypatch, "clean"), tmp_path / "kit_c.safetensors")
    assert cli(["compare", "--against", str(dump), "--ref", ref, *MODEL, "--json", str(out)]) == 0


def test_a_dump_without_a_dtype_is_judged_as_float32_and_says_so(tiny_dir, tmp_path, monkeypatch, capsys):
    taps = _taps(tiny_dir, monkeypatch, "clean")
    path = tmp_path / "nodtype.json"
    path.write_text(json.dumps({"prompt": {"ids": SEED_IDS},
                                "taps": {n: {"values": x.astype(np.float32).tolist()} for n, x in taps.items()}}))
    rc, result, text = _compare(path, tmp_path, capsys)
    assert rc == 0 and result["tolerance_basis"]["source"] == "default"
    assert "does not say its dtype" in text and "--against-dtype" in text
    path.write_text(json.dumps({"dtype": "float12", "taps": {}}))
    rc, _, text = _compare(path, tmp_path, capsys)
    assert rc == 2 and "float12" in text


# ---------------------------------------------------------------------------
# Masks: equal by effect


def _with_mask(taps: dict, value: float) -> dict:
    out = dict(taps)
    for n in [n for n in taps if n.endswith("attn.scores_masked")]:
        x = taps[n].copy()
        T = x.shape[-1]
        x[:, np.triu(np.ones((T, T), bool), 1)] = value
        out[n] = x
    return out


@pytest.mark.parametrize("fmt,dtype", [("npz", "float16"), ("kit", "float32")])
@pytest.mark.parametrize("value", [-1e4, -65504.0, -np.inf])
def test_any_mask_value_that_gives_zero_weight_is_masked(fmt, dtype, value, tiny_dir, tmp_path, monkeypatch, capsys):
    dump = _write(fmt, _with_mask(_taps(tiny_dir, monkeypatch, "clean"), value), tmp_path / f"m{SUFFIX[fmt]}", dtype)
    rc, result, text = _compare(dump, tmp_path, capsys)
    assert rc == 0, text
    masks = [e for e in result["entries"] if e["metric"] == "mask_mismatch"]
    assert len(masks) == 2 and all(e["value"] == 0 for e in masks)


@pytest.mark.parametrize("value", [-1.0, 0.0])
def test_a_mask_value_that_keeps_weight_fails_at_scores_masked(value, tiny_dir, tmp_path, monkeypatch, capsys):
    dump = _write("npz", _with_mask(_taps(tiny_dir, monkeypatch, "clean"), value), tmp_path / "m.npz", "float16")
    rc, result, _ = _compare(dump, tmp_path, capsys)
    first = result["first_divergence"]
    assert rc == 1 and first["tap"] == "layers.0.attn.scores_masked" and first["error"]["metric"] == "mask_mismatch"
    T = len(SEED_IDS)
    n_heads = numpy_engine.Engine(tiny_dir).H
    # the positions above the diagonal whose weight exp(value - row max) is at least fp16's unit roundoff
    assert T * (T - 1) // 2 < first["error"]["value"] <= n_heads * T * (T - 1) // 2


def test_a_mask_mismatch_override_is_honoured(tiny_dir, tmp_path, monkeypatch, capsys):
    dump = _write("npz", _with_mask(_taps(tiny_dir, monkeypatch, "clean"), -1.0), tmp_path / "m.npz", "float16")
    rc, result, _ = _compare(dump, tmp_path, capsys, "--tol", "layers.0.attn.scores_masked:mask_mismatch=100000")
    assert rc == 1 and result["first_divergence"]["tap"] == "layers.1.attn.scores_masked"  # layer 0's allowed
    e = next(e for e in result["entries"] if e["tap"] == "layers.0.attn.scores_masked" and e["metric"] == "mask_mismatch")
    assert e["tolerance"] == 100000 and e["ok"] and e["value"] > 0
    rc, result, _ = _compare(dump, tmp_path, capsys, "--tol", "mask_mismatch=100000")
    # Every compared stage passes (masked positions are left out of the nmse either way), but this dump's
    # probs are not the softmax of its own masked scores (-1 masks nothing): the replay says so, and the
    # verdict does not say `match` over it.
    assert result["first_divergence"] is None
    assert all(e["ok"] for e in result["entries"] if e["metric"] == "mask_mismatch")
    assert rc == 1 and result["localized"]["stage"] == "layers.0.attn.probs"


# ---------------------------------------------------------------------------
# Last-row-only tensors


@pytest.mark.parametrize("fmt", ["npz", "safetensors", "stats"])
@pytest.mark.parametrize("tap,shape", [("logits", (1, 1, -1)), ("logits", (1, -1)), ("final_norm", (1, -1))])
def test_last_row_only_tensors_are_compared_on_the_last_row(fmt, tap, shape, tiny_dir, tmp_path, monkeypatch, capsys):
    taps = _taps(tiny_dir, monkeypatch, "clean")
    taps[tap] = taps[tap][-1].reshape(shape)
    rc, result, text = _compare(_write(fmt, taps, tmp_path / f"l{SUFFIX[fmt]}"), tmp_path, capsys)
    assert rc == 0, text
    assert result["partial_rows"] == {tap: "last row only"} and f"{tap}: last row only" in text
    entry = next(e for e in result["entries"] if e["tap"] == tap and e["metric"] == "nmse")
    assert entry["index"] == "last" and entry["details"]["compared"] == taps[tap].size
    wrong = dict(taps)
    wrong[tap] = taps[tap] * 1.01  # a wrong last row
    rc, result, _ = _compare(_write(fmt, wrong, tmp_path / f"w{SUFFIX[fmt]}"), tmp_path, capsys)
    assert rc == 1 and result["first_divergence"]["tap"] == tap and result["first_divergence"]["error"]["index"] == "last"


# ---------------------------------------------------------------------------
# Token counts and decode steps: bad input, exit 2


@pytest.mark.parametrize("fmt", ["npz", "safetensors", "stats"])
def test_a_dump_of_another_token_count_is_exit_2_naming_both_counts(fmt, tiny_dir, tmp_path, monkeypatch, capsys):
    ids = SEED_IDS + [29871]
    dump = _write(fmt, _taps(tiny_dir, monkeypatch, "clean", ids), tmp_path / f"t{SUFFIX[fmt]}", ids=ids)
    if fmt == "stats":  # a stats JSON that records no ids
        data = json.loads(dump.read_text())
        del data["prompt"]
        dump.write_text(json.dumps(data))
    rc = cli(["compare", "--against", str(dump), *MODEL])  # --token-ids forgotten: the seed prompt's 38 ids
    err = capsys.readouterr().err
    assert rc == 2 and f"holds {len(ids)} token rows" in err and f"{P0} tokens" in err and "--token-ids" in err
    assert len(err.strip().splitlines()) == 1
    assert cli(["compare", "--against", str(dump), *MODEL, "--token-ids", ",".join(map(str, ids))]) == 0


@pytest.mark.parametrize("fmt", ["kit", "stats"])
def test_recorded_ids_of_another_count_are_exit_2(fmt, tiny_dir, tmp_path, monkeypatch, capsys):
    ids = SEED_IDS + [29871]
    dump = _write(fmt, _taps(tiny_dir, monkeypatch, "clean", ids), tmp_path / f"kit_t{SUFFIX[fmt]}", ids=ids)
    rc = cli(["compare", "--against", str(dump), *MODEL, "--token-ids", IDS])
    err = capsys.readouterr().err
    assert rc == 2 and "39" in err and "38" in err


def test_a_llamacpp_log_of_other_ids_is_exit_2(tmp_path, capsys):
    import lzma

    log = tmp_path / "clean.log"
    log.write_bytes(lzma.decompress((Path(__file__).parent / "fixtures" / "llamacpp" /
                                     "clean_fp32_short.log.xz").read_bytes()))
    rc = cli(["compare", "--against", str(log), "--model", "synthetic:small", "--token-ids", "1,2,3"])
    err = capsys.readouterr().err
    assert rc == 2 and "different token ids" in err and len(err.strip().splitlines()) == 1


def _steps(tiny_dir, out: Path, faults=(), edit=None) -> list[int]:
    out.mkdir()
    engine = Engine(tiny_dir, faults)
    taps, ids = engine.prefill(SEED_IDS), list(SEED_IDS)
    for k in range(2):
        ids.append(int(np.argmax(taps["logits"][-1])))
        taps = engine.step(ids[-1])
        if edit and k == 1:
            edit(engine.taps)
        engine.dump(out / f"step{k}.safetensors", ids, position=len(ids) - 1)
    return ids


def test_a_decode_step_given_to_against_is_exit_2(tiny_dir, tmp_path, capsys):
    from safetensors.numpy import save_file

    _steps(tiny_dir, tmp_path / "s")
    rc = cli(["compare", "--against", str(tmp_path / "s" / "step0.safetensors"), *MODEL])
    err = capsys.readouterr().err
    assert rc == 2 and "is a decode step (position 38" in err and "use --against-steps" in err
    save_file({"layers.0.out@40": np.zeros((1, 64), np.float32)}, str(tmp_path / "named.safetensors"))
    assert cli(["compare", "--against", str(tmp_path / "named.safetensors"), *MODEL]) == 2
    assert "use --against-steps" in capsys.readouterr().err


def test_steps_without_dtype_follow_their_metadata(tiny_dir, tmp_path, monkeypatch, capsys):
    """The docs' own command (`--against-steps DIR --model M`, no --dtype) ran into `unknown dtype None`."""
    _steps(tiny_dir, tmp_path / "clean")
    out = tmp_path / "s.json"
    assert cli(["compare", "--against-steps", str(tmp_path / "clean"), *MODEL, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["dtype"] == "float32" and result["reference"]["dtype"] == "float32"
    assert result["tolerance_basis"]["reason"] == "the step dumps declares dtype float32"
    assert "tolerance: float32" in capsys.readouterr().out
    with monkeypatch.context() as m:  # the eps fault, within fp16 tolerance, is found in an fp32 decode
        m.setattr(numpy_engine, "_rms", _rms_eps_after_sqrt)
        _steps(tiny_dir, tmp_path / "eps")
    assert cli(["compare", "--against-steps", str(tmp_path / "eps"), *MODEL, "--json", str(out)]) == 1
    result = json.loads(out.read_text())
    assert (result["first_divergence"]["position"], result["first_divergence"]["tap"]) == (P0, "layers.0.attn_norm")


def test_steps_judge_a_subtle_fault_at_their_precision_and_localize_only_beside_a_divergence(tiny_dir, tmp_path,
                                                                                             monkeypatch, capsys):
    """The fp16-exp SiLU in float32 step dumps: found at mlp.act without --dtype; with --dtype float16 (the
    user asks for fp16 tolerances) the steps match, and no step is `localized` beside that match."""
    with monkeypatch.context() as m:
        m.setattr(numpy_engine, "_silu", _silu_half_exp)
        _steps(tiny_dir, tmp_path / "silu")
    out = tmp_path / "s.json"
    assert cli(["compare", "--against-steps", str(tmp_path / "silu"), *MODEL, "--json", str(out)]) == 1
    result = json.loads(out.read_text())
    assert (result["first_divergence"]["position"], result["first_divergence"]["tap"]) == (P0, "layers.0.mlp.act")
    assert result["localized"]["stage"] == "layers.0.mlp.act"
    assert cli(["compare", "--against-steps", str(tmp_path / "silu"), *MODEL, "--dtype", "float16",
                "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["status"] == "match" and result["localized"] is None
    assert all("localized" not in s for s in result["steps"]) and "coarser" in result["tolerance_basis"]["reason"]
    capsys.readouterr()


def test_steps_with_other_token_ids_are_exit_2(tiny_dir, tmp_path, capsys):
    ids = _steps(tiny_dir, tmp_path / "s")
    other = list(ids)
    other[3] += 1
    rc = cli(["compare", "--against-steps", str(tmp_path / "s"), *MODEL, "--token-ids", ",".join(map(str, other))])
    err = capsys.readouterr().err
    assert rc == 2 and "differ from the ids the step dumps record" in err and "position 3" in err


@pytest.mark.parametrize("extra,words", [(1, "one too many: attention reads past the current position"),
                                         (-1, "one too few: the KV cache does not hold every past position")])
def test_key_count_notes_say_which_way(extra, words, tiny_dir, tmp_path, capsys):
    def edit(taps):
        for n in [n for n in taps if n.endswith(("attn.scores", "attn.scores_scaled", "attn.scores_masked",
                                                  "attn.probs"))]:
            x = taps[n]
            taps[n] = np.concatenate([x, x[..., -1:]], axis=-1) if extra > 0 else x[..., :-1]

    _steps(tiny_dir, tmp_path / "s", edit=edit)
    out = tmp_path / "s.json"
    assert cli(["compare", "--against-steps", str(tmp_path / "s"), *MODEL, "--json", str(out)]) == 1
    first = json.loads(out.read_text())["first_divergence"]
    assert (first["position"], first["tap"]) == (P0 + 1, "layers.0.attn.scores"), first
    assert words in first["note"], first["note"]
    assert ("too few" in first["note"]) == (extra < 0)

"""`gguf-check`: a GGUF against the HF checkpoint it came from (gguf_check.py). Clean files of every
type the project writes are exit 0; each conversion fault is exit 1 and named: Q/K written without
the permutation (and permuted twice), one tensor perturbed, a tensor missing, a metadata value wrong,
the LM head tied in one file and not in the other; bad input is exit 2 in one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mlx_tinyllama import gguf_write, trace
from mlx_tinyllama.gguf_check import check_gguf, rounding_bound
from mlx_tinyllama.gguf_write import convert


def run(tmp_path, gguf, hf, *more) -> tuple[int, dict | None]:
    out = tmp_path / "check.json"
    out.unlink(missing_ok=True)
    rc = trace.main(["gguf-check", "--gguf", str(gguf), "--hf", str(hf), "--json", str(out), *more])
    return rc, (json.loads(out.read_text()) if out.exists() else None)


def hf_copy(src, dst, config=None, weights=None):
    """A copy of an HF directory with config keys replaced and weights edited (name -> fn(array))."""
    shutil.copytree(src, dst)
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    if weights is not None:
        tensors = load_file(str(dst / "model.safetensors"))
        tensors = weights(tensors)
        save_file(tensors, str(dst / "model.safetensors"))
    return dst


def without(monkeypatch, *hf_names):
    """gguf_write writes every tensor but these (a converter that dropped them)."""
    real = gguf_write._gguf_names
    monkeypatch.setattr(gguf_write, "_gguf_names",
                        lambda config: {h: g for h, g in real(config).items() if h not in hf_names})


@pytest.mark.parametrize("preset", ["tiny", "small"])
@pytest.mark.parametrize("out_type", ["f32", "f16", "q8_0", "q4_0", "q4_1", "q5_0"])
def test_clean_files_are_equal(preset, out_type, tiny_dir, small_dir, tmp_path, capsys):
    hf = {"tiny": tiny_dir, "small": small_dir}[preset]
    gguf = convert(hf, tmp_path / "m.gguf", out_type) and tmp_path / "m.gguf"
    rc, result = run(tmp_path, gguf, hf)
    assert rc == 0, result["mismatches"]
    assert result["command"] == "gguf-check" and result["status"] == "equal" and not result["not_checked"]
    n_layers = {"tiny": 2, "small": 4}[preset]
    assert result["counts"]["tensors"] == result["counts"]["tensors_equal"] == 9 * n_layers + 3
    assert all(t["layout"] == "permuted" for t in result["tensors"] if "attn_q" in t["gguf"] or "attn_k" in t["gguf"])
    assert {m["what"] for m in result["metadata"] if m["status"] == "equal"} >= {
        "layers", "heads", "kv heads", "rope theta", "RMSNorm eps", "vocab (tokenizer tokens)", "context", "BOS id",
        "EOS id", "add_bos_token"}
    assert "equal: every checked tensor" in capsys.readouterr().out


def test_f16_rounding_bound_is_used_on_weights_that_are_not_f16_values(small_dir, tmp_path):
    # synthetic weights are f16 values (written exactly); f32 weights must round within half an ulp
    rng = np.random.default_rng(0)
    hf = hf_copy(small_dir, tmp_path / "hf32", weights=lambda t: {
        k: (v.astype(np.float32) * (1 + 1e-3 * rng.standard_normal(v.shape).astype(np.float32))) for k, v in t.items()})
    convert(hf, tmp_path / "m.gguf", "f16")
    rc, result = run(tmp_path, tmp_path / "m.gguf", hf)
    assert rc == 0
    worst = max(t["worst_ratio"] for t in result["tensors"] if t["type"] == "F16")
    assert 0.5 < worst <= 1.0  # the bound is reached (round to nearest), never passed
    x = np.array([[1.0, 1e-6, 65504.0]])
    # u|x| (at least half an ulp of x), and half the subnormal step below 2^-14
    assert np.allclose(rounding_bound(x, "F16"), [[2 ** -11, 2 ** -25, 65504 * 2 ** -11]])


@pytest.mark.parametrize("permute, words", [("none", "without the Q/K permutation"), ("twice", "permuted twice")])
def test_qk_layout_faults_are_named(permute, words, small_dir, tmp_path, capsys):
    convert(small_dir, tmp_path / "m.gguf", "q8_0", permute=permute)
    rc, result = run(tmp_path, tmp_path / "m.gguf", small_dir)
    assert rc == 1 and result["status"] == "differs"
    qk = [t for t in result["tensors"] if "attn_q" in t["gguf"] or "attn_k" in t["gguf"]]
    assert len(qk) == 8 and {t["layout"] for t in qk} == {"not_permuted" if permute == "none" else "permuted_twice"}
    assert words in result["mismatches"][0] and "blk.0.attn_q.weight" in result["mismatches"][0]
    assert result["counts"]["tensors_equal"] == result["counts"]["tensors"] - 8  # nothing else blamed
    assert words in capsys.readouterr().out


def test_k_permuted_with_the_query_head_count_is_named(small_dir, tmp_path, monkeypatch):
    # a converter that permutes K with head_count instead of head_count_kv (GQA models)
    from mlx_tinyllama.gguf import permute_qk

    real = gguf_write.permute_qk
    monkeypatch.setattr(gguf_write, "permute_qk", lambda w, heads: real(w, 8) if w.shape[0] == 64 else real(w, heads))
    convert(small_dir, tmp_path / "m.gguf", "f16")
    rc, result = run(tmp_path, tmp_path / "m.gguf", small_dir)
    assert rc == 1 and permute_qk is real
    assert all("query head count" in line and "attn_k" in line for line in result["mismatches"])
    assert len(result["mismatches"]) == 4


def test_a_perturbed_tensor_is_named_with_where(small_dir, tmp_path):
    def perturb(t):
        w = t["model.layers.2.mlp.down_proj.weight"].astype(np.float32)
        w[5, 7] += 0.05
        return dict(t, **{"model.layers.2.mlp.down_proj.weight": w.astype(np.float16)})

    bad = hf_copy(small_dir, tmp_path / "bad", weights=perturb)
    convert(bad, tmp_path / "m.gguf", "f16")
    rc, result = run(tmp_path, tmp_path / "m.gguf", small_dir)
    assert rc == 1 and len(result["mismatches"]) == 1
    line = result["mismatches"][0]
    assert "blk.2.ffn_down.weight" in line and "1 of" in line and "[5, 7]" in line
    # a q8_0 file of the same perturbed weights: the block bound still sees it
    convert(bad, tmp_path / "q.gguf", "q8_0")
    rc, result = run(tmp_path, tmp_path / "q.gguf", small_dir)
    assert rc == 1 and "blk.2.ffn_down.weight" in result["mismatches"][0]


def test_a_missing_tensor_is_named(small_dir, tmp_path, monkeypatch):
    without(monkeypatch, "model.layers.1.mlp.up_proj.weight")
    convert(small_dir, tmp_path / "m.gguf", "f16")
    rc, result = run(tmp_path, tmp_path / "m.gguf", small_dir)
    assert rc == 1 and result["mismatches"] == ["tensor model.layers.1.mlp.up_proj.weight: missing from the GGUF"]


@pytest.mark.parametrize("key, value, what", [("rope_theta", 500000.0, "rope theta"),
                                              ("rms_norm_eps", 1e-6, "RMSNorm eps"),
                                              ("num_key_value_heads", 8, "kv heads")])
def test_a_wrong_metadata_value_is_named(key, value, what, small_dir, tmp_path):
    wrong = hf_copy(small_dir, tmp_path / "wrong", config={key: value})
    if key == "num_key_value_heads":  # K/V weights must fit the head count for the converter to run
        wrong = None
    if wrong is not None:
        convert(wrong, tmp_path / "m.gguf", "f16")
        rc, result = run(tmp_path, tmp_path / "m.gguf", small_dir)
    else:  # the reverse direction: a right GGUF against a checkpoint whose config says otherwise
        convert(small_dir, tmp_path / "m.gguf", "f16")
        rc, result = run(tmp_path, tmp_path / "m.gguf", hf_copy(small_dir, tmp_path / "cfg", config={key: value}))
    assert rc == 1
    assert any(line.startswith(f"metadata {what}:") for line in result["mismatches"]), result["mismatches"]
    row = next(m for m in result["metadata"] if m["what"] == what)
    assert row["status"] == "differs"


def test_tied_and_untied_lm_head(small_dir, tmp_path, monkeypatch):
    # the HF checkpoint has its own lm_head; a GGUF without output.weight ties it to token_embd
    without(monkeypatch, "lm_head.weight")
    convert(small_dir, tmp_path / "tied.gguf", "f16")
    rc, result = run(tmp_path, tmp_path / "tied.gguf", small_dir)
    assert rc == 1 and result["tied"]["status"] == "differs"
    assert "tied weights" in result["mismatches"][0] and "output.weight" in result["mismatches"][0]
    monkeypatch.undo()
    # a tied checkpoint: its own GGUF (no output.weight) is equal; an untied GGUF's lm_head is not its embedding
    tied_hf = hf_copy(small_dir, tmp_path / "tied_hf", config={"tie_word_embeddings": True},
                      weights=lambda t: {k: v for k, v in t.items() if k != "lm_head.weight"})
    convert(tied_hf, tmp_path / "own.gguf", "f16")
    rc, result = run(tmp_path, tmp_path / "own.gguf", tied_hf)
    assert rc == 0 and result["tied"]["gguf_output_weight"] is False
    convert(small_dir, tmp_path / "untied.gguf", "f16")
    rc, result = run(tmp_path, tmp_path / "untied.gguf", tied_hf)
    assert rc == 1 and "output.weight (model.embed_tokens.weight)" in result["mismatches"][0]


def test_bad_input_is_one_line_and_exit_2(small_dir, tmp_path, capsys):
    convert(small_dir, tmp_path / "m.gguf", "f16")
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"not a gguf file at all")
    for args in (["--gguf", str(tmp_path / "none.gguf"), "--hf", str(small_dir)],
                 ["--gguf", str(tmp_path / "m.gguf"), "--hf", str(tmp_path)],
                 ["--gguf", str(not_gguf), "--hf", str(small_dir)],
                 ["--gguf", str(tmp_path / "m.gguf"), "--hf", str(small_dir), "--json", str(tmp_path / "m.gguf")]):
        rc = trace.main(["gguf-check", *args])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error:") and err.count("\n") == 1, (args, err)
    assert (tmp_path / "m.gguf").read_bytes()[:4] == b"GGUF"  # --json never overwrote its input


def test_library_result_lists_what_was_not_checked(small_dir, tmp_path):
    # a checkpoint whose tokenizer_config.json lacks add_bos_token: not checked, said, not passed
    hf = hf_copy(small_dir, tmp_path / "hf")
    cfg = json.loads((hf / "tokenizer_config.json").read_text())
    cfg.pop("add_bos_token", None)
    (hf / "tokenizer_config.json").write_text(json.dumps(cfg))
    convert(hf, tmp_path / "m.gguf", "f16")
    report = check_gguf(tmp_path / "m.gguf", hf)
    assert report.status == "equal"
    assert any("add_bos_token" in line for line in report.not_checked)

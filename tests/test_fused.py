"""Fused projections in a candidate's dump (refs/fused.py): a tensor holding q|k|v or gate|up side
by side, named by a --map list entry or the kit's `fused` metadata, is split by the config's widths
and judged as the taps it holds. Both ways: a clean fused dump matches with full coverage (and
--suggest-map finds the map by value); a fault in one block is found at that block's tap with its
pattern, not at its neighbours; widths that do not add up and malformed entries are exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import SEED_IDS
from mlx_tinyllama import sources
from mlx_tinyllama.compare import run_side
from mlx_tinyllama.taps import tap_names
from mlx_tinyllama.trace import main as cli
from numpy_engine import Engine

N = len(tap_names(2))  # synthetic:tiny's taps
TINY = ["--model", "synthetic:tiny", "--dtype", "float32"]
FUSED = ("attn.q", "attn.k", "attn.v", "mlp.gate", "mlp.up")


def _tokens_major(x: np.ndarray) -> np.ndarray:
    """[heads, T, D] -> [T, heads*D] (a projection's output as the matmul writes it)."""
    return x.transpose(1, 0, 2).reshape(x.shape[1], -1) if x.ndim == 3 else x


def megatron_qkv(q, k, v, kv: int) -> np.ndarray:
    """[T, H*D], [T, KV*D], [T, KV*D] -> Megatron-LM's linear_qkv output [T, KV * (H/KV + 2) * D]:
    per KV group g, its H/KV query heads, then k_g, then v_g (written here from that definition)."""
    T = q.shape[0]
    d = k.shape[1] // kv
    rep = q.shape[1] // d // kv
    groups = [np.concatenate([q.reshape(T, kv, rep * d)[:, g], k.reshape(T, kv, d)[:, g], v.reshape(T, kv, d)[:, g]],
                             axis=-1) for g in range(kv)]
    return np.concatenate(groups, axis=-1)


def fuse(taps: dict, n_layers: int, qkv: str = "concat", gate_up: str = "concat", kv: int | None = None,
         batch: bool = False) -> tuple[dict, dict]:
    """An engine's dump with q/k/v and gate/up each written as one fused tensor, and its --map."""
    out = {t: x for t, x in taps.items() if not any(t.endswith("." + s) for s in FUSED)}
    mapping = {}
    for i in range(n_layers):
        p = f"layers.{i}."
        q, k, v = (_tokens_major(taps[p + s]) for s in ("attn.q", "attn.k", "attn.v"))
        g, u = taps[p + "mlp.gate"], taps[p + "mlp.up"]
        out[f"model.layers.{i}.qkv"] = megatron_qkv(q, k, v, kv) if qkv == "grouped" else np.concatenate([q, k, v], -1)
        if gate_up == "interleaved":
            gu = np.empty((g.shape[0], 2 * g.shape[1]), g.dtype)
            gu[:, 0::2], gu[:, 1::2] = g, u
        else:
            gu = np.concatenate([g, u], -1)
        out[f"model.layers.{i}.gate_up"] = gu
        mapping[f"model.layers.{i}.qkv"] = [p + "attn.q", p + "attn.k", p + "attn.v"]
        mapping[f"model.layers.{i}.gate_up"] = [p + "mlp.gate", p + "mlp.up"]
        if qkv != "concat":
            mapping[f"model.layers.{i}.qkv"] = {"taps": mapping[f"model.layers.{i}.qkv"], "layout": qkv}
        if gate_up != "concat":
            mapping[f"model.layers.{i}.gate_up"] = {"taps": mapping[f"model.layers.{i}.gate_up"], "layout": gate_up}
    if batch:
        out = {k: x[None] for k, x in out.items()}
    return out, mapping


def write(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(path),
              metadata=dict({"tokens": json.dumps(SEED_IDS)}, **(metadata or {})))
    return path


def write_map(path: Path, mapping: dict) -> Path:
    path.write_text(json.dumps(mapping))
    return path


def run(tmp_path, capsys, *args) -> tuple[int, dict | None, str, str]:
    out = tmp_path / "v.json"
    out.unlink(missing_ok=True)
    rc = cli(["compare", *map(str, args), "--json", str(out)])
    cap = capsys.readouterr()
    return rc, (json.loads(out.read_text()) if out.exists() else None), cap.out, cap.err


@pytest.fixture(scope="module")
def ours():
    """This package's own run of synthetic:tiny: the taps a correct fused engine computes."""
    lm = sources.load("synthetic:tiny", "float32")
    return {t: np.asarray(x, np.float32) for t, x in run_side(lm, SEED_IDS).tensors.items()}, lm.config.as_dict()


def engine_taps(tiny_dir, faults=()) -> dict:
    engine = Engine(tiny_dir, faults)
    engine.prefill(SEED_IDS)
    return {k: v.astype(np.float32) for k, v in engine.dumped().items()}


# ---------------------------------------------------------------------------
# Clean: match with full coverage, the parts named in the entries; --suggest-map finds the map


def test_own_run_saved_fused_matches_with_full_coverage(ours, tmp_path, capsys):
    taps, cfg = ours
    tensors, mapping = fuse(taps, 2)
    dump = write(tmp_path / "fused.safetensors", tensors)
    rc, result, out, err = run(tmp_path, capsys, "--against", dump, *TINY, "--map",
                               write_map(tmp_path / "m.json", mapping))
    assert rc == 0 and err == "" and result["verdict"]["line"] == f"match: {N}/{N} stages"
    compared = set(result["coverage"]["compared"])
    assert len(compared) == N and {f"layers.{i}.{s}" for i in range(2) for s in FUSED} <= compared
    k = next(e for e in result["entries"] if e["tap"] == "layers.0.attn.k" and e["metric"] == "nmse")
    H, KV, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"] // cfg["num_attention_heads"]
    assert k["note"].startswith(f"columns {H * D}:{(H + KV) * D} of their model.layers.0.qkv [{len(SEED_IDS)}, "
                                f"{(H + 2 * KV) * D}]")
    assert {f["name"] for f in result["candidate"]["fused"]} == set(mapping)


def test_suggest_map_reproduces_the_fused_map(ours, tmp_path, capsys):
    taps, _ = ours
    tensors, mapping = fuse(taps, 2)
    dump = write(tmp_path / "fused.safetensors", tensors)
    out = tmp_path / "suggested.json"
    assert cli(["compare", "--against", str(dump), *TINY, "--suggest-map", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert json.loads(out.read_text()) == mapping
    line = next(ln for ln in printed if ln.startswith("model.layers.0.qkv -> "))
    assert line.startswith("model.layers.0.qkv -> layers.0.attn.q | layers.0.attn.k | layers.0.attn.v  match (")
    assert "4 of them fused" in printed[-1]
    rc, result, _, _ = run(tmp_path, capsys, "--against", dump, *TINY, "--map", out)
    assert rc == 0 and result["verdict"]["line"] == f"match: {N}/{N} stages"


@pytest.mark.parametrize("qkv,gate_up", [("grouped", "interleaved")])
def test_megatron_grouped_qkv_and_interleaved_gate_up(ours, qkv, gate_up, tmp_path, capsys):
    """The other packings, each a real engine's: q/k/v per KV group (Megatron-LM), gate/up columns
    alternating (GPT-OSS). Read as concat they diverge at attn.q / mlp.gate (so the layout is not
    a free pass); with their layout they match, and --suggest-map names the layout."""
    taps, cfg = ours
    tensors, mapping = fuse(taps, 2, qkv, gate_up, kv=cfg["num_key_value_heads"], batch=True)
    dump = write(tmp_path / "packed.safetensors", tensors)
    rc, result, _, _ = run(tmp_path, capsys, "--against", dump, *TINY, "--map", write_map(tmp_path / "m.json", mapping))
    assert rc == 0 and result["verdict"]["line"] == f"match: {N}/{N} stages"
    plain = {k: (v["taps"] if isinstance(v, dict) else v) for k, v in mapping.items()}
    rc, result, _, _ = run(tmp_path, capsys, "--against", dump, *TINY, "--map", write_map(tmp_path / "c.json", plain))
    assert rc == 1 and result["first_divergence"]["tap"] == "layers.0.attn.q"
    out = tmp_path / "suggested.json"
    assert cli(["compare", "--against", str(dump), *TINY, "--suggest-map", str(out)]) == 0
    capsys.readouterr()
    assert json.loads(out.read_text()) == mapping


def test_the_dumps_fused_metadata_names_them_and_a_map_entry_wins(ours, tmp_path, capsys):
    """kit's `fused` metadata: no --map needed; a --map entry for the same name replaces it."""
    taps, _ = ours
    tensors, mapping = fuse(taps, 2)
    dump = write(tmp_path / "meta.safetensors", tensors, {"fused": json.dumps(mapping)})
    rc, result, _, _ = run(tmp_path, capsys, "--against", dump, *TINY)
    assert rc == 0 and result["verdict"]["line"] == f"match: {N}/{N} stages"
    swapped = {"model.layers.0.gate_up": ["layers.0.mlp.up", "layers.0.mlp.gate"]}  # wrong on purpose
    rc, result, _, _ = run(tmp_path, capsys, "--against", dump, *TINY, "--map", write_map(tmp_path / "s.json", swapped))
    assert rc == 1 and result["first_divergence"]["tap"] == "layers.0.mlp.gate"


# ---------------------------------------------------------------------------
# Faults inside a fused matmul: found at the block's tap with the pattern


def test_a_wrong_kv_heads_columns_in_the_k_block_diverge_at_attn_k(ours, tiny_dir, tmp_path, capsys):
    """The fused qkv matmul writes KV head 1's k columns from KV head 0's rows: attn.k is the first
    stage over tolerance (q, the block before it, and v, the block after it, are within theirs),
    and the pattern names the KV head."""
    taps = engine_taps(tiny_dir, ["qkv_k_head_wrong:1"])
    tensors, mapping = fuse(taps, 2)
    dump = write(tmp_path / "k.safetensors", tensors)
    mapped = write_map(tmp_path / "m.json", mapping)
    rc, result, out, _ = run(tmp_path, capsys, "--against", dump, *TINY, "--map", mapped)
    assert rc == 1 and result["first_divergence"]["tap"] == "layers.0.attn.k"
    ok = {s["tap"]: s["ok"] for s in result["stages"]}
    assert ok["layers.0.attn.q"] and ok["layers.0.attn.v"] and not ok["layers.0.attn.k"]
    pattern = result["first_divergence"]["pattern"]
    assert pattern["name"] == "heads" and pattern["evidence"]["wrong_heads"] == [1], pattern
    assert pattern["evidence"]["holds_head"] == {"1": 0}  # KV head 1 holds head 0's values
    cfg = ours[1]
    H, KV, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"] // cfg["num_attention_heads"]
    assert (f"in their dump this is columns {H * D}:{(H + KV) * D} of their model.layers.0.qkv"
            in result["first_divergence"]["hint"])
    assert result["localized"]["stage"] == "layers.0.attn.k"  # its own arithmetic, from their attn_norm
    # --suggest-map tells the run by the blocks that match (q, v): a `likely` line, and the compare
    # with its map (the later layers' fused tensors, off everywhere, are left out) finds attn.k
    out = tmp_path / "suggested.json"
    assert cli(["compare", "--against", str(dump), *TINY, "--suggest-map", str(out)]) == 0
    printed = capsys.readouterr().out
    assert json.loads(out.read_text()) == {"model.layers.0.qkv": mapping["model.layers.0.qkv"]}
    assert "model.layers.0.qkv -> layers.0.attn.q | layers.0.attn.k | layers.0.attn.v  likely (" in printed
    assert "model.layers.1.qkv -> ?  none: fused: no run of taps" in printed
    rc, result, _, _ = run(tmp_path, capsys, "--against", dump, *TINY, "--map", out, "--ignore-unmapped")
    assert rc == 1 and result["first_divergence"]["tap"] == "layers.0.attn.k"
    clean, _ = fuse(engine_taps(tiny_dir), 2)  # the same engine without the fault: not flagged
    rc, result, _, _ = run(tmp_path, capsys, "--against", write(tmp_path / "c.safetensors", clean), *TINY,
                           "--map", tmp_path / "m.json")
    assert rc == 0 and result["verdict"]["line"] == f"match: {N}/{N} stages"


def test_a_tile_fault_in_the_fused_gate_up_matmul_is_the_row_pattern_at_mlp_gate(tiny_dir, tmp_path, capsys):
    """The fused gate_up matmul computes token rows 0..31 only: mlp.gate (the first block) is the
    first divergence, its pattern the rows from 32 on zero, and the verdict is not at attn.*."""
    taps = engine_taps(tiny_dir, ["gate_up_rows_zero:32"])
    tensors, mapping = fuse(taps, 2)
    dump = write(tmp_path / "gu.safetensors", tensors)
    mapped = write_map(tmp_path / "m.json", mapping)
    rc, result, out, _ = run(tmp_path, capsys, "--against", dump, *TINY, "--map", mapped)
    assert rc == 1 and result["first_divergence"]["tap"] == "layers.0.mlp.gate"
    hint = result["first_divergence"]["hint"]
    assert f"token rows 0-31 match, rows 32-{len(SEED_IDS) - 1} are zero" in hint, hint
    assert "in their dump this is columns 0:" in hint and "of their model.layers.0.gate_up" in hint
    assert not {s["tap"]: s["ok"] for s in result["stages"]}["layers.0.mlp.up"]  # its other block: the same rows


# ---------------------------------------------------------------------------
# Bad input: one line, exit 2


def test_widths_that_do_not_add_up_are_exit_2_naming_them(ours, tmp_path, capsys):
    taps, cfg = ours
    tensors, mapping = fuse(taps, 2)
    H, KV, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"] // cfg["num_attention_heads"]
    mapping["model.layers.0.qkv"] = ["layers.0.attn.q", "layers.0.attn.k"]  # v forgotten
    dump = write(tmp_path / "fused.safetensors", tensors)
    mapped = write_map(tmp_path / "m.json", mapping)
    rc, result, out, err = run(tmp_path, capsys, "--against", dump, *TINY, "--map", mapped)
    assert rc == 2 and result is None and len(err.strip().splitlines()) == 1
    assert f"holds {(H + 2 * KV) * D} values per token" in err
    assert f"attn.q {H * D} + attn.k {KV * D} = {(H + KV) * D}" in err


@pytest.mark.parametrize("entry,words", [
    (["layers.0.attn.q"], "two taps or more"),
    (["layers.0.attn.q", "layers.0.attn.q"], "names a tap twice"),
    (["layers.0.attn.q", "layers.0.attn.zz"], "not a canonical tap name"),
    (["layers.0.attn.scores", "layers.0.attn.probs"], "has a key axis"),
    ({"taps": ["layers.0.attn.q", "layers.0.attn.k", "layers.0.attn.v"], "layout": "zigzag"}, "not one of concat"),
    ({"taps": ["layers.0.mlp.gate", "layers.0.mlp.up"], "layout": "grouped"}, "grouped packs one layer's attn.q"),
    ({"taps": ["layers.0.attn.q"], "order": 1}, "a fused entry is"),
    (3, "must be a JSON object"),
])
def test_malformed_fused_entries_are_exit_2(entry, words, tmp_path, capsys):
    dump = write(tmp_path / "d.safetensors", {"x": np.zeros((2, 4), np.float32)})
    rc = cli(["compare", "--against", str(dump), *TINY, "--map", str(write_map(tmp_path / "m.json", {"x": entry}))])
    err = capsys.readouterr().err
    assert rc == 2 and words in err and len(err.strip().splitlines()) == 1, err


def test_a_tap_in_two_entries_and_fused_entries_where_nothing_splits_are_exit_2(tmp_path, capsys):
    dump = write(tmp_path / "d.safetensors", {"x": np.zeros((2, 4), np.float32)})
    both = {"x": ["layers.0.attn.q", "layers.0.attn.k"], "y": "layers.0.attn.k"}
    assert cli(["compare", "--against", str(dump), *TINY, "--map", str(write_map(tmp_path / "b.json", both))]) == 2
    assert "both map to layers.0.attn.k" in capsys.readouterr().err
    fused = write_map(tmp_path / "f.json", {"x": ["layers.0.attn.q", "layers.0.attn.k"]})
    stats = tmp_path / "s.json"
    stats.write_text(json.dumps({"taps": {}, "prompt": {"ids": SEED_IDS}}))
    assert cli(["compare", "--against", str(stats), *TINY, "--map", str(fused)]) == 2
    assert "only a .safetensors/.npz dump" in capsys.readouterr().err
    assert cli(["compare", "--against-steps", str(dump), *TINY, "--map", str(fused)]) == 2
    assert "not --against-steps" in capsys.readouterr().err
    twice = write(tmp_path / "tw.safetensors", {"x": np.zeros((2, 4), np.float32),
                                                "layers.0.attn.k": np.zeros((2, 2), np.float32)})
    assert cli(["compare", "--against", str(twice), *TINY, "--map", str(fused)]) == 2  # x holds k too: which one?
    err = capsys.readouterr().err
    assert "are both layers.0.attn.k" in err and "'x'" in err and "'layers.0.attn.k'" in err
    bad_meta = write(tmp_path / "bm.safetensors", {"x": np.zeros((2, 4), np.float32)}, {"fused": "[1, 2]"})
    assert cli(["compare", "--against", str(bad_meta), *TINY]) == 2
    assert "metadata 'fused' must be a JSON object" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Unlike the above: Qwen2 (q/k/v biases), whose fused qkv matmul adds one concatenated bias


def test_qwen2_fused_qkv_with_biases_and_a_bias_missing_from_its_k_block(tmp_path, capsys):
    """A Qwen2 engine computing q|k|v as one matmul plus one concatenated bias [b_q | b_k | b_v]:
    clean it matches every stage (--suggest-map finds the map); with the k part of that bias left
    out (a bias vector built as [b_q | 0 | b_v]) it diverges at attn.k, with q and v clean, replay
    placing the fault in k's own arithmetic and the hint naming the k block of the fused tensor.
    (No errorshape pattern names a per-column offset yet: the pattern is None here.)"""
    from safetensors.numpy import load_file

    from mlx_tinyllama.synthetic import materialize

    model = ["--model", "synthetic:qwen2-tiny", "--dtype", "float32"]
    lm = sources.load("synthetic:qwen2-tiny", "float32")
    taps = {t: np.asarray(x, np.float32) for t, x in run_side(lm, SEED_IDS).tensors.items()}
    n = len(tap_names(lm.config.num_hidden_layers))
    tensors, mapping = fuse(taps, lm.config.num_hidden_layers)
    dump = write(tmp_path / "qwen2.safetensors", tensors)
    mapped = write_map(tmp_path / "m.json", mapping)
    rc, result, _, _ = run(tmp_path, capsys, "--against", dump, *model, "--map", mapped)
    assert rc == 0 and result["verdict"]["line"] == f"match: {n}/{n} stages"
    out = tmp_path / "suggested.json"
    assert cli(["compare", "--against", str(dump), *model, "--suggest-map", str(out)]) == 0
    capsys.readouterr()
    assert json.loads(out.read_text()) == mapping

    bias = load_file(str(materialize("qwen2-tiny", 0) / "model.safetensors"))["model.layers.0.self_attn.k_proj.bias"]
    H, D = lm.config.num_attention_heads, lm.config.hidden_size // lm.config.num_attention_heads
    assert np.abs(bias).max() > 0  # the fault below changes something
    tensors["model.layers.0.qkv"] = tensors["model.layers.0.qkv"].copy()
    tensors["model.layers.0.qkv"][:, H * D:H * D + bias.size] -= bias
    dump = write(tmp_path / "nobias.safetensors", tensors)
    rc, result, _, _ = run(tmp_path, capsys, "--against", dump, *model, "--map", tmp_path / "m.json")
    assert rc == 1 and result["first_divergence"]["tap"] == "layers.0.attn.k"
    ok = {s["tap"]: s["ok"] for s in result["stages"]}
    assert ok["layers.0.attn.q"] and ok["layers.0.attn.v"]
    assert result["localized"]["stage"] == "layers.0.attn.k"  # replayed with the bias: k's own arithmetic
    assert f"in their dump this is columns {H * D}:{H * D + bias.size} of their model.layers.0.qkv" \
        in result["first_divergence"]["hint"]


# ---------------------------------------------------------------------------
# The split itself, on shapes the CLI tests do not write


def test_split_reads_heads_split_and_batched_forms_and_refuses_unequal_interleaving():
    from mlx_tinyllama.errors import UserError
    from mlx_tinyllama.refs.fused import Fused, split

    cfg = {"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 32, "intermediate_size": 24,
           "num_hidden_layers": 1, "vocab_size": 50}
    T, D = 3, 8
    rng = np.random.default_rng(0)
    q, k, v = rng.normal(size=(T, 4 * D)), rng.normal(size=(T, 2 * D)), rng.normal(size=(T, 2 * D))
    qkv = np.concatenate([q, k, v], -1)
    f = Fused("qkv", ("layers.0.attn.q", "layers.0.attn.k", "layers.0.attn.v"))
    for form in (qkv, qkv[None], qkv.reshape(T, 8, D), qkv.reshape(1, T, 8, D)):  # [T, (H+2KV)*D] in its forms
        parts = split(f, form, cfg)
        assert [p[0] for p in parts] == list(f.taps)
        assert all(np.array_equal(p[1], want) for p, want in zip(parts, (q, k, v)))
    one = split(f, qkv[:1].reshape(1, 8, D), cfg)  # one token, heads split: [1, H+2KV, D]
    assert all(np.array_equal(p[1], want[:1]) for p, want in zip(one, (q, k, v)))
    grouped = split(Fused("qkv", f.taps, "grouped"), megatron_qkv(q, k, v, 2), cfg)
    assert all(np.array_equal(p[1], want) for p, want in zip(grouped, (q, k, v)))
    with pytest.raises(UserError, match="alternates equal parts"):
        split(Fused("qkv", f.taps, "interleaved"), qkv, cfg)
    with pytest.raises(UserError, match=r"holds 63 values per token.*attn.q 32 \+ attn.k 16 \+ attn.v 16 = 64"):
        split(f, qkv[:, :63], cfg)


def test_float16_fused_dump_against_the_stored_reference_without_a_model(tmp_path, capsys):
    """Unlike the runs above: no model (the config comes from a stored reference,
    refs/synthetic-tiny-fp16.json), tensors stored as float16 (their tolerance follows the
    storage). The reference's own tensors fused match; the v block of layer 1 scaled by 1.05
    diverges at layers.1.attn.v, not at q or k."""
    from mlx_tinyllama import refs as R

    repo = Path(__file__).resolve().parents[1]
    ref = repo / "refs" / "synthetic-tiny-fp16.json"
    side = R.load(ref)[0]
    taps = {t: np.asarray(x, np.float32) for t, x in side.tensors.items()}
    tensors, mapping = fuse(taps, 2)
    mapped = write_map(tmp_path / "m.json", mapping)

    def save(name, ts):
        save_file({k: np.ascontiguousarray(v, np.float16) for k, v in ts.items()}, str(tmp_path / name),
                  metadata={"tokens": json.dumps(side.ids)})
        return tmp_path / name

    rc, result, _, _ = run(tmp_path, capsys, "--against", save("f16.safetensors", tensors), "--ref", ref,
                           "--map", mapped)
    assert rc == 0 and result["status"] == "match" and result["tolerance_basis"]["dtype"] == "float16"
    assert {"layers.1.attn.v", "layers.1.mlp.up"} <= set(result["coverage"]["compared"])
    qkv = tensors["model.layers.1.qkv"].copy()
    width = taps["layers.1.attn.v"].shape[0] * taps["layers.1.attn.v"].shape[2]
    qkv[:, -width:] *= 1.05
    faulty = save("v.safetensors", dict(tensors, **{"model.layers.1.qkv": qkv}))
    rc, result, _, _ = run(tmp_path, capsys, "--against", faulty, "--ref", ref, "--map", mapped)
    assert rc == 1 and result["first_divergence"]["tap"] == "layers.1.attn.v"
    ok = {s["tap"]: s["ok"] for s in result["stages"]}
    assert ok["layers.1.attn.q"] and ok["layers.1.attn.k"]

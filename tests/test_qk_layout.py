"""Meta's interleaved Q/K order as a declared layout (issue 23 item 6): llama2.c and Meta's original
checkpoints rotate pairs (x[2i], x[2i+1]), Hugging Face rotate-half (x[i], x[i+D/2]). A dump that
says so (kit's `qk_layout` metadata, or `--layout meta`) matches; the same dump without the
declaration diverges at attn.q with the Q/K permutation named; a bad declaration is exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SEED_IDS
from mlx_tinyllama.trace import main as cli
from numpy_engine import Engine, _kit_module

QK = ("attn.q", "attn.k", "attn.q_rope", "attn.k_rope")


def _meta_dump(tiny_dir, path, qk_layout: str | None):
    """The NumPy engine's taps with Q/K (before and after RoPE) in Meta's interleaved-pair order, as
    llama2.c holds them."""
    kit = _kit_module()
    engine = Engine(tiny_dir)
    engine.prefill(SEED_IDS)
    extra = {"qk_layout": qk_layout} if qk_layout else {}
    d = kit.TapDump(tokens=SEED_IDS, dtype="float32", **extra)
    for tap, x in engine.dumped().items():
        if tap.split(".", 2)[-1] in QK:
            x = kit.rotate_half_to_interleaved(x)
        d.add(tap, np.asarray(x, np.float32))
    d.write(path)
    return path


def _compare(dump, tmp_path, *extra):
    out = tmp_path / "c.json"
    rc = cli(["compare", "--against", str(dump), "--model", "synthetic:tiny", "--dtype", "float32",
              "--json", str(out), *extra])
    return rc, json.loads(out.read_text()) if out.exists() else None


def test_a_dump_that_declares_meta_order_matches(tiny_dir, tmp_path):
    rc, result = _compare(_meta_dump(tiny_dir, tmp_path / "meta.safetensors", "meta"), tmp_path)
    assert rc == 0 and result["status"] == "match"
    notes = [e["note"] for e in result["entries"] if e["tap"] == "layers.0.attn.q"]
    assert any("Meta's interleaved-pair Q/K order" in n and "undone" in n for n in notes), notes


def test_the_same_dump_undeclared_is_named_a_qk_permutation(tiny_dir, tmp_path):
    dump = _meta_dump(tiny_dir, tmp_path / "undeclared.safetensors", None)
    rc, result = _compare(dump, tmp_path)
    first = result["first_divergence"]
    assert rc == 1 and first["tap"] == "layers.0.attn.q" and first["qk_permutation"]
    assert "permuted within heads" in first["hint"]
    rc, result = _compare(dump, tmp_path, "--layout", "meta")  # declared on the command line instead
    assert rc == 0 and result["status"] == "match"


def test_a_bad_declaration_is_refused(tiny_dir, tmp_path, capsys):
    dump = _meta_dump(tiny_dir, tmp_path / "bad.safetensors", "interleaved-ish")
    rc, _ = _compare(dump, tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "qk_layout 'interleaved-ish'" in err[0]


@pytest.mark.parametrize("heads, d", [(1, 8), (4, 16), (3, 64)])
def test_the_kit_helpers_are_the_gguf_permutation_per_head(heads, d):
    """kit's converters agree with the weights' own permutation (gguf.permute_qk, one head at a time)
    and undo each other."""
    from mlx_tinyllama.gguf import permute_qk

    kit = _kit_module()
    x = np.random.default_rng(heads).standard_normal((heads, 5, d))
    inter = kit.rotate_half_to_interleaved(x)
    assert np.array_equal(kit.interleaved_to_rotate_half(inter), x)
    assert np.array_equal(np.moveaxis(permute_qk(np.moveaxis(x, -1, 0), 1), 0, -1), inter)

"""The synthetic generator at real shapes: a model bigger than SHARD_BYTES is written in shards with an
index (the generator holds one shard, not the model), tensors drawn in parallel; the bytes are the same
as one file drawn tensor by tensor, and the loader reads the shards as it reads a real sharded checkpoint."""

from __future__ import annotations

import json

import mlx.core as mx
from mlx.utils import tree_flatten
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mlx_tinyllama import sources, synthetic


def _serial(preset: str, seed: int) -> dict[str, np.ndarray]:
    """The generator as it was: every tensor in turn, in one dict."""
    cfg = synthetic.PRESETS[preset]
    return {n: synthetic.generate_weight(n, s, seed) for n, s in cfg.weight_shapes().items()}


@pytest.mark.parametrize("preset", ["tiny", "qwen2-tiny"])  # plain Llama; biases and tied embeddings
def test_sharded_equals_one_file_drawn_serially(preset, tmp_path, monkeypatch):
    serial = _serial(preset, 0)
    total = sum(w.nbytes for w in serial.values())
    limit = (total - max(w.nbytes for w in serial.values())) // 3  # the embedding alone, the layers in 3+
    monkeypatch.setattr(synthetic, "SHARD_BYTES", limit)
    d = synthetic.materialize(preset, 0, root=tmp_path / "sharded")
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) >= 3 and not (d / "model.safetensors").exists()
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == total
    assert set(index["weight_map"]) == set(serial)
    read = {}
    for f in shards:
        part = load_file(str(f))
        assert sum(w.nbytes for w in part.values()) <= limit or len(part) == 1
        assert all(index["weight_map"][n] == f.name for n in part)
        read.update(part)
    assert read.keys() == serial.keys()
    for n, w in serial.items():
        assert read[n].dtype == w.dtype and np.array_equal(read[n], w), n
    assert synthetic.verify(d)
    # the loader takes the index path, and gets the arrays of the one-file model
    one = tmp_path / "one"
    one.mkdir()
    for f in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        (one / f).write_bytes((d / f).read_bytes())
    save_file(serial, str(one / "model.safetensors"), metadata={"format": "pt"})
    a = sources.load(str(d), "float32")
    b = sources.load(str(one), "float32")
    pa = dict(tree_flatten(a.model.parameters()))
    pb = dict(tree_flatten(b.model.parameters()))
    assert pa.keys() == pb.keys()
    assert all(mx.array_equal(pa[k], pb[k]).item() for k in pa)


def test_a_missing_shard_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "SHARD_BYTES", 64 << 10)
    d = synthetic.materialize("tiny", 0, root=tmp_path)
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 1
    before = {f.name: f.read_bytes() for f in shards}
    shards[1].unlink()
    assert not synthetic.verify(d)
    again = synthetic.materialize("tiny", 0, root=tmp_path)
    assert synthetic.verify(again)
    assert {f.name: f.read_bytes() for f in sorted(again.glob("model-*.safetensors"))} == before


def test_below_the_limit_one_file_byte_for_byte_as_before(tmp_path):
    """Presets under SHARD_BYTES (all but Mistral-7B) keep one model.safetensors, the very bytes that the
    serial generator wrote, so existing caches and fixtures made from them stay valid."""
    d = synthetic.materialize("tiny", 0, root=tmp_path / "a")
    assert [f.name for f in d.glob("*.safetensors")] == ["model.safetensors"]
    assert not (d / "model.safetensors.index.json").exists()
    save_file(_serial("tiny", 0), str(tmp_path / "serial.safetensors"), metadata={"format": "pt"})
    assert (d / "model.safetensors").read_bytes() == (tmp_path / "serial.safetensors").read_bytes()


def test_shard_plan_at_the_real_shapes():
    """Mistral-7B is cut into shards of at most SHARD_BYTES; the presets a laptop generates whole stay one."""
    sizes = {p: sum(2 * int(np.prod(s)) for s in synthetic.PRESETS[p].weight_shapes().values())
             for p in ("mistral-7b", "llama3.2-1b", "tinyllama", "qwen2.5-0.5b", "smollm2-135m")}
    plan = synthetic.shard_plan(synthetic.PRESETS["mistral-7b"].weight_shapes(), synthetic.SHARD_BYTES)
    assert len(plan) >= sizes["mistral-7b"] / synthetic.SHARD_BYTES > 3
    shapes = synthetic.PRESETS["mistral-7b"].weight_shapes()
    assert all(sum(2 * int(np.prod(shapes[n])) for n in shard) <= synthetic.SHARD_BYTES for shard in plan)
    assert [n for shard in plan for n in shard] == list(shapes)
    for p in ("llama3.2-1b", "tinyllama", "qwen2.5-0.5b", "smollm2-135m"):
        assert len(synthetic.shard_plan(synthetic.PRESETS[p].weight_shapes(), synthetic.SHARD_BYTES)) == 1, p

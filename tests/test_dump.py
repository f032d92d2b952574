"""Full dumps streamed layer by layer (dump.py): the sharded form holds exactly the tensors
of the in-memory dump, compare reads it, and the memory it holds stays bounded."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from conftest import SEED_IDS
from mlx_tinyllama import dump, sources
from mlx_tinyllama.ops import UPCAST_PER_CALL_ROWS, Fp32GemmLinear, fp32_weight_copies
from mlx_tinyllama.taps import Taps, tap_names
from mlx_tinyllama.trace import main as trace


def test_sharded_dump_equals_the_in_memory_dump(tmp_path):
    path, out = tmp_path / "taps.safetensors", tmp_path / "run.json"
    # 0.02 MB per shard: every layer of synthetic:tiny (2 layers) starts a new shard
    assert trace(["run", "--model", "synthetic:tiny", "--taps", "*", "--dump", str(path), "--dump-shard-mb", "0.02",
                  "--json", str(out)]) == 0
    names = tap_names(2)
    shards, meta = dump.read_index(dump.index_path(path))
    assert not path.exists() and [s.name for s in shards] == [f"taps-0000{k}.safetensors" for k in (1, 2, 3)]
    assert json.loads(out.read_text())["dump"] == [str(s) for s in shards] + [str(dump.index_path(path))]
    written = {}
    for s in shards:
        tensors, shard_meta = mx.load(str(s), return_metadata=True)
        assert json.loads(shard_meta["tokens"]) == SEED_IDS and shard_meta["dtype"] == "float16"
        written.update(tensors)
    index = json.loads(dump.index_path(path).read_text())
    assert list(index["weight_map"]) == names and index["metadata"]["shards"] == 3
    lm = sources.load("synthetic:tiny", "float16")
    taps = Taps(names, "full")
    mx.eval(lm.model(mx.array(SEED_IDS), tap=taps), taps.tensors)
    assert sorted(written) == sorted(names)
    for name in names:
        assert mx.array_equal(written[name], taps.tensors[name]).item(), name
    assert json.loads(out.read_text())["taps"] == json.loads(json.dumps(taps.stats()))  # same stats as in memory


def test_one_shard_is_the_plain_single_file(tmp_path):
    path = tmp_path / "taps.safetensors"
    assert trace(["run", "--model", "synthetic:tiny", "--taps", "layers.1.*", "--dump", str(path)]) == 0
    assert path.is_file() and not dump.index_path(path).exists()
    assert not list(tmp_path.glob("taps-*.safetensors"))
    assert sorted(mx.load(str(path))) == sorted(n for n in tap_names(2) if n.startswith("layers.1."))


def test_compare_reads_the_sharded_form(tmp_path):
    path, out = tmp_path / "d.safetensors", tmp_path / "c.json"
    assert trace(["run", "--model", "synthetic:tiny", "--dtype", "float32", "--taps", "*", "--dump", str(path),
                  "--dump-shard-mb", "0.02"]) == 0
    for against in (dump.index_path(path), path):  # the index, or the dump's name (resolved to its index)
        assert trace(["compare", "--against", str(against), "--model", "synthetic:tiny", "--dtype", "float32",
                      "--json", str(out)]) == 0
        result = json.loads(out.read_text())
        assert result["status"] == "match" and len(result["stages"]) == len(tap_names(2))
    # a corrupted shard is found: compare reports the difference at that shard's first stage
    shard = path.parent / json.loads(dump.index_path(path).read_text())["weight_map"]["layers.0.attn.q"]
    tensors, meta = mx.load(str(shard), return_metadata=True)
    tensors["layers.0.attn.q"] = tensors["layers.0.attn.q"] * 1.01
    mx.save_safetensors(str(shard), tensors, metadata=meta)
    assert trace(["compare", "--against", str(path), "--model", "synthetic:tiny", "--dtype", "float32",
                  "--json", str(out)]) == 1
    assert json.loads(out.read_text())["first_divergence"]["tap"] == "layers.0.attn.q"


def test_missing_shard_or_bad_index_exits_2(tmp_path, capsys):
    path = tmp_path / "d.safetensors"
    assert trace(["run", "--model", "synthetic:tiny", "--taps", "*", "--dump", str(path), "--dump-shard-mb", "0.02"]) == 0
    shards, _ = dump.read_index(dump.index_path(path))
    shards[-1].unlink()
    assert trace(["compare", "--against", str(path), "--model", "synthetic:tiny"]) == 2
    assert "do not exist" in capsys.readouterr().err
    dump.index_path(path).write_text("{}")
    assert trace(["compare", "--against", str(path), "--model", "synthetic:tiny"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert trace(["run", "--model", "synthetic:tiny", "--dump", str(tmp_path / "e.safetensors"),
                  "--dump-shard-mb", "0"]) == 2


def _peak(work) -> int:
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    work()
    mx.synchronize()
    return mx.get_peak_memory() - base


def test_streaming_holds_about_one_layer_while_the_in_memory_dump_holds_all(tmp_path):
    """medium (6 layers), fp32, 256 tokens. Memory above a taps-off forward: the in-memory
    recorder holds every tap (6 layers' worth); the streaming one one layer pending and the
    next being computed, at most 2 layers' worth (measured: 0.7)."""
    lm = sources.load("synthetic:medium", "float32")
    ids = mx.array(np.random.default_rng(0).integers(3, 32000, 256).tolist())
    names = tap_names(6)
    off = _peak(lambda: mx.eval(lm.model(ids)))
    held = Taps(names, "full")
    in_memory = _peak(lambda: mx.eval(lm.model(ids, tap=held), held.tensors))
    sizes = {n: v.nbytes for n, v in held.tensors.items()}
    del held
    layer = max(sum(v for n, v in sizes.items() if n.startswith(f"layers.{i}.")) for i in range(6))

    def stream():
        rec = dump.StreamingDump(names, tmp_path / "s.safetensors", {"format": "test"}, shard_bytes=1)
        mx.eval(lm.model(ids, tap=rec))
        assert len(rec.finish()) == 1 + 6 + 1 + 1  # embed, a shard per layer, final_norm + logits; the index
    streaming = _peak(stream)
    assert in_memory - off >= 6 * layer  # every tap held at once
    assert streaming - off <= 2 * layer, (streaming - off, layer)


@pytest.mark.parametrize("shard_mb", ["0.02", "1024"])  # several shards with an index, and one plain file
def test_an_interrupted_dump_leaves_the_earlier_dump_and_no_partial_file(tmp_path, monkeypatch, capsys, shard_mb):
    path = tmp_path / "taps.safetensors"
    args = ["run", "--model", "synthetic:tiny", "--taps", "*", "--dump", str(path), "--dump-shard-mb", shard_mb]
    assert trace(args + ["--token-ids", "1,450,4996"]) == 0  # the earlier dump: other tensors than this run's
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    calls = {"n": 0}
    real = dump.StreamingDump.__call__

    def interrupted(self, name, x):  # Ctrl-C in the middle of the second layer's taps
        calls["n"] += 1
        if name == "layers.1.mlp.up":
            raise KeyboardInterrupt
        return real(self, name, x)

    monkeypatch.setattr(dump.StreamingDump, "__call__", interrupted)
    assert trace(args) == 130
    assert calls["n"] > 0 and {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("tokens", [3, UPCAST_PER_CALL_ROWS])
def test_a_long_half_dump_on_the_cpu_keeps_no_fp32_weight_copies(tmp_path, monkeypatch, tokens):
    """ops.Fp32GemmLinear: from UPCAST_PER_CALL_ROWS tokens a prefill upcasts each weight per
    call, so `run --dump` of a long prompt never holds the fp32 copies (4.1 GB for TinyLlama);
    a short prompt makes them (the check sees them when they exist)."""
    from mlx_tinyllama import cli_common

    loaded, load = [], cli_common.load_model
    monkeypatch.setattr(cli_common, "load_model", lambda args: loaded.append(load(args)) or loaded[-1])
    previous = mx.default_device()
    mx.set_default_device(mx.cpu)  # the CPU backend's rule, also on a GPU machine
    try:
        ids = ",".join(str(3 + (i * 7919) % 31990) for i in range(tokens))
        assert trace(["run", "--model", "synthetic:tiny", "--taps", "*", "--dump", str(tmp_path / "d.safetensors"),
                      "--token-ids", ids]) == 0
    finally:
        mx.set_default_device(previous)
    model = loaded[0].model
    copies = fp32_weight_copies(model)
    assert copies == (0 if tokens >= UPCAST_PER_CALL_ROWS else 2 * sum(
        m.weight.nbytes for m in model.modules() if isinstance(m, Fp32GemmLinear))), copies
    assert sorted(mx.load(str(tmp_path / "d.safetensors"))) == sorted(tap_names(2))


def test_statistics_of_a_tap_with_inf_or_nan_hold_no_full_size_copy():
    """A 2,048-token dump's [32, 2048, 2048] attention taps can hold Inf (fp16 scores of the
    synthetic model): their host statistics (tap_stats._stats_of_finite) go through the finite values
    in blocks, equal to numpy's two-pass float64 values, with no masked or float64 copy of the
    tensor (which put 3.7 GB on a 2,048-token dump's peak). numpy's buffers are traced by
    tracemalloc."""
    import tracemalloc

    from mlx_tinyllama.tap_stats import _BLOCK, tensor_stats

    rng = np.random.default_rng(0)
    a = (rng.standard_normal((4, 600, 1011)) * 3 + 1).astype(np.float16)  # [heads, T, S], 37 blocks
    assert a.size > 36 * _BLOCK
    a[0, 0, 3], a[2, -1, -1], a[1, 100, 100:103] = np.inf, -np.inf, np.nan
    x = mx.array(a)
    mx.eval(x)
    tracemalloc.start()
    try:
        s = tensor_stats(x, 1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < a.size * 8 / 8, (peak, a.size * 8)  # a float64 copy would be a.size * 8 bytes
    v = a[np.isfinite(a)].astype(np.float64)
    assert (s["nan"], s["inf"], s["finite"]) == (3, 2, a.size - 5)
    assert (s["min"], s["max"], s["absmax"]) == (v.min(), v.max(), np.abs(v).max())
    np.testing.assert_allclose([s["sum"], s["mean"], s["std"]], [v.sum(), v.mean(), v.std()], rtol=1e-12)

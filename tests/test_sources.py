"""The model resolver and loader: local HF dirs (single file and sharded), the HF cache,
downloads (only up to the point where one would start), synthetic models, bad checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import SEED_IDS
from mlx_tinyllama import sources, synthetic
from mlx_tinyllama.errors import UserError
from mlx_tinyllama.taps import Taps

REPO_ID = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"  # any 40-hex commit id


def logits_of(spec, dtype="float32", ids=SEED_IDS) -> np.ndarray:
    lm = sources.load(str(spec), dtype)
    return np.array(lm.model(mx.array(ids))[0].astype(mx.float32))


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) every attempt to open a connection or resolve a host name."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield attempts
    assert attempts == [], f"a network call was attempted: {attempts[:3]}"


# --- local HF directories -----------------------------------------------------


def test_local_dir_with_one_safetensors_file(tiny_dir):
    lm = sources.load(str(tiny_dir), "float32")
    assert (lm.source.format, lm.source.origin, lm.source.path) == ("hf", "local", tiny_dir)
    assert lm.config == synthetic.PRESETS["tiny"]
    assert lm.dtype == "float32"
    # Every parameter is the file's tensor, by its HF name.
    stored = load_file(str(tiny_dir / "model.safetensors"))
    params = dict(_flatten(lm.model.parameters()))
    assert sorted(params) == sorted(stored)
    for name, w in stored.items():
        assert params[name].dtype == mx.float32
        np.testing.assert_array_equal(np.array(params[name]), w.astype(np.float32), err_msg=name)


def _flatten(tree, prefix=""):
    from mlx.utils import tree_flatten

    return tree_flatten(tree, prefix=prefix)


def split_into_shards(model_dir: Path, out: Path) -> Path:
    """Rewrite a single-file checkpoint as two shards + model.safetensors.index.json, as transformers does."""
    out.mkdir()
    for f in model_dir.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    tensors = load_file(str(model_dir / "model.safetensors"))
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, str(out / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    total = sum(t.nbytes for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out


def test_sharded_dir_loads_to_identical_logits(tiny_dir, tmp_path):
    sharded = split_into_shards(tiny_dir, tmp_path / "sharded")
    assert not (sharded / "model.safetensors").exists()
    assert [f.name for f in sources.weight_files(sharded)] == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    np.testing.assert_array_equal(logits_of(sharded), logits_of(tiny_dir))


def test_sharded_dir_with_a_missing_shard(tiny_dir, tmp_path):
    sharded = split_into_shards(tiny_dir, tmp_path / "sharded")
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(UserError, match="lacks shard.*model-00002-of-00002.safetensors"):
        sources.load(str(sharded))


def test_sharded_dir_with_a_malformed_index(tiny_dir, tmp_path):
    sharded = split_into_shards(tiny_dir, tmp_path / "sharded")
    (sharded / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(UserError, match="model.safetensors.index.json is malformed"):
        sources.load(str(sharded))


# --- Hugging Face repo ids: cache, offline, download ---------------------------


def fake_hf_cache(root: Path, model_dir: Path, repo_id: str = REPO_ID) -> Path:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / SNAPSHOT
    shutil.copytree(model_dir, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)
    (repo / "blobs").mkdir()
    return snap


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty HF cache: HF_HUB_CACHE for subprocesses, huggingface_hub's constant for this one
    (huggingface_hub reads the variable once, at import)."""
    import huggingface_hub.constants

    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    return root


def test_repo_id_resolves_from_the_local_hf_cache_without_network(tiny_dir, hf_cache, no_network, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # cache first even when online
    snap = fake_hf_cache(hf_cache, tiny_dir)
    lm = sources.load(REPO_ID, "float32")
    assert (lm.source.origin, lm.source.format, lm.source.spec) == ("hf-cache", "hf", REPO_ID)
    assert lm.source.path.resolve() == snap.resolve()
    np.testing.assert_array_equal(np.array(lm.model(mx.array(SEED_IDS))[0]), logits_of(tiny_dir))


def test_repo_id_from_hf_hub_cache_variable_in_a_fresh_process(tiny_dir, tmp_path):
    root = tmp_path / "hub"
    snap = fake_hf_cache(root, tiny_dir)
    code = ("from mlx_tinyllama import sources; s = sources.load(%r).source; print(s.origin, s.path)" % REPO_ID)
    env = {**os.environ, "HF_HUB_CACHE": str(root), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    origin, path = proc.stdout.split()
    assert origin == "hf-cache" and Path(path).resolve() == snap.resolve()


def test_repo_id_not_in_cache_says_how_to_get_it(hf_cache, no_network, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(UserError) as e:
        sources.load(REPO_ID)
    msg = str(e.value)
    assert f"{REPO_ID} is not in the local Hugging Face cache" in msg
    assert f"{hub_cli()} download {REPO_ID}" in msg and "--download" in msg


def hub_cli() -> str:
    """The Hub CLI that the installed huggingface_hub ships (its console scripts)."""
    from importlib.metadata import distribution

    scripts = {e.name for e in distribution("huggingface_hub").entry_points if e.group == "console_scripts"}
    assert scripts & {"hf", "huggingface-cli"}, scripts
    return "hf" if "hf" in scripts else "huggingface-cli"


def test_download_when_offline_says_so(hf_cache, no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as e:
        sources.load(REPO_ID, allow_download=True)
    msg = str(e.value)
    assert "HF_HUB_OFFLINE is set" in msg and f"{hub_cli()} download {REPO_ID}" in msg


def test_download_starts_with_the_repo_id_and_the_files_the_loader_needs(tiny_dir, tmp_path, hf_cache,
                                                                       no_network, monkeypatch):
    """Up to the point where a download would start: snapshot_download is called with the repo id
    and patterns that cover config, weights (single or sharded) and tokenizer; its result is loaded."""
    import fnmatch

    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    downloaded = copy_model(tiny_dir, tmp_path / "downloaded")
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not in the cache")
        return str(downloaded)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    lm = sources.load(REPO_ID, "float32", allow_download=True)
    assert (lm.source.origin, lm.source.path) == ("download", downloaded)
    assert [c[0] for c in calls] == [REPO_ID, REPO_ID]
    assert calls[0][1].get("local_files_only") is True  # the cache is asked first
    download = calls[1][1]
    assert not download.get("local_files_only")
    patterns = download["allow_patterns"]
    wanted = ["config.json", "model.safetensors", "model-00001-of-00002.safetensors",
              "model.safetensors.index.json", "tokenizer.model", "tokenizer_config.json"]
    for f in wanted:
        assert any(fnmatch.fnmatch(f, p) for p in patterns), f"{f} would not be downloaded"
    for f in ["pytorch_model.bin", "model.gguf", "flax_model.msgpack"]:
        assert not any(fnmatch.fnmatch(f, p) for p in patterns), f"{f} would be downloaded for nothing"


def test_a_failed_download_is_one_clear_message(hf_cache, no_network, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def failing(repo_id, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
    with pytest.raises(UserError, match=f"could not download {REPO_ID}: ConnectionError"):
        sources.load(REPO_ID, allow_download=True)


def test_not_a_model_spec():
    with pytest.raises(UserError, match="not found: give a model directory"):
        sources.load("./no/such/dir")


# --- synthetic models -------------------------------------------------------------


def test_synthetic_is_deterministic_in_preset_and_seed(tmp_path):
    a = synthetic.materialize("tiny", 5, root=tmp_path / "a")
    b = synthetic.materialize("tiny", 5, root=tmp_path / "b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "config.json").read_text() == (b / "config.json").read_text()
    c = load_file(str(synthetic.materialize("tiny", 6, root=tmp_path / "c") / "model.safetensors"))
    wa = load_file(str(a / "model.safetensors"))
    assert sorted(c) == sorted(wa)
    for name in wa:  # every tensor differs with the seed, not only some
        assert not np.array_equal(wa[name], c[name]), name


def test_synthetic_spec_parsing():
    assert synthetic.parse_spec("synthetic") == ("tinyllama", 0)
    assert synthetic.parse_spec("synthetic:tiny") == ("tiny", 0)
    assert synthetic.parse_spec("synthetic:tiny:seed=3") == ("tiny", 3)
    assert synthetic.parse_spec("synthetic:seed=3") == ("tinyllama", 3)


def test_synthetic_seed_reaches_the_loaded_model():
    lm = sources.load("synthetic:tiny:seed=3", "float32")
    assert lm.source.origin == "synthetic"
    assert lm.source.details == {"preset": "tiny", "seed": 3}
    assert not np.array_equal(logits_of("synthetic:tiny:seed=3"), logits_of("synthetic:tiny"))


def test_unknown_synthetic_preset_lists_the_presets():
    with pytest.raises(UserError, match="unknown synthetic preset 'huge'; presets: ") as e:
        sources.load("synthetic:huge")
    listed = str(e.value).split("presets: ")[1].split(", ")
    assert {"tiny", "small", "medium", "tinyllama"} <= set(listed)  # (other features register more)


def test_bad_synthetic_seed():
    with pytest.raises(UserError, match="bad seed in 'synthetic:tiny:seed=x'"):
        sources.load("synthetic:tiny:seed=x")


# --- tied embeddings ------------------------------------------------------------------


def tied_variant(tiny_dir: Path, out: Path, keep_lm_head: bool) -> Path:
    copy_model(tiny_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (out / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(out / "model.safetensors"))
    if not keep_lm_head:
        del tensors["lm_head.weight"]
    save_file(tensors, str(out / "model.safetensors"))
    return out


def test_tied_embeddings_use_the_embedding_matrix_as_lm_head(tiny_dir, tmp_path):
    tied = tied_variant(tiny_dir, tmp_path / "tied", keep_lm_head=False)
    lm = sources.load(str(tied), "float32")
    assert lm.config.tie_word_embeddings and "lm_head" not in dict(lm.model.parameters())
    taps = Taps(["final_norm"], "full")
    logits = np.array(lm.model(mx.array(SEED_IDS), tap=taps)[0])
    embed = np.array(lm.model.parameters()["model"]["embed_tokens"]["weight"])
    expected = np.array(taps.tensors["final_norm"]) @ embed.T
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    # A stale lm_head.weight in a tied checkpoint is ignored, as transformers ties it.
    stale = tied_variant(tiny_dir, tmp_path / "tied-stale", keep_lm_head=True)
    np.testing.assert_array_equal(logits_of(stale), logits)


# --- bad checkpoints -----------------------------------------------------------------


def rewrite_weights(model_dir: Path, change) -> None:
    tensors = load_file(str(model_dir / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(model_dir / "model.safetensors"))


def _wrong_shape(t):
    t["model.layers.1.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"][:100]


def _unexpected(t):
    t["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float16)


def _missing(t):
    del t["model.layers.1.post_attention_layernorm.weight"]


@pytest.mark.parametrize("change, words", [
    (_wrong_shape, r"weight model.layers.1.mlp.up_proj.weight .* has shape \(100, 64\), but config.json "
                   r"implies \(172, 64\)"),
    (_unexpected, r"has weights this Llama model does not use, e.g. model.layers.0.self_attn.q_proj.bias"),
    (_missing, r"lacks 1 weight\(s\), e.g. model.layers.1.post_attention_layernorm.weight"),
])
def test_bad_weights_are_named(tiny_dir, tmp_path, change, words):
    bad = copy_model(tiny_dir, tmp_path / "bad")
    rewrite_weights(bad, change)
    with pytest.raises(UserError, match=words):
        sources.load(str(bad))


def test_dir_without_config_json(tiny_dir, tmp_path):
    bad = copy_model(tiny_dir, tmp_path / "bad")
    (bad / "config.json").unlink()
    with pytest.raises(UserError, match="has no config.json"):
        sources.load(str(bad))


def test_dir_without_weights(tiny_dir, tmp_path):
    bad = copy_model(tiny_dir, tmp_path / "bad")
    (bad / "model.safetensors").unlink()
    (bad / "pytorch_model.bin").write_bytes(b"\0" * 16)
    with pytest.raises(UserError, match="has no weights: expected model.safetensors.*PyTorch .bin"):
        sources.load(str(bad))


@pytest.mark.parametrize("keep", ["almost all", "half", "header only", "8 bytes"])
def test_truncated_safetensors(tiny_dir, tmp_path, keep):
    bad = copy_model(tiny_dir, tmp_path / "bad")
    data = (bad / "model.safetensors").read_bytes()
    cut = {"almost all": len(data) - 7, "half": len(data) // 2, "header only": 100, "8 bytes": 8}[keep]
    (bad / "model.safetensors").write_bytes(data[:cut])
    with pytest.raises(UserError, match="cannot read .*model.safetensors.*truncated"):
        sources.load(str(bad))


def test_a_text_file_named_safetensors(tiny_dir, tmp_path):
    bad = copy_model(tiny_dir, tmp_path / "bad")
    (bad / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\n")
    with pytest.raises(UserError, match="cannot read .*model.safetensors"):
        sources.load(str(bad))


@pytest.mark.parametrize("dtype", ["float8", "int8", ""])
def test_unknown_dtype(dtype):
    with pytest.raises(UserError, match="unknown dtype"):
        sources.load("synthetic:tiny", dtype)


@pytest.mark.parametrize("alias, name", [("fp16", "float16"), ("bf16", "bfloat16"), ("fp32", "float32")])
def test_dtype_aliases(alias, name):
    assert sources.dtype_name(alias) == name


def test_policy_and_kernels_are_checked():
    with pytest.raises(UserError, match="unknown precision policy"):
        sources.load("synthetic:tiny", policy="fast")
    with pytest.raises(UserError, match="runs on explicit kernels only"):
        sources.load("synthetic:tiny", policy="fp16-pure", kernels="fused")
    lm = sources.load("synthetic:tiny", policy="fp16-pure")
    assert (lm.ops.policy, lm.ops.kernels) == ("fp16-pure", "explicit")


def test_ops_checks_its_names_with_the_same_user_errors():
    """One check of policy/kernels/projections (in Ops), the same UserError from the CLI's path and
    from a caller building Ops itself (was ValueError there)."""
    from mlx_tinyllama.ops import Ops

    with pytest.raises(UserError, match="runs on explicit kernels only"):
        Ops("fp16-pure", "fused")
    with pytest.raises(UserError, match="unknown kernels"):
        Ops("hf", "fast")
    with pytest.raises(UserError, match="unknown projections"):
        Ops("hf", "fused", "joined")
    with pytest.raises(UserError, match="unknown kernels"):
        sources.make_ops("hf", "fast")
    assert Ops("mixed", "explicit").kernels == "explicit"

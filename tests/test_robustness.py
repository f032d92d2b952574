"""Every command on corrupt, hostile and oversized inputs (issue 17), generated from tables.

Each case runs `trace.main([...])` in-process on a variant of the synthetic tiny model and checks
what a user sees and keeps: the exit code, exactly one `error: ...` line that names what is wrong,
no traceback, and nothing lost (every input file byte-identical afterwards, no stray files). A few
cases run as subprocesses: the exit codes of the real process, SIGTERM.

Probe classes (the `CLASS` of each table) are counted by `test_probe_census` so the suite's size
is visible in its output; see the module's tables for what each class covers.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from mlx_tinyllama import trace
from mlx_tinyllama.synthetic import PACKAGE_TOKENIZER

# ---------------------------------------------------------------------------------------------
# Helpers


def invoke(argv, capfd) -> tuple[int, str, str]:
    capfd.readouterr()
    rc = trace.main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return rc, out, err


def assert_one_error(rc: int, err: str, code: int = 2, words: str | None = None) -> None:
    """Exit `code`, exactly one line on stderr starting `error:`, naming `words`, no traceback."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == code, f"exit {rc}, expected {code}; stderr: {err}"
    assert "Traceback" not in err, err
    assert len([ln for ln in lines if ln.startswith("error:")]) == 1, err
    assert lines[-1].startswith("error:"), err
    if words is not None:
        import re

        assert re.search(words, lines[-1]), f"{words!r} not in {lines[-1]!r}"


def snapshot(*roots) -> dict:
    """name -> sha256 of every file under `roots` (followed symlinks), to prove nothing changed."""
    out = {}
    for root in roots:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            with open(f, "rb") as fh:  # not Path.read_bytes: some cases patch it
                out[str(f)] = hashlib.sha256(fh.read()).hexdigest()
        if root.is_dir():
            out[f"{root}/"] = sorted(str(p) for p in root.rglob("*"))
    return out


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    return tmp_path_factory.mktemp("robust")


@pytest.fixture(scope="session")
def tiny_weights(tiny_dir):
    from safetensors.numpy import load_file

    return load_file(str(tiny_dir / "model.safetensors"))


@pytest.fixture(scope="session")
def tiny_config(tiny_dir):
    return json.loads((tiny_dir / "config.json").read_text())


def model_dir(root: Path, name: str, tiny_dir: Path, config: dict | None = None, weights: bool = True) -> Path:
    """A model directory whose config.json is `config`, with the tiny model's weights and tokenizer
    linked in (symlinks: nothing large is copied per case)."""
    d = root / name
    d.mkdir(parents=True)
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    if weights:
        (d / "model.safetensors").symlink_to(tiny_dir / "model.safetensors")
    (d / "tokenizer.model").symlink_to(PACKAGE_TOKENIZER)
    return d


# ---------------------------------------------------------------------------------------------
# config.json: every field, wrong types and out-of-range values (probe class "config")

INT_FIELDS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "max_position_embeddings", "head_dim", "bos_token_id",
              "eos_token_id"]
BAD_INTS = {"float": 64.7, "string": "64", "bool": True, "negative": -1, "huge": 10**9, "list": [64],
            "object": {"n": 64}, "huge-float": 1e300}
VALID_EXCEPTIONS = {("eos_token_id", "list")}  # eos [64] is a valid list of ids (first taken); 64 < vocab
REQUIRED = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"}

CONFIG_CASES = [(f"{f}={k}", {f: v}, f) for f in INT_FIELDS for k, v in BAD_INTS.items()
                if (f, k) not in VALID_EXCEPTIONS]
CONFIG_CASES += [(f"{f}=null", {f: None}, f) for f in sorted(REQUIRED)]
CONFIG_CASES += [(f"{f}=0", {f: 0}, f) for f in sorted(REQUIRED | {"max_position_embeddings", "num_key_value_heads"})]
CONFIG_CASES += [(f"{f}={k}", {f: v}, f) for f in ("rms_norm_eps", "rope_theta")
                 for k, v in {"string": "1e-5", "bool": True, "negative": -1.0, "zero": 0, "nan": float("nan"),
                              "inf": float("inf"), "list": [1.0]}.items()]
CONFIG_CASES += [
    ("architectures=gpt2", {"architectures": ["GPT2LMHeadModel"]}, "architectures"),
    ("architectures=string", {"architectures": "LlamaForCausalLM"}, "architectures"),
    ("architectures=[1]", {"architectures": [1]}, "architectures"),
    ("architectures=[]", {"architectures": []}, "architectures"),
    ("architectures=seqcls", {"architectures": ["LlamaForSequenceClassification"]}, "architectures"),
    ("model_type=gpt2", {"model_type": "gpt2"}, "model_type"),
    ("model_type=null", {"model_type": None}, "model_type"),
    ("model_type=int", {"model_type": 3}, "model_type"),
    ("hidden_act=gelu", {"hidden_act": "gelu"}, "hidden_act"),
    ("tie=string", {"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
    ("tie=int", {"tie_word_embeddings": 1}, "tie_word_embeddings"),
    ("attention_bias", {"attention_bias": True}, "bias"),
    ("rope_scaling=string", {"rope_scaling": "linear"}, "rope_scaling"),
    ("rope_scaling=yarn", {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "yarn"),
    ("rope_scaling=factor-string", {"rope_scaling": {"rope_type": "linear", "factor": "2"}}, "factor"),
    ("rope_scaling=factor-negative", {"rope_scaling": {"rope_type": "linear", "factor": -2.0}}, "factor"),
    ("rope_scaling=type-list", {"rope_scaling": {"rope_type": ["linear"]}}, "rope scaling"),
    ("head_dim=odd", {"head_dim": 15}, "head_dim"),
    ("kv-not-divisor", {"num_key_value_heads": 3}, "num_key_value_heads"),
    ("heads>hidden", {"num_attention_heads": 128, "num_key_value_heads": 128, "head_dim": None},
     "num_attention_heads"),
    ("eos=[]", {"eos_token_id": []}, "eos_token_id"),
    ("bos-outside-vocab", {"bos_token_id": 32000}, "bos_token_id"),
    ("layers=1e9", {"num_hidden_layers": 1e9}, "num_hidden_layers"),
    ("params>1T", {"hidden_size": 65536, "intermediate_size": 262144, "num_hidden_layers": 1024,
                   "num_attention_heads": 512, "num_key_value_heads": 512}, "parameters"),
]

RAW_CONFIGS = [  # whole-file corruption: bytes of config.json
    ("not-json", b"{hidden_size: 64", "not valid JSON"),
    ("list", b"[1, 2]", "JSON object"),
    ("empty", b"", "not valid JSON"),
    ("binary", bytes(range(256)), "not valid JSON"),
    ("deep", b"[" * 100000 + b"]" * 100000, "not valid JSON"),
    ("huge", b'{"x": "' + b"a" * (2 << 20) + b'"}', "bytes"),
    ("string", b'"llama"', "JSON object"),
]


@pytest.mark.parametrize("name,change,words", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_field(name, change, words, lab, tiny_dir, tiny_config, capfd):
    config = {**tiny_config, **change}
    d = model_dir(lab / "config", name, tiny_dir, config)
    before = snapshot(d)
    rc, _, err = invoke(["run", "--model", d, "--dtype", "float32"], capfd)
    assert_one_error(rc, err, 2, words)
    assert "config.json" in err  # names the file
    assert snapshot(d) == before


@pytest.mark.parametrize("name,raw,words", RAW_CONFIGS, ids=[c[0] for c in RAW_CONFIGS])
def test_config_file(name, raw, words, lab, tiny_dir, capfd):
    d = model_dir(lab / "config-raw", name, tiny_dir)
    (d / "config.json").write_bytes(raw)
    before = snapshot(d)
    rc, _, err = invoke(["run", "--model", d], capfd)
    assert_one_error(rc, err, 2, words)
    assert snapshot(d) == before


def test_config_controls_accepted(lab, tiny_dir, tiny_config, capfd):
    """The other side of the table: integral floats, null optional fields and an eos list still load."""
    config = {**tiny_config, "hidden_size": 64.0, "head_dim": None, "bos_token_id": None,
              "eos_token_id": [2, 3], "architectures": ["LlamaForCausalLM"]}
    d = model_dir(lab / "config-ok", "ok", tiny_dir, config)
    rc, out, err = invoke(["run", "--model", d, "--dtype", "float32", "--top-k", "3"], capfd)
    assert rc == 0, err
    assert "next token" in out


# ---------------------------------------------------------------------------------------------
# safetensors weights and the model directory (probe class "weights")


def _save(path: Path, tensors: dict) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, str(path))


def _weights_case(kind: str, weights: dict, d: Path) -> str:
    """Write the corrupt weights of `kind` into `d`; return the words the error must contain."""
    target = d / "model.safetensors"
    target.unlink()
    w = dict(weights)
    q = "model.layers.0.self_attn.q_proj.weight"
    if kind in ("int32", "int8", "bool", "uint16", "float64", "int64"):
        w[q] = w[q].astype({"int32": np.int32, "int8": np.int8, "bool": np.bool_, "uint16": np.uint16,
                            "float64": np.float64, "int64": np.int64}[kind])
        _save(target, w)
        return f"{q}.*dtype"
    if kind == "shape":
        w[q] = w[q][:, :32]
        _save(target, w)
        return "shape"
    if kind == "missing":
        del w[q]
        _save(target, w)
        return "lacks"
    if kind == "extra":
        w["model.layers.9.mlp.up_proj.weight"] = w[q]
        _save(target, w)
        return "does not use"
    if kind == "scalar":
        w["model.norm.weight"] = np.array(1.0, np.float16)
        _save(target, w)
        return "shape"
    raise AssertionError(kind)


WEIGHT_KINDS = ["int32", "int8", "bool", "uint16", "float64", "int64", "shape", "missing", "extra", "scalar"]
RAW_WEIGHTS = [  # (name, bytes builder from the good file's bytes, words)
    ("empty", lambda b: b"", "too short"),
    ("8-bytes", lambda b: b[:8], "truncated"),
    ("header-only", lambda b: b[:100], "truncated"),
    ("half", lambda b: b[: len(b) // 2], "truncated"),
    ("huge-header-length", lambda b: struct.pack("<Q", 1 << 62) + b[8:], "claims"),
    ("lfs-pointer", lambda b: b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n", "LFS"),
    ("text", lambda b: b"hello, this is not a checkpoint at all", "safetensors"),
    ("garbage-header", lambda b: struct.pack("<Q", 16) + b"{not json at all" + b[24:], "cannot read"),
]


@pytest.mark.parametrize("kind", WEIGHT_KINDS)
def test_weights_refused(kind, lab, tiny_dir, tiny_config, tiny_weights, capfd):
    d = model_dir(lab / "weights", kind, tiny_dir, tiny_config)
    words = _weights_case(kind, tiny_weights, d)
    before = snapshot(d)
    rc, _, err = invoke(["run", "--model", d, "--dtype", "float32"], capfd)
    assert_one_error(rc, err, 2, words)
    assert snapshot(d) == before


@pytest.mark.parametrize("name,build,words", RAW_WEIGHTS, ids=[c[0] for c in RAW_WEIGHTS])
def test_weights_file_corrupt(name, build, words, lab, tiny_dir, tiny_config, capfd):
    d = model_dir(lab / "weights-raw", name, tiny_dir, tiny_config)
    good = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").write_bytes(build(good))
    before = snapshot(d)
    rc, _, err = invoke(["run", "--model", d], capfd)
    assert_one_error(rc, err, 2, words)
    assert "model.safetensors" in err and snapshot(d) == before


INDEX_CASES = [  # model.safetensors.index.json contents -> words
    ("not-json", b"{", "malformed"),
    ("no-weight-map", b'{"metadata": {}}', "malformed"),
    ("map-is-list", b'{"weight_map": ["a"]}', "malformed"),
    ("values-unhashable", b'{"weight_map": {"a": ["x"]}}', "malformed"),
    ("value-int", b'{"weight_map": {"a": 3}}', "not a file name"),
    ("escapes-dir", b'{"weight_map": {"a": "../model.safetensors"}}', "not a file name"),
    ("absolute", b'{"weight_map": {"a": "/etc/passwd"}}', "not a file name"),
    ("missing-shard", b'{"weight_map": {"a": "model-00001-of-00002.safetensors"}}', "lacks shard"),
    ("index-is-list", b"[]", "malformed"),
]


@pytest.mark.parametrize("name,raw,words", INDEX_CASES, ids=[c[0] for c in INDEX_CASES])
def test_weights_index_corrupt(name, raw, words, lab, tiny_dir, tiny_config, capfd):
    d = model_dir(lab / "index", name, tiny_dir, tiny_config)
    (d / "model.safetensors.index.json").write_bytes(raw)
    before = snapshot(d)
    rc, _, err = invoke(["run", "--model", d], capfd)
    assert_one_error(rc, err, 2, words)
    assert snapshot(d) == before


def _deny(monkeypatch, module, target: Path):
    """Make `open` in `module` fail with EACCES for `target`: root ignores chmod, so the refusal a
    user without permission meets is injected where the package opens the file."""
    real = open

    def fake(path, *a, **k):
        if Path(path).resolve() == Path(target).resolve():
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(module, "open", fake, raising=False)


MODEL_PATH_CASES = ["dir-named-gguf", "missing", "plain-file", "empty-dir", "weights-is-dir", "config-is-dir",
                    "unreadable-dir", "unreadable-config", "unreadable-weights", "unreadable-gguf", "bad-repo-id"]


@pytest.mark.parametrize("case", MODEL_PATH_CASES)
def test_model_paths(case, lab, tiny_dir, tiny_config, monkeypatch, capfd):
    import pathlib

    from mlx_tinyllama import gguf as gguf_module
    from mlx_tinyllama import sources

    root = lab / "paths" / case
    root.mkdir(parents=True)
    d = model_dir(root, "m", tiny_dir, tiny_config)
    spec, words = d, None
    if case == "dir-named-gguf":
        (root / "x.gguf").mkdir()
        spec, words = root / "x.gguf", "is a directory"
    elif case == "missing":
        spec, words = root / "absent", "not found"
    elif case == "plain-file":
        (root / "notes.txt").write_text("hello")
        spec, words = root / "notes.txt", "neither a GGUF file nor a model directory"
    elif case == "empty-dir":
        (root / "empty").mkdir()
        spec, words = root / "empty", "no config.json"
    elif case == "weights-is-dir":
        (d / "model.safetensors").unlink()
        (d / "model.safetensors").mkdir()
        words = "is a directory"
    elif case == "config-is-dir":
        (d / "config.json").unlink()
        (d / "config.json").mkdir()
        words = "is a directory"
    elif case == "unreadable-dir":
        real = os.scandir
        monkeypatch.setattr(sources.os, "scandir", lambda p: (_ for _ in ()).throw(
            PermissionError(13, "Permission denied", str(p))) if Path(p) == d else real(p))
        words = "cannot read the directory.*Permission denied"
    elif case == "unreadable-config":
        real_read = pathlib.Path.read_bytes
        monkeypatch.setattr(pathlib.Path, "read_bytes", lambda self: (_ for _ in ()).throw(
            PermissionError(13, "Permission denied", str(self))) if self.name == "config.json" else real_read(self))
        words = "cannot read .*config.json.*Permission denied"
    elif case == "unreadable-weights":
        _deny(monkeypatch, sources, d / "model.safetensors")
        words = "cannot read .*model.safetensors.*Permission denied"
    elif case == "unreadable-gguf":
        g = root / "m.gguf"
        g.write_bytes(b"GGUF" + b"\0" * 64)
        _deny(monkeypatch, gguf_module, g)
        _deny(monkeypatch, sources, g)
        spec, words = g, "cannot read .*Permission denied"
    elif case == "bad-repo-id":
        spec, words = "nobody/none-such-model", "not in the local Hugging Face cache"
    before = snapshot(root)
    rc, _, err = invoke(["run", "--model", spec], capfd)
    assert_one_error(rc, err, 2, words)
    assert snapshot(root) == before


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads files without permission")
@pytest.mark.parametrize("what", ["dir", "config", "weights"])
def test_model_paths_without_permission(what, lab, tiny_dir, tiny_config, capfd):
    d = model_dir(lab / "chmod", what, tiny_dir, tiny_config)
    if what == "weights":
        (d / "model.safetensors").unlink()
        (d / "model.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes())
    target = {"dir": d, "config": d / "config.json", "weights": d / "model.safetensors"}[what]
    target.chmod(0)
    try:
        rc, _, err = invoke(["run", "--model", d], capfd)
    finally:
        target.chmod(0o755)
    assert_one_error(rc, err, 2, "Permission denied")


def test_bench_with_transformers_refuses_other_weight_files(lab, tiny_dir, tiny_config, capfd):
    d = model_dir(lab / "bench", "with-bin", tiny_dir, tiny_config)
    (d / "pytorch_model.bin").write_bytes(b"\0" * 64)
    before = snapshot(d)
    rc, _, err = invoke(["bench", "--model", d, "--dtype", "float32", "--with-transformers", "--prompt-lengths", "4",
                         "--repeats", "1", "--warmup", "0", "--decode-tokens", "1", "--no-mlx-lm",
                         "--no-tap-overhead", "--no-stages"], capfd)
    assert_one_error(rc, err, 2, "pytorch_model.bin")
    assert snapshot(d) == before


@pytest.mark.parametrize("extra", [["extra.safetensors"], ["model.safetensors.index.json"], ["consolidated.pth"]])
def test_other_weight_files_listed(extra, lab, tiny_dir, tiny_config):
    """The check behind --with-transformers, both ways: a clean directory lists nothing."""
    from mlx_tinyllama.sources import other_weight_files

    d = model_dir(lab / "others", extra[0], tiny_dir, tiny_config)
    assert other_weight_files(d) == []
    for name in extra:
        (d / name).write_text('{"weight_map": {"a": "model.safetensors"}}')
    assert other_weight_files(d) == ([] if extra == ["model.safetensors.index.json"] else extra)

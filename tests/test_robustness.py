"""Every command on corrupt, hostile and oversized inputs (issue 17), generated from tables.

Each case runs `trace.main([...])` in-process on a variant of the synthetic tiny model and checks
what a user sees and keeps: the exit code, exactly one `error: ...` line that names what is wrong,
no traceback, and nothing lost (every input file byte-identical afterwards, no stray files). A few
cases run as subprocesses: the exit codes of the real process, SIGTERM.

Probe classes (the `CLASS` of each table) are counted by `test_probe_census` so the suite's size
is visible in its output; see the module's tables for what each class covers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
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
    ("mlp_bias", {"mlp_bias": True}, "mlp_bias"),  # (attention_bias is Llama's q/k/v/o biases: a weights question)
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


@pytest.mark.parametrize("command,words", [("run", "lacks 9198 weight"), ("stability", "does not fit in memory")])
def test_huge_config_refused_without_allocating(command, words, lab, tiny_dir, tiny_config, capfd):
    """Every size at its maximum (35e12 parameters): refused in seconds, by the weights or the memory check."""
    config = {**tiny_config, "hidden_size": 65536, "intermediate_size": 262144, "num_hidden_layers": 1024,
              "num_attention_heads": 512, "num_key_value_heads": 512}
    d = model_dir(lab / "huge", command, tiny_dir, config)
    started = time.monotonic()
    rc, _, err = invoke([command, "--model", d], capfd)
    assert_one_error(rc, err, 2, words)
    assert time.monotonic() - started < 30


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

    from mlx_tinyllama import gguf_header as gguf_module
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


# ---------------------------------------------------------------------------------------------
# GGUF headers and metadata (probe class "gguf"), written byte by byte so every field can be wrong

GGUF_TYPES = {"arr": (9, None), "u8": (0, "B"), "i8": (1, "b"), "u32": (4, "I"), "i32": (5, "i"), "f32": (6, "f"),
              "bool": (7, "?"),
              "str": (8, None), "u64": (10, "Q"), "i64": (11, "q")}


def _gguf_string(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def write_gguf(path: Path, kv: list, tensors: list, alignment: int = 32, version: int = 3,
               n_tensors=None, n_kv=None, cut: int | None = None) -> Path:
    """A GGUF file: `kv` is [(key, type, value)], `tensors` [(name, ne, type_id, data bytes, offset or None)].
    Counts, alignment (written as general.alignment unless 32) and the cut length can be forged."""
    if alignment != 32:
        kind = "str" if not isinstance(alignment, int) else "u64" if alignment >= 1 << 32 else "u32"
        kv = [("general.alignment", kind, alignment), *kv]
    head = b"GGUF" + struct.pack("<I", version)
    head += struct.pack("<QQ", len(tensors) if n_tensors is None else n_tensors, len(kv) if n_kv is None else n_kv)
    for key, kind, value in kv:
        head += _gguf_string(key) + struct.pack("<I", GGUF_TYPES[kind.split(":")[0]][0])
        if kind.startswith("arr:"):  # an array of one element type
            sub = kind[4:]
            head += struct.pack("<IQ", GGUF_TYPES[sub][0], len(value))
            head += b"".join(_gguf_string(v) if sub == "str" else struct.pack("<" + GGUF_TYPES[sub][1], v)
                             for v in value)
        else:
            head += _gguf_string(value) if kind == "str" else struct.pack("<" + GGUF_TYPES[kind][1], value)
    align = alignment if isinstance(alignment, int) and 0 < alignment < 1 << 20 else 32
    offsets, pos = [], 0
    for name, ne, type_id, data, offset in tensors:
        pos = -(-pos // align) * align
        offsets.append(pos if offset is None else offset)
        pos += len(data)
    for (name, ne, type_id, data, _), off in zip(tensors, offsets):
        head += _gguf_string(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", n) for n in ne)
        head += struct.pack("<IQ", type_id, off)
    body = bytearray(head + b"\0" * (-len(head) % align))
    start = len(body)
    for (name, ne, type_id, data, _), off in zip(tensors, offsets):
        need = start + off + len(data)
        if need > 1 << 30:  # a forged offset far beyond the file: its data is simply absent
            continue
        if len(body) < need:
            body += b"\0" * (need - len(body))
        body[start + off:start + off + len(data)] = data
    path.write_bytes(bytes(body if cut is None else body[:cut]))
    return path


def _gguf_parts(cfg: dict, weights: dict):
    """The tiny model as GGUF metadata and F32 tensors (Q/K permuted as llama.cpp stores them)."""
    from mlx_tinyllama.gguf import permute_qk
    from mlx_tinyllama.gguf_write import _gguf_names

    from mlx_tinyllama.config import config_from_hf_dict

    c = config_from_hf_dict(cfg)
    kv = [("general.architecture", "str", "llama"), ("llama.context_length", "u32", c.max_position_embeddings),
          ("llama.embedding_length", "u32", c.hidden_size), ("llama.block_count", "u32", c.num_hidden_layers),
          ("llama.feed_forward_length", "u32", c.intermediate_size),
          ("llama.attention.head_count", "u32", c.num_attention_heads),
          ("llama.attention.head_count_kv", "u32", c.num_key_value_heads),
          ("llama.attention.layer_norm_rms_epsilon", "f32", c.rms_norm_eps),
          ("llama.rope.freq_base", "f32", c.rope_theta)]
    tensors = []
    for hf, g in _gguf_names(c).items():
        w = weights[hf].astype(np.float32)
        if hf.endswith("q_proj.weight"):
            w = permute_qk(w, c.num_attention_heads)
        elif hf.endswith("k_proj.weight"):
            w = permute_qk(w, c.num_key_value_heads)
        tensors.append((g, list(reversed(w.shape)), 0, np.ascontiguousarray(w).tobytes(), None))
    return kv, tensors


def _replace(kv, key, kind, value):
    out = [e for e in kv if e[0] != key]
    return out if kind is None else [*out, (key, kind, value)]


GGUF_KV_CASES = [  # (name, key, type or None to drop, value, words)
    ("head_count=0", "llama.attention.head_count", "u32", 0, "head_count"),
    ("head_count=-1", "llama.attention.head_count", "i32", -1, "head_count"),
    ("head_count=str", "llama.attention.head_count", "str", "4", "head_count.*integer"),
    ("head_count=float", "llama.attention.head_count", "f32", 4.5, "head_count.*integer"),
    ("head_count=bool", "llama.attention.head_count", "bool", True, "head_count.*integer"),
    ("head_count=missing", "llama.attention.head_count", None, None, "lacks.*head_count"),
    ("head_count_kv=3", "llama.attention.head_count_kv", "u32", 3, "num_key_value_heads"),
    ("head_count_kv=0", "llama.attention.head_count_kv", "u32", 0, "num_key_value_heads"),
    ("embedding_length=0", "llama.embedding_length", "u32", 0, "embedding_length"),
    ("embedding_length=str", "llama.embedding_length", "str", "64", "embedding_length.*integer"),
    ("block_count=0", "llama.block_count", "u32", 0, "num_hidden_layers"),
    ("block_count=2^40", "llama.block_count", "u64", 1 << 40, "num_hidden_layers"),
    ("block_count=3", "llama.block_count", "u32", 3, "does not match its own metadata"),
    ("block_count=missing", "llama.block_count", None, None, "lacks.*block_count"),
    ("ffn=str", "llama.feed_forward_length", "str", "172", "feed_forward_length.*integer"),
    ("ffn=2^30", "llama.feed_forward_length", "u64", 1 << 30, "intermediate_size"),
    ("context=0", "llama.context_length", "u32", 0, "max_position_embeddings"),
    ("key_length=15", "llama.attention.key_length", "u32", 15, "head_dim|rope.dimension_count"),
    ("rope_dim=8", "llama.rope.dimension_count", "u32", 8, "rope.dimension_count"),
    ("freq_base=str", "llama.rope.freq_base", "str", "10000", "freq_base.*number"),
    ("freq_base=-1", "llama.rope.freq_base", "f32", -1.0, "rope_theta"),
    ("freq_base=inf", "llama.rope.freq_base", "f32", float("inf"), "freq_base.*finite"),
    ("eps=0", "llama.attention.layer_norm_rms_epsilon", "f32", 0.0, "rms_norm_eps"),
    ("eps=nan", "llama.attention.layer_norm_rms_epsilon", "f32", float("nan"), "rms_epsilon.*finite"),
    ("scaling=yarn", "llama.rope.scaling.type", "str", "yarn", "RoPE scaling"),
    ("scaling_factor=str", "llama.rope.scaling.factor", "str", "2", "scaling.factor.*number"),
    ("arch=gpt2", "general.architecture", "str", "gpt2", "architecture"),
    ("arch=int", "general.architecture", "u32", 7, "architecture"),
    ("bos=huge", "tokenizer.ggml.bos_token_id", "u32", 99999, "bos_token_id"),
    ("eos=str", "tokenizer.ggml.eos_token_id", "str", "2", "eos_token_id.*integer"),
]
GGUF_LAYOUT_CASES = [  # (name, change of write_gguf's arguments or tensors, words)
    ("alignment=0", {"alignment": 0}, "alignment"),
    ("alignment=3", {"alignment": 3}, "alignment"),
    ("alignment=5", {"alignment": 5}, "alignment"),
    ("alignment=12", {"alignment": 12}, "alignment"),
    ("alignment=4", {"alignment": 4}, "alignment"),
    ("alignment=2^40", {"alignment": 1 << 40}, "alignment|truncated"),
    ("alignment=str", {"alignment": "32"}, "alignment"),
    ("n_tensors=2^60", {"n_tensors": 1 << 60}, "tensors"),
    ("n_kv=2^60", {"n_kv": 1 << 60}, "metadata keys"),
    ("n_kv+1", {"n_kv_extra": 1}, "truncated|corrupt|unknown"),
    ("version=1", {"version": 1}, "version 1"),
    ("version=4", {"version": 4}, "version 4"),
    ("big-endian", {"version": 3 << 24}, "big-endian"),
    ("cut-in-header", {"cut": 40}, "truncated"),
    ("cut-in-data", {"cut_data": 100}, "truncated"),
    ("offset-misaligned", {"tensor": ("offset", 4)}, "alignment"),
    ("offset-beyond-file", {"tensor": ("offset", 1 << 40)}, "truncated"),
    ("dims=5", {"tensor": ("ne", [64, 1, 1, 1, 1])}, "dimensions"),
    ("dim=0", {"tensor": ("ne", [64, 0])}, "dimensions"),
    ("shape-40000^2", {"tensor": ("ne", [40000, 40000])}, "truncated"),
    ("type=99", {"tensor": ("type", 99)}, "unknown ggml type"),
    ("type=4-removed", {"tensor": ("type", 4)}, "unknown ggml type"),
    ("q8-row-not-block", {"tensor": ("q8", 33)}, "block"),
    ("shape-mismatch", {"tensor": ("ne", [64, 100])}, "shape|truncated"),
    ("unknown-tensor", {"extra_tensor": "blk.0.attn_qkv.weight"}, "does not know"),
    ("no-embedding", {"drop_tensor": "token_embd.weight"}, "token_embd"),
    ("unknown-value-type", {"raw_kv": (b"x", 99)}, "unknown GGUF value type|corrupt"),
    ("huge-key-length", {"raw_kv_len": 1 << 60}, "truncated"),
    ("huge-array", {"raw_array": 1 << 60}, "does not fit|truncated"),
]


@pytest.fixture(scope="session")
def gguf_parts(tiny_config, tiny_weights):
    return _gguf_parts(tiny_config, tiny_weights)


def _forge(path: Path, kv, tensors, change: dict) -> Path:
    kv, tensors = list(kv), list(tensors)
    args = {k: v for k, v in change.items() if k in ("alignment", "version", "n_tensors", "n_kv", "cut")}
    if "n_kv_extra" in change:
        args["n_kv"] = len(kv) + change["n_kv_extra"]
    if "tensor" in change:  # change the first tensor (token_embd)
        what, value = change["tensor"]
        name, ne, type_id, data, off = tensors[0]
        if what == "offset":
            off = value
        elif what == "ne":
            ne = value
        elif what == "type":
            type_id = value
        elif what == "q8":
            ne, type_id, data = [value, 4], 8, b"\0" * 200
        tensors[0] = (name, ne, type_id, data, off)
    if "extra_tensor" in change:
        tensors.append((change["extra_tensor"], [64], 0, b"\0" * 256, None))
    if "drop_tensor" in change:
        tensors = [t for t in tensors if t[0] != change["drop_tensor"]]
    write_gguf(path, kv, tensors, **args)
    if "cut_data" in change:
        path.write_bytes(path.read_bytes()[:-change["cut_data"]])
    if {"raw_kv", "raw_kv_len", "raw_array"} & set(change):  # one more key of a forged encoding, counted
        data = bytearray(path.read_bytes())
        n_kv = struct.unpack_from("<Q", data, 16)[0]
        struct.pack_into("<Q", data, 16, n_kv + 1)
        if "raw_kv" in change:
            extra = _gguf_string(change["raw_kv"][0]) + struct.pack("<I", change["raw_kv"][1])
        elif "raw_kv_len" in change:
            extra = struct.pack("<Q", change["raw_kv_len"]) + b"key"
        else:
            extra = _gguf_string("x.array") + struct.pack("<IIQ", 9, 4, change["raw_array"])
        path.write_bytes(bytes(data[:24]) + extra + bytes(data[24:]))
    return path


def test_gguf_writer_control(gguf_parts, lab, capfd):
    """The forged files start from a valid one: the writer's output loads, with the tiny model's logits."""
    from mlx_tinyllama import sources

    kv, tensors = gguf_parts
    p = write_gguf(lab / "control.gguf", kv, tensors)
    g = sources.load(str(p), "float32")
    h = sources.load("synthetic:tiny", "float32")
    import mlx.core as mx

    ids = mx.array([1, 529, 29989, 5205])
    assert np.allclose(np.array(g.model(ids)), np.array(h.model(ids)), atol=1e-4)
    p16 = write_gguf(lab / "control16.gguf", kv, tensors, alignment=16)  # another valid alignment
    assert sources.load(str(p16), "float32").config == g.config


@pytest.mark.parametrize("name,key,kind,value,words", GGUF_KV_CASES, ids=[c[0] for c in GGUF_KV_CASES])
def test_gguf_metadata(name, key, kind, value, words, gguf_parts, lab, capfd):
    kv, tensors = gguf_parts
    p = write_gguf(lab / f"kv-{name}.gguf", _replace(kv, key, kind, value), tensors)
    before = snapshot(p)
    rc, _, err = invoke(["run", "--model", p, "--dtype", "float32"], capfd)
    assert_one_error(rc, err, 2, words)
    assert snapshot(p) == before


GGUF_TOKENIZER_CASES = [  # tokenizer.ggml.* (read by `tokens --model x.gguf`): (name, kv changes, words)
    ("no-tokenizer", [], "no tokenizer"),
    ("model=gpt2", [("tokenizer.ggml.model", "str", "gpt2")], "tokenizer.ggml.model"),
    ("tokens-ints", [("tokenizer.ggml.tokens", "arr:u32", [1, 2, 3])], "tokens.*strings"),
    ("scores-strings", [("tokenizer.ggml.scores", "arr:str", ["a", "b", "c"])], "scores.*numbers"),
    ("types-floats", [("tokenizer.ggml.token_type", "arr:f32", [1.0, 1.0, 1.0])], "token_type.*numbers"),
    ("scores-count", [("tokenizer.ggml.scores", "arr:f32", [0.0])], "3 tokens but 1 scores"),
    ("bos-string", [("tokenizer.ggml.bos_token_id", "str", "1")], "bos_token_id"),
    ("tokens-scalar", [("tokenizer.ggml.tokens", "str", "abc")], "tokens.*strings|no tokenizer"),
]


@pytest.mark.parametrize("name,changes,words", GGUF_TOKENIZER_CASES, ids=[c[0] for c in GGUF_TOKENIZER_CASES])
def test_gguf_tokenizer(name, changes, words, gguf_parts, lab, capfd):
    kv, tensors = gguf_parts
    if name != "no-tokenizer":
        kv = [*kv, ("tokenizer.ggml.model", "str", "llama"),
              ("tokenizer.ggml.tokens", "arr:str", ["<unk>", "<s>", "</s>"])]
    for key, kind, value in changes:
        kv = _replace(kv, key, kind, value)
    p = write_gguf(lab / f"tok-{name}.gguf", kv, tensors)
    rc, _, err = invoke(["tokens", "--model", p, "--token-ids", "1"], capfd)
    assert_one_error(rc, err, 2, words)


@pytest.mark.parametrize("name,change,words", GGUF_LAYOUT_CASES, ids=[c[0] for c in GGUF_LAYOUT_CASES])
def test_gguf_layout(name, change, words, gguf_parts, lab, capfd):
    kv, tensors = gguf_parts
    p = _forge(lab / f"layout-{name}.gguf", kv, tensors, change)
    before = snapshot(p)
    rc, _, err = invoke(["run", "--model", p, "--dtype", "float32"], capfd)
    assert_one_error(rc, err, 2, words)
    assert snapshot(p) == before


# ---------------------------------------------------------------------------------------------
# Options: generate's sampling, paths' lengths, combinations that cannot take effect (class "options")

GENERATE_CASES = [  # extra argv -> words (every case samples unless it says --temperature 0)
    ("top-k=vocab", ["--top-k", "32000"], "--top-k 32000"),
    ("top-k>vocab", ["--top-k", "32001"], "--top-k"),
    ("top-k=-1", ["--top-k", "-1"], "--top-k"),
    ("seed=-1", ["--seed", "-1"], "--seed"),
    ("seed=2^64", ["--seed", str(2**64)], "--seed"),
    ("temperature=inf", ["--temperature", "inf"], "--temperature"),
    ("temperature=nan", ["--temperature", "nan"], "--temperature"),
    ("temperature=-1", ["--temperature", "-1"], "--temperature"),
    ("top-p=nan", ["--top-p", "nan"], "--top-p"),
    ("top-p=0", ["--top-p", "0"], "--top-p"),
    ("top-p=1.5", ["--top-p", "1.5"], "--top-p"),
    ("max-tokens=0", ["--max-tokens", "0"], "--max-tokens"),
    ("max-tokens=-5", ["--max-tokens", "-5"], "--max-tokens"),
    ("tap-step=-1", ["--tap-step", "-1"], "--tap-step"),
    ("tap-step>=max", ["--tap-step", "3"], "--tap-step"),
    ("taps-without-step", ["--taps", "logits"], "--tap-step"),
    ("tap-glob-nothing", ["--tap-step", "0", "--taps", "nope"], "nope"),
]


@pytest.mark.parametrize("name,extra,words", GENERATE_CASES, ids=[c[0] for c in GENERATE_CASES])
def test_generate_options(name, extra, words, tiny_dir, capfd):
    rc, _, err = invoke(["generate", "--model", tiny_dir, "--dtype", "float32", "--max-tokens", "3",
                         "--temperature", "0.7", *extra], capfd)
    assert_one_error(rc, err, 2, words)


@pytest.mark.parametrize("extra", [["--top-k", "31999", "--seed", "0"], ["--seed", str(2**64 - 1)],
                                   ["--top-p", "0.5", "--seed", "3"]])
def test_generate_options_accepted(extra, tiny_dir, capfd):
    """The limits are the real ones: just inside them generation runs (greedy with --top-k is refused:
    test_contracts_unused_option)."""
    rc, out, err = invoke(["generate", "--model", tiny_dir, "--dtype", "float32", "--max-tokens", "2",
                           "--temperature", "0.7", *extra], capfd)
    assert rc == 0, err


PATHS_CASES = [
    ("continue=100000", ["--continue", "100000"], "--continue 100000.*max_position_embeddings"),
    ("continue=-1", ["--continue", "-1"], "--continue"),
    ("chunk=0", ["--chunk", "0"], "--chunk"),
    ("chunk=1", ["--chunk", "1"], "--chunk"),
    ("chunk>T", ["--chunk", "1000"], "--chunk"),
    ("tol-glob-nothing", ["--tol", "layers.99.attn.q:nmse=1e-3"], "layers.99.attn.q"),
    ("tol-typo", ["--tol", "layer.0.attn.q:nmse=1e-3"], "layer.0.attn.q"),
    ("tol-not-number", ["--tol", "nmse=abc"], "not a number"),
    ("tol-negative", ["--tol", "nmse=-1"], ">= 0"),
    ("fault-unknown", ["--fault", "nope"], "nope"),
]


@pytest.mark.parametrize("name,extra,words", PATHS_CASES, ids=[c[0] for c in PATHS_CASES])
def test_paths_options(name, extra, words, tiny_dir, capfd):
    rc, _, err = invoke(["paths", "--model", tiny_dir, "--dtype", "float32", "--token-ids", "1,2,3,4,5,6", *extra],
                        capfd)
    assert_one_error(rc, err, 2, words)


RUN_COMBINATIONS = [  # options of `run` that cannot take effect together
    ("compare+dump", lambda r, ref: ["--compare", ref, "--dump", r / "x.safetensors"], "--dump.*--compare"),
    ("compare+taps", lambda r, ref: ["--compare", ref, "--taps", "logits"], "--taps.*--compare"),
    ("tol-without-compare", lambda r, ref: ["--tol", "nmse=1e-3"], "--tol.*needs --compare"),
    ("compare+tol-nothing", lambda r, ref: ["--compare", ref, "--tol", "layers.7.attn.q:nmse=1e-3"], "layers.7"),
    ("json=dump", lambda r, ref: ["--json", r / "x.safetensors", "--dump", r / "x.safetensors"], "same path"),
    ("report=json", lambda r, ref: ["--json", r / "x.json", "--report", r / "x.json"], "same path"),
    ("top-k=0", lambda r, ref: ["--top-k", "0"], "--top-k"),
    ("taps-nothing", lambda r, ref: ["--taps", "nope", "--dump", r / "n.safetensors"], "nope|tap"),
]


@pytest.mark.parametrize("name,build,words", RUN_COMBINATIONS, ids=[c[0] for c in RUN_COMBINATIONS])
def test_run_option_combinations(name, build, words, lab, tiny_dir, stats_ref, capfd):
    r = lab / "combos" / name
    r.mkdir(parents=True)
    rc, _, err = invoke(["run", "--model", tiny_dir, "--dtype", "float32", "--token-ids", "1,2,3",
                         *build(r, stats_ref)], capfd)
    assert_one_error(rc, err, 2, words)
    assert list(r.iterdir()) == []  # no output written, none half-written


def test_paths_continue_at_the_limit_runs(lab, tiny_dir, tiny_config, capfd):
    """--continue exactly filling the context is allowed (the check is not off by one)."""
    d = model_dir(lab / "ctx", "ctx16", tiny_dir, {**tiny_config, "max_position_embeddings": 16})
    rc, _, err = invoke(["paths", "--model", d, "--dtype", "float32", "--token-ids", "1,2,3,4,5,6",
                         "--continue", "10", "--chunk", "2"], capfd)
    assert rc == 0, err
    rc, _, err = invoke(["paths", "--model", d, "--dtype", "float32", "--token-ids", "1,2,3,4,5,6",
                         "--continue", "11", "--chunk", "2"], capfd)
    assert_one_error(rc, err, 2, "--continue 11.*room for 10")


# ---------------------------------------------------------------------------------------------
# Chat templates from a model directory (class "template"): bounded in steps, size and time

HOSTILE_TEMPLATES = [
    ("nested-loops", "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}", "steps"),
    ("nested-output", "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}", "steps"),
    ("str-times-huge", "{{ 'x' * 1000000000 }}", "multiplies"),
    ("huge-times-str", "{{ 1000000000 * 'x' }}", "multiplies"),
    ("list-times-huge", "{{ ['x'] * 1000000000 }}", "multiplies"),
    ("power", "{{ 10 ** 100000 }}", "power"),
    ("power-tower", "{{ ((10 ** 64) ** 64) ** 64 ** 2 }}", "integer|power"),
    ("recursion", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recurses"),
    ("center", "{{ 'x'|center(1000000000) }}", "filter argument"),
    ("indent", "{{ 'x'|indent(1000000000, true) }}", "filter argument"),
    ("format-width", "{{ '%1000000000s' % 'x' }}", "width"),
    ("concat-doubling", "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
                        "{% endfor %}{{ ns.s }}", "builds a value"),
    ("concat-unrolled", "{% set a = 'xx' %}" + "{% set a = a ~ a %}" * 60 + "{{ a }}", "builds a value"),
    ("replace-blowup", "{{ (('a' ~ 'b') * 500000) | replace('a', 'aaaaaaaaaaaaaaaaaaaaaaaa') }}", "builds a value"),
    ("dunder", "{{ ''.__class__.__mro__ }}", "unsafe"),
    ("mutate", "{{ messages.append(1) }}", "unsafe"),
    ("raise", "{{ raise_exception('no system messages') }}", "no system messages"),
    ("syntax", "{% for", "does not parse"),
    ("zero-division", "{{ 1 / 0 }}", "ZeroDivisionError"),
    ("undefined-call", "{{ nothing() }}", "chat template failed"),
]
TEMPLATE_FILES = [  # (file, bytes, words)
    ("chat_template.jinja", b"\xff\xfe{{ x }}", "UTF-8"),
    ("tokenizer_config.json", b"{", "not valid JSON"),
    ("tokenizer_config.json", b'{"chat_template": 5}', "chat_template"),
    ("tokenizer_config.json", b'{"chat_template": [{"name": "tool_use", "template": "x"}]}', "default"),
    ("tokenizer_config.json", b'{"pad": "' + b"x" * (17 << 20) + b'"}', "bytes"),
]


def _template_dir(lab: Path, name: str) -> Path:
    d = lab / "templates" / name
    d.mkdir(parents=True)
    (d / "tokenizer.model").symlink_to(PACKAGE_TOKENIZER)
    return d


@pytest.mark.parametrize("name,template,words", HOSTILE_TEMPLATES, ids=[c[0] for c in HOSTILE_TEMPLATES])
def test_chat_template_bounded(name, template, words, lab, capfd):
    d = _template_dir(lab, name)
    (d / "chat_template.jinja").write_text(template)
    before = snapshot(d)
    started = time.monotonic()
    rc, _, err = invoke(["tokens", "--model", d, "--chat", "hi"], capfd)
    assert time.monotonic() - started < 15  # the budget's 10 s at worst; most stop in milliseconds
    assert_one_error(rc, err, 2, words)
    assert snapshot(d) == before


@pytest.mark.parametrize("file,raw,words", TEMPLATE_FILES, ids=[f"{c[0]}-{i}" for i, c in enumerate(TEMPLATE_FILES)])
def test_chat_template_files(file, raw, words, lab, capfd):
    d = _template_dir(lab, f"{file}-{len(raw)}-{hashlib.sha1(raw).hexdigest()[:6]}")
    (d / file).write_bytes(raw)
    rc, _, err = invoke(["tokens", "--model", d, "--chat", "hi"], capfd)
    assert_one_error(rc, err, 2, words)


def test_chat_template_budget_allows_real_templates(lab, capfd):
    """The other side: a loop-heavy but sane template (a few thousand steps) renders."""
    d = _template_dir(lab, "sane")
    (d / "chat_template.jinja").write_text("{% for m in messages %}{% for i in range(1000) %}{% endfor %}"
                                           "<|{{ m['role'] }}|>\n{{ m['content'] * 3 }}{{ eos_token }}\n{% endfor %}")
    rc, out, err = invoke(["tokens", "--model", d, "--chat", "hi"], capfd)
    assert rc == 0, err
    assert "hihihi" in out.replace("▁", "").replace(" ", "") or "hi" in out


# ---------------------------------------------------------------------------------------------
# Prompts and token lists (class "prompt"): sizes bounded, every malformed list one line

PROMPT_CASES = [  # (name, argv builder given a scratch dir, words)
    ("prompt-file-10MB", lambda d: ["--prompt-file", _big(d / "big.txt", 10 << 20)], "bytes"),
    ("prompt-file-missing", lambda d: ["--prompt-file", d / "absent.txt"], "does not exist"),
    ("prompt-file-dir", lambda d: ["--prompt-file", d], "is a directory"),
    ("prompt-file-latin1", lambda d: ["--prompt-file", _write(d / "l1.txt", "café".encode("latin-1"))], "UTF-8"),
    ("prompt-2MB", lambda d: ["--prompt", "x" * (2 << 20)], "bytes"),
    ("chat-2MB", lambda d: ["--chat", "x" * (2 << 20)], "bytes"),
    ("system-without-chat", lambda d: ["--system", "be brief"], "--system needs --chat"),
    ("ids-empty", lambda d: ["--token-ids", ""], "--token-ids: an empty value"),  # (the CLI refuses any empty value)
    ("ids-brackets-empty", lambda d: ["--token-ids", "[]"], "no token ids"),
    ("ids-double-comma", lambda d: ["--token-ids", "1,,2"], "not an integer"),
    ("ids-word", lambda d: ["--token-ids", "1,abc"], "not an integer"),
    ("ids-float", lambda d: ["--token-ids", "1,2.5"], "not an integer"),
    ("ids-negative", lambda d: ["--token-ids", "1,-3"], "outside the vocabulary"),
    ("ids-too-big", lambda d: ["--token-ids", "1,32000"], "outside the vocabulary"),
    ("ids-huge-int", lambda d: ["--token-ids", "1," + "9" * 40], "outside the vocabulary"),
    ("ids-huge-digits", lambda d: ["--token-ids", "9" * 5000], "not an integer|outside"),
    ("prompt-lone-surrogate", lambda d: ["--prompt", "caf\udce9"], "not valid UTF-8"),
    ("chat-lone-surrogate", lambda d: ["--chat", "caf\udce9"], "not valid UTF-8"),
]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _big(path: Path, n: int) -> Path:
    if not path.exists():
        path.write_bytes(b"hello world " * (n // 12 + 1))
    return path


@pytest.mark.parametrize("command", ["tokens", "run"])
@pytest.mark.parametrize("name,build,words", PROMPT_CASES, ids=[c[0] for c in PROMPT_CASES])
def test_prompt_inputs(command, name, build, words, lab, tiny_dir, capfd):
    scratch = lab / "prompts"
    scratch.mkdir(exist_ok=True)
    argv = [str(a) for a in build(scratch)]
    before = snapshot(scratch)
    started = time.monotonic()
    rc, _, err = invoke([command, "--model", tiny_dir, *(["--dtype", "float32"] if command == "run" else []), *argv],
                        capfd)
    assert_one_error(rc, err, 2, words)
    assert time.monotonic() - started < 20
    assert snapshot(scratch) == before


@pytest.mark.parametrize("name,ids,words", [
    ("compare-ids-word", "1,x", "not an integer"), ("compare-ids-outside", "1,40000", "outside the vocabulary"),
    ("compare-ids-empty", "", "--compare-ids: an empty value")])
def test_compare_ids(name, ids, words, capfd):
    rc, _, err = invoke(["tokens", "--prompt", "hello", "--compare-ids", ids], capfd)
    assert_one_error(rc, err, 2, words)


def test_long_prompt_over_context_refused_for_run(tiny_dir, capfd):
    rc, _, err = invoke(["run", "--model", tiny_dir, "--token-ids", ",".join(["5"] * 3000)], capfd)
    assert_one_error(rc, err, 2, "3000 tokens.*max_position_embeddings")


def test_tokens_table_bounded(lab, monkeypatch, capfd):
    """A long (accepted) prompt prints a bounded table but every id."""
    from mlx_tinyllama.commands import tokens

    monkeypatch.setattr(tokens, "MAX_ROWS", 100)  # the real bound (4096) works the same, only slower to show
    MAX_ROWS = tokens.MAX_ROWS
    p = _write(lab / "long.txt", b"hello world " * 100)
    rc, out, err = invoke(["tokens", "--prompt-file", p], capfd)
    assert rc == 0, err
    ids_line = next(ln for ln in out.splitlines() if ln.startswith("ids: "))
    n = len(json.loads(ids_line[5:]))
    assert n > MAX_ROWS and f"{n - MAX_ROWS} more tokens not shown" in out


# ---------------------------------------------------------------------------------------------
# Outputs (class "outputs"): never an input, never inside a model or the cache, never two the same;
# written atomically, so a failure or an interrupt leaves the earlier file and no partial one

OLD = b'{"earlier": "result"}\n'


def _outputs_case(case: str, root: Path, tiny_dir: Path, cfg: dict, ref: Path):
    """(argv, files that must stay byte-identical, words)."""
    d = root / "model"
    if not d.exists():
        model_dir(root, "model", tiny_dir, cfg)
    prompt = _write(root / "prompt.txt", b"Hello")
    (root / "p").mkdir(exist_ok=True)
    base = ["run", "--model", d, "--dtype", "float32", "--token-ids", "1,2,3"]
    cases = {
        "json=config": (base + ["--json", d / "config.json"], "input|inside"),
        "dump=weights": (base + ["--dump", d / "model.safetensors"], "input|inside"),
        "json=in-model-dir": (base + ["--json", d / "out.json"], "inside the model directory"),
        "report=in-model-dir": (base + ["--report", d / "r.html"], "inside the model directory"),
        "plots=model-dir": (base + ["--plots", d], "input of this run|inside the model directory"),
        "json=prompt-file": (["run", "--model", d, "--dtype", "float32", "--prompt-file", prompt, "--json", prompt],
                             "input of this run"),
        "json=dump": (base + ["--json", root / "x.safetensors", "--dump", root / "x.safetensors"], "same path"),
        "json=report": (base + ["--json", root / "x.html", "--report", root / "x.html"], "same path"),
        "json-in-plots": (base + ["--json", root / "p" / "a.json", "--plots", root / "p"], "same path"),
        "json=synthetic-cache": (["run", "--model", "synthetic:tiny", "--dtype", "float32", "--json",
                                  Path(os.environ["MLX_TINYLLAMA_CACHE"]) / "x.json"], "synthetic model cache"),
        "json=cached-config": (["run", "--model", "synthetic:tiny", "--dtype", "float32", "--json",
                                tiny_dir / "config.json"], "synthetic model cache"),
        "compare-json=ref": (["compare", "--ref", ref, "--model", d, "--dtype", "float32", "--json", ref],
                             "input of this run"),
        "against-json=against": (["compare", "--ref", ref, "--against", ref, "--json", ref], "input of this run"),
        "run-compare-json=ref": (base + ["--compare", ref, "--json", ref], "input of this run"),
        "gen-json=config": (["generate", "--model", d, "--dtype", "float32", "--max-tokens", "1", "--json",
                             d / "config.json"], "input|inside"),
        "tokens-json=prompt": (["tokens", "--prompt-file", prompt, "--json", prompt], "input of this run"),
        "json=/dev/full": (base + ["--json", "/dev/full"], "not a regular file"),
        "json=dir": (base + ["--json", root], "is a directory"),
        "json-no-parent": (base + ["--json", root / "absent" / "x.json"], "does not exist"),
        "dump-not-safetensors": (base + ["--dump", root / "x.bin"], "safetensors"),
        "plots=file": (base + ["--plots", prompt], "not a directory"),
        "json-hardlink-to-config": (base + ["--json", _hardlink(d / "config.json", root / "hl.json")], "input|inside"),
        "json-symlink-to-config": (base + ["--json", _symlink(d / "config.json", root / "sl.json")], "input|inside"),
    }
    argv, words = cases[case]
    return argv, words


def _hardlink(src: Path, dst: Path) -> Path:
    if not dst.exists():
        os.link(src, dst)
    return dst


def _symlink(src: Path, dst: Path) -> Path:
    if not dst.is_symlink():
        dst.symlink_to(src)
    return dst


OUTPUT_CASES = ["json=config", "dump=weights", "json=in-model-dir", "report=in-model-dir", "plots=model-dir",
                "json=prompt-file", "json=dump", "json=report", "json-in-plots", "json=synthetic-cache",
                "json=cached-config", "compare-json=ref", "against-json=against", "run-compare-json=ref",
                "gen-json=config", "tokens-json=prompt", "json=/dev/full", "json=dir", "json-no-parent",
                "dump-not-safetensors", "plots=file", "json-hardlink-to-config", "json-symlink-to-config"]


@pytest.fixture(scope="session")
def stats_ref(lab, tiny_dir):
    """A stats JSON reference written by `run --json` (the shape compare reads)."""
    p = lab / "ref-stats.json"
    rc = trace.main(["run", "--model", str(tiny_dir), "--dtype", "float32", "--token-ids", "1,2,3", "--json", str(p)])
    assert rc == 0
    return p


@pytest.mark.parametrize("case", OUTPUT_CASES)
def test_outputs_never_clobber(case, lab, tiny_dir, tiny_config, stats_ref, capfd):
    root = lab / "outputs"
    root.mkdir(exist_ok=True)
    argv, words = _outputs_case(case, root, tiny_dir, tiny_config, stats_ref)
    watched = [root, tiny_dir, stats_ref]
    before = snapshot(*watched)
    rc, _, err = invoke(argv, capfd)
    assert_one_error(rc, err, 2, words)
    assert snapshot(*watched) == before  # every input intact, nothing new anywhere


def fail_with_partial(exc):
    """A GGUFWriter method that fails after the header went out: the temporary file is half written."""
    def f(self, *a, **k):
        self.fout[0].write(b"partial") if getattr(self, "fout", None) else None
        raise exc
    return f


def _existing(path: Path) -> Path:
    path.write_bytes(OLD)
    return path


FAILING_WRITES = [  # (name, what fails, exit code, words)
    ("enospc-json", "fsync", 1, "No space left"),
    ("eio-json", "fsync-eio", 1, "Input/output error"),
    ("readonly-dir", "mkstemp", 1, "Read-only file system"),
    ("interrupt-in-write", "interrupt", 130, "interrupted"),
    ("enospc-dump", "dump", 1, "No space left"),
    ("interrupt-in-dump", "dump-interrupt", 130, "interrupted"),
    ("interrupt-in-gguf", "gguf", 130, "interrupted"),
]


@pytest.mark.parametrize("name,fail,code,words", FAILING_WRITES, ids=[c[0] for c in FAILING_WRITES])
def test_failed_write_keeps_the_earlier_file(name, fail, code, words, lab, tiny_dir, monkeypatch, capfd):
    import errno

    import mlx.core as mx

    from mlx_tinyllama import outputs

    out_dir = lab / "failing" / name
    out_dir.mkdir(parents=True)
    if fail == "gguf":  # the GGUF converter (scripts/hf_to_gguf.py), interrupted while writing tensors
        import gguf

        target = _existing(out_dir / "m.gguf")
        before = snapshot(out_dir, tiny_dir)
        monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail_with_partial(KeyboardInterrupt()))
        from mlx_tinyllama.gguf_write import convert

        with pytest.raises(KeyboardInterrupt):
            convert(tiny_dir, target, "f32")
        assert target.read_bytes() == OLD and snapshot(out_dir, tiny_dir) == before
        return
    target = _existing(out_dir / ("out.safetensors" if "dump" in fail else "out.html" if fail == "report"
                                  else "out.json"))
    option = "--dump" if "dump" in fail else "--report" if fail == "report" else "--json"

    def fail_with(exc):
        def f(*a, **k):
            raise exc
        return f

    if fail in ("fsync", "report"):
        monkeypatch.setattr(outputs.os, "fsync", fail_with(OSError(errno.ENOSPC, "No space left on device")))
    elif fail == "fsync-eio":
        monkeypatch.setattr(outputs.os, "fsync", fail_with(OSError(errno.EIO, "Input/output error")))
    elif fail == "mkstemp":
        monkeypatch.setattr(outputs.tempfile, "mkstemp", fail_with(OSError(errno.EROFS, "Read-only file system")))
    elif fail == "interrupt":
        monkeypatch.setattr(outputs.os, "fsync", fail_with(KeyboardInterrupt()))
    else:
        real = mx.save_safetensors

        def partial(path, arrays, metadata=None):  # half a file, then the failure
            real(path, arrays, metadata=metadata)
            Path(path).write_bytes(Path(path).read_bytes()[:100])
            raise (KeyboardInterrupt() if "interrupt" in fail else OSError(errno.ENOSPC, "No space left on device"))

        monkeypatch.setattr(mx, "save_safetensors", partial)
    before = snapshot(out_dir, tiny_dir)
    rc, _, err = invoke(["run", "--model", tiny_dir, "--dtype", "float32", "--token-ids", "1,2,3",
                         option, target], capfd)
    assert_one_error(rc, err, code, words)
    assert target.read_bytes() == OLD
    assert snapshot(out_dir, tiny_dir) == before  # no temporary file left beside it


# A failed write is exit 1 naming the path whichever library raised it (issue 24 item 5): MLX raises
# RuntimeError, not OSError, for a full disk; safetensors' Rust writer SafetensorError.
MLX_FULL_DISK = RuntimeError("[write] Unable to write 1048576 bytes to file.")


@pytest.mark.parametrize("exc,is_write", [
    (OSError(28, "No space left on device"), True),
    (MLX_FULL_DISK, True),
    (RuntimeError("[save_safetensors] Failed to open file /x/y.safetensors"), True),
    (type("SafetensorError", (Exception,), {})("Error while serializing: IoError(Os { code: 28, kind: "
                                               "StorageFull, message: \"No space left on device\" })"), True),
    (RuntimeError("[eval] Attempting to eval an array without a primitive"), False),
    (ValueError("could not broadcast"), False),
    (TypeError("unhashable type"), False),
    (KeyboardInterrupt(), False),
])
def test_failed_write_classified(exc, is_write):
    from mlx_tinyllama.outputs import write_failure

    assert (write_failure(exc) is not None) == is_write


def test_failed_write_a_bug_stays_a_bug(lab):
    """The other side: an error inside a write that is not a failed write is not called one (exit 3, not 1)."""
    from mlx_tinyllama import outputs

    target = _existing(lab / "bug.json")
    with pytest.raises(TypeError):
        with outputs.atomic_path(target):
            raise TypeError("a bug")
    assert target.read_bytes() == OLD and [p.name for p in lab.glob(".bug.json*")] == []


@pytest.fixture(scope="session")
def quick_vectors(lab):
    d = lab / "vectors-quick"
    rc = trace.main(["vectors", "write", str(d), "--model", "synthetic:tiny", "--dtype", "float32", "--quick"])
    assert rc == 0
    return d


LIBRARY_WRITES = ["run-dump", "vectors-write", "vectors-run", "run-json-mlx-style"]


@pytest.mark.parametrize("case", LIBRARY_WRITES)
def test_failed_write_from_any_library(case, lab, tiny_dir, quick_vectors, monkeypatch, capfd):
    import mlx.core as mx

    from mlx_tinyllama import outputs

    out = lab / "library-writes" / case
    out.mkdir(parents=True)
    real = mx.save_safetensors

    def full_disk(path, *a, **k):  # half a file, then MLX's error
        real(path, *a, **k)
        Path(path).write_bytes(Path(path).read_bytes()[:64])
        raise MLX_FULL_DISK

    monkeypatch.setattr(mx, "save_safetensors", full_disk)
    if case == "run-dump":
        target = _existing(out / "d.safetensors")
        argv = ["run", "--model", tiny_dir, "--dtype", "float32", "--token-ids", "1,2,3", "--dump", target]
    elif case == "vectors-write":
        target = out / "vec"
        argv = ["vectors", "write", target, "--model", "synthetic:tiny", "--dtype", "float32", "--quick"]
    elif case == "vectors-run":
        target = _existing(out / "results.safetensors")
        argv = ["vectors", "run", quick_vectors, "--engine", "mlx_tinyllama.vectors.engine:fused", "--out", target,
                "--ops", "rms_norm"]
    else:  # a JSON write that fails with a non-OSError (as a library wrapping the file would raise)
        target = _existing(out / "r.json")
        monkeypatch.setattr(outputs.os, "fsync", lambda fd: (_ for _ in ()).throw(MLX_FULL_DISK))
        argv = ["run", "--model", tiny_dir, "--dtype", "float32", "--token-ids", "1,2,3", "--json", target]
    before = snapshot(out, quick_vectors)
    rc, _, err = invoke(argv, capfd)
    assert_one_error(rc, err, 1, "cannot write .*" + re.escape(target.name) + ".*Unable to write")
    if target.is_file():
        assert target.read_bytes() == OLD
    after = snapshot(out, quick_vectors)
    if case == "vectors-write":  # what a failed set-write leaves is the bounds work's (issue 24 item 2)
        return
    assert after == before


@pytest.mark.skipif(os.name == "nt", reason="a shebang script stands in for llama-eval-callback")
@pytest.mark.parametrize("fail", [False, True])
def test_failed_write_llamacpp_log(fail, lab, tiny_dir, monkeypatch, capfd):
    """`llamacpp --log` (was written in place, unchecked): the binary's output replaces the earlier log in
    one rename; a failed write is exit 1 naming it, the earlier log intact, no temporary file left."""
    from mlx_tinyllama import outputs
    from mlx_tinyllama.gguf_write import convert

    root = lab / "llamacpp-log" / str(fail)
    root.mkdir(parents=True)
    gguf = root / "m.gguf"
    convert(tiny_dir, gguf, "f32")
    binary = _write(root / "llama-eval-callback", b"#!/bin/sh\necho 'not a log line'\n")
    binary.chmod(0o755)
    log = _existing(root / "llama.log")
    if fail:
        monkeypatch.setattr(outputs.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on "
                                                                                          "device")))
    rc, _, err = invoke(["llamacpp", "--gguf", gguf, "--llama-cpp", binary, "--prompt", "hi", "--log", log], capfd)
    if fail:
        assert_one_error(rc, err, 1, "cannot write .*llama.log.*No space left")
        assert log.read_bytes() == OLD
    else:  # written, then refused as a log that is not llama.cpp's (exit 2)
        assert rc == 2 and log.read_text() == "not a log line\n", err
    assert sorted(p.name for p in root.iterdir()) == ["llama-eval-callback", "llama.log", "m.gguf"]


def test_model_paths_unlistable_dir(lab, tiny_dir, tiny_config, monkeypatch, capfd):
    """A model directory the user cannot list: exit 2 naming it (was exit 3 from the output check)."""
    import pathlib

    d = model_dir(lab / "unlistable", "m", tiny_dir, tiny_config)
    real = pathlib.Path.iterdir

    def deny(self):
        if self == d:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(pathlib.Path, "iterdir", deny)
    rc, _, err = invoke(["run", "--model", d, "--token-ids", "1,2", "--json", lab / "unlistable" / "o.json"], capfd)
    assert_one_error(rc, err, 2, re.escape(str(d)) + ".*Permission denied")


def test_successful_write_replaces_atomically(lab, tiny_dir, capfd):
    """The clean side: the earlier file is replaced, no temporary file stays, the mode is a normal file's."""
    out_dir = lab / "ok-write"
    out_dir.mkdir()
    target = _existing(out_dir / "out.json")
    target.chmod(0o640)
    rc, _, err = invoke(["run", "--model", tiny_dir, "--dtype", "float32", "--token-ids", "1,2,3", "--json", target,
                         "--dump", out_dir / "d.safetensors"], capfd)
    assert rc == 0, err
    assert json.loads(target.read_text())["prompt"]["ids"] == [1, 2, 3]
    assert sorted(p.name for p in out_dir.iterdir()) == ["d.safetensors", "out.json"]
    assert target.stat().st_mode & 0o777 == 0o640


# ---------------------------------------------------------------------------------------------
# References, stats JSON, name maps, llama.cpp logs (class "references")

def _stats(taps: dict, **extra) -> bytes:
    return json.dumps({"prompt": {"ids": [1, 2, 3]}, "taps": taps, **extra}).encode()


REFERENCE_CASES = [  # (name, file name, bytes, words)
    ("stats-string", "s.json", _stats({"embed": {"first": ["abc", 1, 2]}}), "taps.embed.first"),
    ("stats-object", "s.json", _stats({"embed": {"first": {"a": 1}}}), "taps.embed.first"),
    ("stats-nested", "s.json", _stats({"embed": {"last": [[1, 2], [3]]}}), "taps.embed.last"),
    ("stats-null", "s.json", _stats({"embed": {"sum": None}}), "taps.embed.sum"),
    ("stats-bool", "s.json", _stats({"embed": {"sum": True}}), "taps.embed.sum"),
    ("stats-ragged-values", "s.json", _stats({"embed": {"values": [[1, 2], [3]]}}), "ragged"),
    ("stats-values-string", "s.json", _stats({"embed": {"values": [["x"]]}}), "values"),
    ("stats-tap-not-object", "s.json", _stats({"embed": [1, 2]}), "not an object"),
    ("stats-ids-strings", "s.json", json.dumps({"prompt": {"ids": ["a"]}, "taps": {}}).encode(), "prompt.ids"),
    ("stats-ids-float", "s.json", json.dumps({"prompt": {"ids": [1.5]}, "taps": {}}).encode(), "prompt.ids"),
    ("json-list", "s.json", b"[1, 2]", "JSON object"),
    ("json-broken", "s.json", b'{"taps": ', "not valid JSON"),
    ("json-deep", "s.json", b"[" * 100000 + b"]" * 100000, "not valid JSON|JSON object"),
    ("json-unknown", "s.json", b'{"hello": 1}', "unrecognised"),
    ("log-40000^2", "l.log", b"ggml_debug: result_output = (f32) MUL_MAT(a, b) = {40000, 40000}\n", "40000"),
    ("log-5-dims", "l.log", b"ggml_debug: inp_embd = (f32) GET_ROWS(a, b) = {2, 2, 2, 2, 2}\n", "dimensions"),
    ("log-zero-dim", "l.log", b"ggml_debug: inp_embd = (f32) GET_ROWS(a, b) = {0, 3}\n", "shape"),
    ("log-bad-number", "l.log", b"ggml_debug: inp_embd = (f32) GET_ROWS(a, b) = {2, 1}\n [ 1.0, x ]\n", "bad number"),
    ("log-wrong-rows", "l.log", b"ggml_debug: inp_embd = (f32) GET_ROWS(a, b) = {2, 2}\n [ 1.0, 2.0 ]\n", "rows"),
    ("log-nothing", "l.log", b"just some text\n", "not a recognised"),
    *[(f"seed-bundle-{k}", "b.json", json.dumps({"format": "mlx_tinyllama.seed-refs/1", "sources": v}).encode(),
       "malformed seed reference bundle|number of tokens") for k, v in {
        "entries-str": {"a": {"entries": "x", "prompt": {}}},
        "entries-of-str": {"a": {"entries": ["x"], "prompt": {"ids": [1]}}},
        "entry-no-index": {"a": {"entries": [{"tap": "embed", "value": "abc"}], "prompt": {"ids": [1]}}},
        "sources-list": [1],
        "ids-str": {"a": {"entries": [], "prompt": {"ids": "x"}}}}.items()],
    ("tensors-garbage", "t.safetensors", b"\x10\0\0\0\0\0\0\0{not json here..", "cannot read"),
    ("npz-garbage", "t.npz", b"PK\3\4garbage", "cannot read"),
]


@pytest.mark.parametrize("name,fname,raw,words", REFERENCE_CASES, ids=[c[0] for c in REFERENCE_CASES])
def test_references(name, fname, raw, words, lab, capfd):
    d = lab / "refs" / name
    d.mkdir(parents=True)
    p = _write(d / fname, raw)
    rc, _, err = invoke(["compare", "--ref", p, "--against", p], capfd)
    assert_one_error(rc, err, 2, words)
    assert p.read_bytes() == raw


def test_llamacpp_log_shape_bound_is_by_values_not_memory():
    """The log bound leaves the real shapes in: TinyLlama's 2048-token logits parse (declared, unprinted)."""
    from mlx_tinyllama.refs.llamacpp import MAX_LOG_ELEMENTS, parse_llamacpp_tensors

    assert 32000 * 2048 <= MAX_LOG_ELEMENTS < 40000 * 40000
    t = parse_llamacpp_tensors("ggml_debug: result_output = (f32) MUL_MAT(a, b) = {32000, 4}\n sum = 1.5\n")
    assert t[0].values.shape == (4, 32000) and t[0].sum == 1.5


MANIFEST_CASES = [  # (name, change to the manifest, words)
    ("token_rows-out-of-range", {"token_rows": {"logits": [99]}}, "token_rows.logits"),
    ("token_rows-string", {"token_rows": {"logits": ["x"]}}, "token_rows.logits"),
    ("token_rows-count", {"token_rows": {"logits": [0, 1]}}, "token_rows.logits"),
    ("token_rows-not-object", {"token_rows": [1]}, "malformed"),
    ("ids-strings", {"prompt": {"ids": ["a"]}}, "prompt.ids"),
    ("no-taps", {"taps": None}, "malformed"),
    ("no-provenance", {"provenance": None}, "malformed"),
]


@pytest.mark.parametrize("name,change,words", MANIFEST_CASES, ids=[c[0] for c in MANIFEST_CASES])
def test_reference_manifest(name, change, words, lab, capfd):
    from safetensors.numpy import save_file

    d = lab / "manifests" / name
    d.mkdir(parents=True)
    save_file({"logits": np.zeros((1, 8), np.float32)}, str(d / "m.safetensors"))
    manifest = {"format": "mlx_tinyllama.reference/1", "tensors": "m.safetensors",
                "prompt": {"ids": [1, 2, 3]}, "model": {"config": {}}, "taps": {"logits": {}},
                "provenance": {"dtype": "float32"}, "token_rows": {"logits": [-1]}}
    manifest.update(change)
    p = _write(d / "m.json", json.dumps(manifest).encode())
    rc, _, err = invoke(["compare", "--ref", p, "--against", p], capfd)
    assert_one_error(rc, err, 2, words)


@pytest.mark.parametrize("name,setup,words", [
    ("map-dir", lambda d: d, "is a directory"),
    ("map-missing", lambda d: d / "absent.json", "does not exist"),
    ("map-not-json", lambda d: _write(d / "m.json", b"{"), "not valid JSON"),
    ("map-list", lambda d: _write(d / "m.json", b"[]"), "JSON object"),
    ("map-bad-tap", lambda d: _write(d / "m.json", b'{"a": "layers.0.nope"}'), "canonical tap"),
    ("map-value-int", lambda d: _write(d / "m.json", b'{"a": 1}'), "JSON object"),
    ("map-two-names-one-tap", lambda d: _write(d / "m.json", b'{"a": "embed", "b": "embed"}'),
     "'a' and 'b' both map to embed"),
    ("map-fused-tap-twice", lambda d: _write(d / "m.json", b'{"a": ["embed", "layers.0.attn_norm"], "b": "embed"}'),
     "'a' and 'b' both map to embed"),
    ("map-fused-bad-layout", lambda d: _write(d / "m.json", b'{"a": {"taps": ["layers.0.attn.q", "layers.0.attn.k"], '
                                                            b'"layout": "x"}}'), "not one of concat"),
    ("map-fused-on-stats", lambda d: _write(d / "m.json", b'{"a": ["layers.0.attn.q", "layers.0.attn.k"]}'),
     "only a .safetensors/.npz dump"),
])
def test_name_map(name, setup, words, lab, stats_ref, capfd):
    d = lab / "maps" / name
    d.mkdir(parents=True)
    rc, _, err = invoke(["compare", "--ref", stats_ref, "--against", stats_ref, "--map", setup(d)], capfd)
    assert_one_error(rc, err, 2, words)


@pytest.mark.parametrize("mapped", [False, True])
def test_name_map_onto_a_canonical_name(mapped, lab, tiny_dir, capfd):
    """A dump holding `embed` and `tok`, with --map {tok: embed}: two tensors for one tap (one was silently
    dropped); refused naming both. Without the map `tok` is an unknown name (exit 2 unless
    --ignore-unmapped), and the dump holds `embed` only (--partial): the clean side."""
    from safetensors.numpy import save_file

    d = lab / "maps" / f"collide-{mapped}"
    d.mkdir(parents=True)
    x = np.zeros((2, 64), np.float32)
    save_file({"embed": x, "tok": x + 1}, str(d / "dump.safetensors"), metadata={"tokens": "[1, 2]"})
    argv = ["compare", "--against", d / "dump.safetensors", "--model", tiny_dir, "--dtype", "float32"]
    if mapped:
        argv += ["--map", _write(d / "m.json", b'{"tok": "embed"}')]
    else:
        argv += ["--ignore-unmapped", "--partial"]
    rc, out, err = invoke(argv, capfd)
    if mapped:
        assert_one_error(rc, err, 2, "'(tok|embed)' and '(tok|embed)' are both embed")
    else:
        assert rc in (0, 1) and "Traceback" not in err, err


@pytest.mark.parametrize("glob,refused", [("layers.5.attn.q", True), ("layers.1.attn.q", False)])
def test_name_map_tol_glob_of_the_model(glob, refused, lab, tiny_dir, tiny_config, capfd):
    """`compare --tol` globs are checked against the loaded model (a 2-layer model has no layers.5), not
    against any model (which let a typo keep the derived tolerance without a word)."""
    assert tiny_config["num_hidden_layers"] == 2
    d = lab / "maps" / f"tol-{refused}"
    d.mkdir(parents=True)
    x = np.zeros((2, 64), np.float32)
    from safetensors.numpy import save_file

    save_file({"embed": x}, str(d / "dump.safetensors"), metadata={"tokens": "[1, 2]"})
    rc, _, err = invoke(["compare", "--against", d / "dump.safetensors", "--model", tiny_dir, "--dtype", "float32",
                         "--tol", f"{glob}:nmse=1e-3", "--partial"], capfd)  # (the dump holds embed only)
    if refused:
        assert_one_error(rc, err, 2, "layers.5.attn.q.*matches no stage of a 2-layer model")
    else:
        assert rc in (0, 1) and "matches no stage" not in err, err


# ---------------------------------------------------------------------------------------------
# The synthetic cache verifies what it loads (class "cache")

CACHE_DAMAGE = ["config-replaced", "weights-truncated", "weights-flipped", "manifest-missing", "manifest-garbage",
                "file-added", "tokenizer-removed"]


@pytest.mark.parametrize("damage", CACHE_DAMAGE)
def test_synthetic_cache_rebuilds_when_damaged(damage, lab):
    from mlx_tinyllama import synthetic

    root = lab / "cache" / damage
    d = synthetic.materialize("tiny", 0, root=root)
    good = snapshot(d)
    assert synthetic.verify(d)
    if damage == "config-replaced":
        (d / "config.json").write_text('{"model_type": "llama", "poisoned": true}')
    elif damage == "weights-truncated":
        (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000])
    elif damage == "weights-flipped":
        data = bytearray((d / "model.safetensors").read_bytes())
        data[-5] ^= 0xFF
        (d / "model.safetensors").write_bytes(bytes(data))
    elif damage == "manifest-missing":
        (d / synthetic.MANIFEST).unlink()
    elif damage == "manifest-garbage":
        (d / synthetic.MANIFEST).write_text("{")
    elif damage == "file-added":
        (d / "out.json").write_text("{}")
    elif damage == "tokenizer-removed":
        (d / "tokenizer.model").unlink()
    assert not synthetic.verify(d)
    again = synthetic.materialize("tiny", 0, root=root)
    assert again == d and synthetic.verify(d)
    assert snapshot(d) == good  # rebuilt byte for byte
    assert [p.name for p in root.iterdir()] == [d.name]  # no stale or temporary directories left


# ---------------------------------------------------------------------------------------------
# Internal errors, interrupts and the real process's exit codes (class "process")

def _break(monkeypatch, exc):
    from mlx_tinyllama import cli_common

    def broken(*a, **k):
        raise exc

    monkeypatch.setattr(cli_common, "forward", broken)


@pytest.mark.parametrize("exc,code,words", [
    (RuntimeError("boom"), 3, "internal error RuntimeError: boom.*--debug"),
    (KeyError("x"), 3, "internal error KeyError.*--debug"),
    (ValueError("multi\nline\nmessage"), 3, "internal error ValueError: multi line message"),
    (ZeroDivisionError("division by zero"), 3, "ZeroDivisionError.*--debug"),
    (MemoryError(), 3, "MemoryError"),
    (KeyboardInterrupt(), 130, "interrupted"),
    (OSError(28, "No space left on device"), 1, "No space left"),
    (PermissionError(13, "Permission denied"), 3, "internal error PermissionError"),
])
def test_unexpected_errors_are_one_line(exc, code, words, tiny_dir, monkeypatch, capfd):
    _break(monkeypatch, exc)
    rc, _, err = invoke(["run", "--model", tiny_dir, "--dtype", "float32", "--token-ids", "1,2"], capfd)
    assert_one_error(rc, err, code, words)


def test_debug_shows_the_traceback(tiny_dir, monkeypatch):
    _break(monkeypatch, RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        trace.main(["run", "--model", str(tiny_dir), "--token-ids", "1,2", "--debug"])
    with pytest.raises(RuntimeError, match="boom"):
        trace.main(["--debug", "run", "--model", str(tiny_dir), "--token-ids", "1,2"])


def _trace_process(args, **kw):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "mlx_tinyllama.trace", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.parametrize("args,code,words", [
    (["run", "--model", "/nonexistent/model"], 2, "not found"),
    (["run", "--model", "synthetic:tiny", "--token-ids", "1,2", "--json", "/nonexistent/x.json"], 2, "does not exist"),
    (["generate", "--model", "synthetic:tiny", "--temperature", "0.5", "--seed", "-1"], 2, "--seed"),
])
def test_process_exit_codes(args, code, words):
    p = _trace_process(args)
    out, err = p.communicate(timeout=180)
    assert_one_error(p.returncode, err, code, words)


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or sys.platform == "win32", reason="POSIX signals")
def test_sigterm_exits_130_and_keeps_the_earlier_output(lab):
    out_dir = lab / "sigterm"
    out_dir.mkdir()
    target = _existing(out_dir / "g.json")
    p = _trace_process(["generate", "--model", "synthetic:tiny", "--dtype", "float32", "--max-tokens", "2000",
                        "--ignore-eos", "--json", target])
    p.stdout.read(1)  # generation has started streaming text
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert_one_error(p.returncode, err, 130, "interrupted")
    assert target.read_bytes() == OLD and [f.name for f in out_dir.iterdir()] == ["g.json"]


# ---------------------------------------------------------------------------------------------
# Contracts (class "contracts", issue 24): every command's declared paths (contracts.Spec), probed
# from the specs: each output onto each input (declared, or implied: a manifest's tensors, a sharded
# dump's index and shards, a step directory's files, the llama.cpp binary, a vectors directory's
# files), onto another output, into the synthetic cache and a model directory; each repeated
# single-valued option, each empty value and each option a mode does not use. All refused with one
# line, exit 2, every input byte-identical, before anything loads.

PATH_METAVAR = re.compile(r"PATH|FILE|DIR|REF|BIN|MODULE|\.(json|safetensors|html|gputrace|gguf)$")


def _commands():
    """(name, parser, spec) of every command and vectors subcommand, from the CLI's own parser."""
    parser = trace.build_parser()
    out = []
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        subs = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
        if subs:
            for sname, ssub in subs[0].choices.items():
                out.append((f"{name} {sname}", ssub, ssub.get_default("_spec")))
        else:
            out.append((name, sub, sub.get_default("_spec")))
    return out


def path_options(parser) -> set[str]:
    """The options of `parser` that name a path, by their metavar or dest (a new --out PATH too)."""
    found = set()
    for a in parser._actions:
        metavar = a.metavar if isinstance(a.metavar, str) else ""
        if isinstance(a, argparse._HelpAction) or not (PATH_METAVAR.search(metavar) or a.dest in ("model", "dir")):
            continue
        found.add(a.option_strings[0] if a.option_strings else a.dest.upper())
    return found


def test_contracts_every_path_option_is_declared():
    """A command cannot forget: an option naming a path that its spec does not declare fails here,
    and so does a declared option the parser lacks."""
    commands = _commands()
    assert len(commands) >= 11  # every command, vectors' three subcommands
    for name, parser, spec in commands:
        assert spec is not None, f"{name} has no contracts.Spec"
        declared = {p.option for p in spec.paths}
        options = {o for a in parser._actions for o in a.option_strings} | {a.dest.upper() for a in parser._actions
                                                                            if not a.option_strings}
        assert path_options(parser) <= declared, f"{name}: undeclared path options {path_options(parser) - declared}"
        assert declared <= options, f"{name}: declared options it does not have: {declared - options}"
        for rule in spec.unused:
            assert rule.option in options, f"{name}: rule for an option it does not have: {rule.option}"


def test_contracts_walker_sees_a_new_path_option():
    """The walk above can fail: a parser given a new path option has it in path_options."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--trace-out", metavar="PATH.json")
    parser.add_argument("--count", type=int)
    assert path_options(parser) == {"--trace-out"}


def _contract_lab(root: Path, tiny_dir: Path, cfg: dict) -> dict:
    """Every kind of input a command reads, made once (contents need not be valid: the check comes first)."""
    if (root / "made").exists():
        return json.loads((root / "made").read_text())
    root.mkdir(parents=True, exist_ok=True)
    model = model_dir(root, "model", tiny_dir, cfg)
    f = {"model": model, "model/config.json": model / "config.json", "model/model.safetensors": model /
         "model.safetensors", "model/tokenizer.model": model / "tokenizer.model"}
    f["prompt"] = _write(root / "prompt.txt", b"Hello")
    f["ref"] = _write(root / "ref.json", b'{"format": "mlx_tinyllama.reference/1"}')
    f["ref/tensors"] = _write(root / "ref.safetensors", b"x")
    f["against"] = root / "against.safetensors"  # sharded: only its index and shards exist
    f["against/index"] = _write(root / "against.safetensors.index.json", json.dumps({"weight_map": {
        "embed": "against-00001.safetensors", "logits": "against-00002.safetensors"}}).encode())
    f["against/shard1"] = _write(root / "against-00001.safetensors", b"1")
    f["against/shard2"] = _write(root / "against-00002.safetensors", b"2")
    f["map"] = _write(root / "map.json", b'{"tok": "embed"}')
    (root / "steps").mkdir()
    f["steps"] = root / "steps"
    f["steps/s0"] = _write(root / "steps" / "s0.safetensors", b"0")
    f["steps/s1"] = _write(root / "steps" / "s1.safetensors", b"1")
    (root / "bin").mkdir()
    f["bin"] = root / "bin"
    f["bin/binary"] = _write(root / "bin" / "llama-eval-callback", b"#!/bin/sh\nexit 9\n")
    f["bin/binary"].chmod(0o755)
    f["gguf"] = _write(root / "m.gguf", b"GGUF")
    f["onnx"] = _write(root / "m.onnx", b"\x08\x08")  # (the spec checks paths; the graph is never read)
    (root / "vec").mkdir()
    f["vec"] = root / "vec"
    f["vec/manifest"] = _write(root / "vec" / "manifest.json", b"{}")
    f["vec/matmul"] = _write(root / "vec" / "matmul.safetensors", b"m")
    f["results"] = _write(root / "results.safetensors", b"r")
    f["engine"] = _write(root / "engine.py", b"def f(op, inputs, params):\n    return None\n")
    (root / "made").write_text(json.dumps({k: str(v) for k, v in f.items()}))
    return {k: str(v) for k, v in f.items()}


# Every command and mode, with each of its path options: {NAME} is an input of the lab, <--opt> a
# fresh output path. Together they must name every option of every spec (checked below).
CONTRACT_EXAMPLES = {
    "run": ["run", "--model", "{model}", "--prompt-file", "{prompt}", "--json", "<--json>", "--dump", "<--dump>",
            "--report", "<--report>", "--plots", "<--plots>"],
    "run-plain": ["run", "--model", "{model}", "--token-ids", "1,2", "--json", "<--json>"],
    "run-compare": ["run", "--model", "{model}", "--token-ids", "1,2", "--compare", "{ref}", "--json", "<--json>",
                    "--report", "<--report>", "--plots", "<--plots>"],
    "compare-ref": ["compare", "--ref", "{ref}", "--model", "{model}", "--token-ids", "1,2", "--json", "<--json>"],
    "compare-ref-against": ["compare", "--ref", "{ref}", "--against", "{against}", "--map", "{map}", "--model",
                            "{model}", "--json", "<--json>", "--report", "<--report>", "--plots", "<--plots>"],
    "compare-against": ["compare", "--against", "{against}", "--model", "{model}", "--prompt-file", "{prompt}",
                        "--json", "<--json>", "--report", "<--report>", "--plots", "<--plots>"],
    "compare-steps": ["compare", "--against-steps", "{steps}", "{results}", "--map", "{map}", "--model", "{model}",
                      "--prompt-file", "{prompt}", "--json", "<--json>"],
    "llamacpp": ["llamacpp", "--gguf", "{gguf}", "--llama-cpp", "{bin}", "--prompt-file", "{prompt}", "--log",
                 "<--log>", "--json", "<--json>", "--report", "<--report>", "--plots", "<--plots>"],
    "tokens": ["tokens", "--model", "{model}", "--prompt-file", "{prompt}", "--json", "<--json>"],
    "generate": ["generate", "--model", "{model}", "--prompt-file", "{prompt}", "--json", "<--json>"],
    "generate-sampling": ["generate", "--model", "{model}", "--temperature", "0.7", "--token-ids", "1,2", "--json",
                          "<--json>"],
    "paths": ["paths", "--model", "{model}", "--prompt-file", "{prompt}", "--json", "<--json>", "--report",
              "<--report>", "--plots", "<--plots>"],
    "paths-plain": ["paths", "--model", "{model}", "--token-ids", "1,2,3", "--json", "<--json>"],
    "stability-plain": ["stability", "--model", "{model}", "--token-ids", "1,2", "--json", "<--json>"],
    "tokens-ids": ["tokens", "--model", "{model}", "--token-ids", "1,2", "--json", "<--json>"],
    "llamacpp-plain": ["llamacpp", "--gguf", "{gguf}", "--llama-cpp", "{bin}", "--prompt", "hi", "--json", "<--json>"],
    "stability": ["stability", "--model", "{model}", "--prompt-file", "{prompt}", "--json", "<--json>", "--report",
                  "<--report>", "--plots", "<--plots>"],
    "bench": ["bench", "--model", "{model}", "--json", "<--json>", "--metal-capture", "<--metal-capture>"],
    "bench-no-taps": ["bench", "--model", "{model}", "--no-tap-overhead", "--no-stages", "--json", "<--json>"],
    "compare-suggest": ["compare", "--against", "{against}", "--model", "{model}", "--suggest-map",
                        "<--suggest-map>"],
    "onnx": ["onnx", "--model", "{onnx}", "--hf", "{model}", "--prompt-file", "{prompt}", "--json", "<--json>",
             "--report", "<--report>", "--plots", "<--plots>"],
    "onnx-plain": ["onnx", "--model", "{onnx}", "--hf", "{model}", "--token-ids", "1,2", "--json", "<--json>"],
    "gguf-check": ["gguf-check", "--gguf", "{gguf}", "--hf", "{model}", "--json", "<--json>"],
    "vectors-write": ["vectors", "write", "<DIR>", "--model", "{model}"],
    "vectors-run": ["vectors", "run", "{vec}", "--engine", "{engine}:f", "--out", "<--out>"],
    "vectors-check": ["vectors", "check", "{vec}", "--results", "{results}", "--json", "<--json>", "--report",
                      "<--report>"],
}
FRESH = {"--json": "out.json", "--dump": "out.safetensors", "--report": "out.html", "--plots": "plots",
         "--log": "llama.log", "--metal-capture": "cap.gputrace", "--suggest-map": "map.json", "--out": "res.safetensors", "DIR": "vectors-out"}
# The implied inputs each example's spec must find: the probes below land outputs on them.
IMPLIED = {"{ref}": ["ref/tensors"], "{against}": ["against/index", "against/shard1", "against/shard2"],
           "{steps}": ["steps/s0", "steps/s1"], "{bin}": ["bin/binary"], "{vec}": ["vec/manifest", "vec/matmul"],
           "{model}": ["model/config.json", "model/model.safetensors", "model/tokenizer.model"],
           "{engine}:f": ["engine"]}


def _argv(example: str, lab_files: dict, out_root: Path, change: dict | None = None) -> list[str]:
    argv = []
    for a in CONTRACT_EXAMPLES[example]:
        if a.startswith("<"):
            a = (change or {}).get(a[1:-1], str(out_root / FRESH[a[1:-1]]))
        else:
            a = re.sub(r"\{(\w+)\}", lambda m: lab_files[m.group(1)], a)
        argv.append(a)
    return argv


def _inputs_of(example: str) -> list[str]:
    """The lab inputs an example reads: named ones and what they imply."""
    found = []
    for a in CONTRACT_EXAMPLES[example]:
        for m in re.finditer(r"\{(\w+)\}", a):
            found.append(m.group(1))
        found += IMPLIED.get(a, [])
    return list(dict.fromkeys(found))


def _write_options(example: str) -> list[str]:
    return [a[1:-1] for a in CONTRACT_EXAMPLES[example] if a.startswith("<")]


def _contract_probes():
    """(example, output option, target): every output onto every input, another output, the cache and the model."""
    probes = []
    for ex in CONTRACT_EXAMPLES:
        writes, reads = _write_options(ex), _inputs_of(ex)
        for w in writes:
            probes += [(ex, w, f"input:{r}") for r in reads if r not in ("model", "bin", "steps", "vec")
                       or w in ("--plots", "--metal-capture", "DIR")]
            probes += [(ex, w, f"output:{o}") for o in writes if o != w]
            probes += [(ex, w, "cache")]
            if "model" in reads:
                probes += [(ex, w, "in-model-dir")]
        if "--dump" in writes:
            probes += [(ex, w, "dump-part") for w in writes if w != "--dump"]
    return probes


CONTRACT_PROBES = _contract_probes()


@pytest.fixture(scope="session")
def contract_lab(lab, tiny_dir, tiny_config):
    return _contract_lab(lab / "contracts", tiny_dir, tiny_config)


def _parse(argv):
    parser = trace.build_parser()
    args = parser.parse_args(argv)
    return args, trace.check_given(args)


def test_contracts_examples_cover_every_spec(contract_lab, lab):
    """Every declared path option of every command appears in an example (so the probes reach it), each
    example passes the check as given (the clean side: no false refusal), and each spec finds the implied
    inputs the probes land on."""
    covered: dict = {}
    out_root = lab / "contracts-clean"
    out_root.mkdir(exist_ok=True)
    for ex in CONTRACT_EXAMPLES:
        args, given = _parse(_argv(ex, contract_lab, out_root))
        args._spec.check(args, given)  # no error: fresh outputs, nothing unused
        covered.setdefault(id(args._spec), set()).update(a for a in CONTRACT_EXAMPLES[ex] if a.startswith("-"))
        covered[id(args._spec)].update(["DIR"] if args.command == "vectors" else [])
        found = {str(p) for p in args._spec.inputs(args).values()}
        for key in _inputs_of(ex):
            if key not in ("model", "bin", "steps", "vec") and not key.startswith("model/"):
                assert contract_lab[key] in found, f"{ex}: the spec does not find {key}"
    for name, parser, spec in _commands():
        missing = {p.option for p in spec.paths} - covered.get(id(spec), set())
        assert not missing, f"{name}: no example names {missing}"


@pytest.mark.parametrize("example,option,target", CONTRACT_PROBES,
                         ids=[f"{e}:{o}={t}" for e, o, t in CONTRACT_PROBES])
def test_contracts_output_refused(example, option, target, contract_lab, lab, capfd):
    out_root = lab / "contracts-out"
    out_root.mkdir(exist_ok=True)
    kind, _, key = target.partition(":")
    if kind == "input":
        path = contract_lab[key]
    elif kind == "output":  # the same fresh path as the other output
        path = str(out_root / FRESH[key])
    elif kind == "cache":
        path = str(Path(os.environ["MLX_TINYLLAMA_CACHE"]) / FRESH[option])
    elif kind == "in-model-dir":
        path = str(Path(contract_lab["model"]) / FRESH[option])
    else:  # dump-part: onto the index or a shard that --dump may write
        path = str(out_root / "out.safetensors.index.json")
    argv = _argv(example, contract_lab, out_root, {option: path})
    if kind == "output":
        argv = _argv(example, contract_lab, out_root, {option: path, key: path})
    cache = Path(os.environ["MLX_TINYLLAMA_CACHE"])
    before = snapshot(Path(contract_lab["model"]).parent), sorted(cache.rglob("*"))  # (the cache's names only)
    rc, _, err = invoke(argv, capfd)
    assert_one_error(rc, err, 2, r"input|inside|same path|would also write|not a directory|is a directory")
    assert (snapshot(Path(contract_lab["model"]).parent), sorted(cache.rglob("*"))) == before


def _rules():
    out = []
    for ex in CONTRACT_EXAMPLES:
        args, _ = _parse(_argv(ex, {k: "x" for k in IMPLIED_KEYS}, Path("/nonexistent")))
        out += list(dict.fromkeys((ex, r.option) for r in args._spec.unused))
    return out


IMPLIED_KEYS = ["model", "prompt", "ref", "against", "map", "steps", "bin", "gguf", "onnx", "vec", "engine", "results"]
UNUSED_VALUES = {"--dump-shard-mb": "8", "--top-k": "3", "--top-p": "0.9", "--seed": "1", "--attention-layers": "0",
                 "--attention-heads": "0", "--layout": "hf", "--map": "{map}", "--against-dtype": "float32",
                 "--emulate": "fp32", "--require": "logits", "--all": None, "--prompt": "hi", "--prompt-file":
                 "{prompt}", "--token-ids": "1,2", "--chat": "hi", "--system": "be brief", "--bos": None,
                 "--tokenizer": "hf", "--download": None,
                 "--tap-layer": "1", "--tap-decode-tokens": "2", "--tap-prompt-length": "8"}
UNUSED_PROBES = _rules()


@pytest.mark.parametrize("example,option", UNUSED_PROBES, ids=[f"{e}:{o}" for e, o in UNUSED_PROBES])
def test_contracts_unused_option(example, option, contract_lab, lab, capfd):
    """Each rule of each spec, in each example: refused where the mode would ignore the option, accepted
    (by the check) where it is used; every rule is refused in at least one example (test below)."""
    out_root = lab / "contracts-unused"
    out_root.mkdir(exist_ok=True)
    value = UNUSED_VALUES[option]
    extra = [option] + ([re.sub(r"\{(\w+)\}", lambda m: contract_lab[m.group(1)], value)] if value else [])
    argv = _without_prompt(_argv(example, contract_lab, out_root), option)
    if option in argv:
        pytest.skip("the example gives it already")
    if option == "--system":  # (it needs --chat)
        extra = ["--chat", "hi", *extra]
    args, given = _parse(argv + extra)
    if all(r.applies(args) for r in args._spec.unused if r.option == option):  # the clean side: the whole
        args._spec.check(args, given)  # contract check passes (nothing runs)
    else:
        rc, _, err = invoke(argv + extra, capfd)
        assert_one_error(rc, err, 2, ("(--chat|--system)" if option == "--system" else re.escape(option))
                         + " is not used")


PROMPT_GROUP = ("--prompt", "--prompt-file", "--token-ids", "--chat", "--system")


def _without_prompt(argv: list[str], option: str) -> list[str]:
    """`argv` less its prompt option when `option` is another one of the group (argparse allows one)."""
    if option not in PROMPT_GROUP:
        return argv
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in PROMPT_GROUP:
            skip = True
        else:
            out.append(a)
    return out


def test_contracts_every_rule_refused_somewhere(contract_lab):
    """Each unused-option rule is refused by at least one example, so each has a failing probe."""
    refused = set()
    for ex, option in UNUSED_PROBES:
        value = UNUSED_VALUES[option]
        extra = [option] + ([re.sub(r"\{(\w+)\}", lambda m: contract_lab[m.group(1)], value)] if value else [])
        argv = _argv(ex, contract_lab, Path("/nonexistent"))
        argv = _without_prompt(argv, option)
        if option in argv:
            continue
        args, _ = _parse(argv + extra + (["--chat", "hi"] if option == "--system" else []))
        refused |= {(args.command, r.option, k) for k, r in enumerate(args._spec.unused)
                    if r.option == option and not r.applies(args)}
    rules = {(n.split()[0], r.option, k) for n, _, spec in _commands() for k, r in enumerate(spec.unused)}
    assert rules <= refused, rules - refused


def _single_valued():
    """(example, option, value) for each single-valued option of each command, to give twice."""
    out, seen = [], set()
    for ex in CONTRACT_EXAMPLES:
        parser = trace.build_parser()
        args = parser.parse_args(_argv(ex, {k: "x" for k in IMPLIED_KEYS}, Path("/nonexistent")))
        command = " ".join([args.command] + ([args.vectors_command] if args.command == "vectors" else []))
        sub = next(p for n, p, _ in _commands() if n == command)
        for a in sub._actions:
            if not a.option_strings or isinstance(a, (argparse._HelpAction, *trace._REPEATABLE)) or \
                    (command, a.dest) in seen:
                continue
            seen.add((command, a.dest))
            if isinstance(a, argparse.BooleanOptionalAction):
                value = None
            elif a.choices:
                value = str(list(a.choices)[0])
            elif a.type in (int, float):
                value = "1"
            else:
                value = "x"
            out.append((ex, a.option_strings[0], value))
    return out


REPEAT_PROBES = _single_valued()


@pytest.mark.parametrize("example,option,value", REPEAT_PROBES, ids=[f"{e}:{o}" for e, o, _ in REPEAT_PROBES])
def test_contracts_repeated_option_refused(example, option, value, contract_lab, lab, capfd):
    """Twice (argparse keeps the last, the first lost): refused, whatever the option."""
    argv = _without_prompt(_argv(example, contract_lab, lab), option)
    argv = [a for i, a in enumerate(argv) if a != option and (i == 0 or argv[i - 1] != option)]
    if value is None:  # --bos then --no-bos: a contradiction
        twice = [option, "--no-" + option[2:]]
        words = "contradict"
    else:
        twice = [option, value, option, value]
        words = re.escape(option) + " given twice"
    with pytest.raises(trace.UserError, match=words):
        _parse(argv + twice)
    rc, _, err = invoke(argv + twice, capfd)
    assert_one_error(rc, err, 2, words)


@pytest.mark.parametrize("option,value", [("--tol", "nmse=1e-3"), ("--taps", "logits"), ("--require", "logits")])
def test_contracts_repeatable_options_merge(option, value, contract_lab, lab):
    """The clean side: an option documented as repeatable keeps every value."""
    argv = _argv("compare-against", contract_lab, lab) if option != "--taps" else \
        _argv("run", contract_lab, lab)
    args, _ = _parse(argv + [option, value, option, value + "*"])
    assert getattr(args, option[2:]) == [value, value + "*"]


def _string_options():
    out = []
    for ex, option, value in REPEAT_PROBES:
        if value == "x":
            spec = _parse(_argv(ex, {k: "x" for k in IMPLIED_KEYS}, Path("/nonexistent")))[0]._spec
            if option not in spec.empty_ok:
                out.append((ex, option))
    return out


EMPTY_PROBES = _string_options()


@pytest.mark.parametrize("example,option", EMPTY_PROBES, ids=[f"{e}:{o}" for e, o in EMPTY_PROBES])
def test_contracts_empty_value_refused(example, option, contract_lab, lab, capfd):
    argv = _without_prompt(_argv(example, contract_lab, lab), option)
    if option in argv:
        i = argv.index(option)
        argv = argv[:i] + argv[i + 2:]
    rc, _, err = invoke(argv + [option, ""], capfd)
    assert_one_error(rc, err, 2, re.escape(option) + ": an empty value")


@pytest.mark.parametrize("model,refused", [("synthetic:tiny", True), ("{model}", True),
                                          ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", False)])
def test_contracts_download_only_for_a_repo_id(model, refused, contract_lab):
    """--download is used only when --model could be a Hugging Face repo id (the clean side: the check
    passes for one; nothing is fetched here)."""
    args, given = _parse(["run", "--model", model.format(**contract_lab), "--download"])
    if refused:
        with pytest.raises(trace.UserError, match="--download is not used"):
            args._spec.check(args, given)
    else:
        args._spec.check(args, given)


def test_contracts_llama_args_may_be_empty(contract_lab, lab):
    """--llama-args '' is its default (no extra arguments): declared empty_ok, not refused."""
    args, given = _parse(_argv("llamacpp", contract_lab, lab / "contracts-clean") + ["--llama-args", ""])
    args._spec.check(args, given)


# ---------------------------------------------------------------------------------------------
# The census: how many probes each class holds, counted from what pytest collected (print with -s)

CLASS_OF = {
    "config": ("test_config_", "test_huge_config"),
    "weights": ("test_weights_", "test_model_paths", "test_bench_", "test_other_weight"),
    "gguf": ("test_gguf_",), "options": ("test_generate_", "test_paths_", "test_run_option"),
    "template": ("test_chat_template",),
    "prompt": ("test_prompt_", "test_compare_ids", "test_long_prompt", "test_tokens_table"),
    "outputs": ("test_outputs_", "test_failed_write", "test_successful_write"),
    "references": ("test_references", "test_llamacpp", "test_reference_manifest", "test_name_map"),
    "cache": ("test_synthetic_cache",), "contracts": ("test_contracts_",),
    "process": ("test_unexpected", "test_debug", "test_process", "test_sigterm"),
}


def test_probe_census(request):
    mine = [item for item in request.session.items if item.module is sys.modules[__name__]
            and item.originalname != "test_probe_census"]
    counts = {c: sum(1 for it in mine if it.originalname.startswith(prefixes)) for c, prefixes in CLASS_OF.items()}
    assert sum(counts.values()) == len(mine), "a test of this module belongs to no class"
    print("\nrobustness probes by class:", json.dumps(counts), "total", len(mine))
    if len(mine) > 100:  # the whole module was collected (not a -k selection)
        assert len(mine) >= 300

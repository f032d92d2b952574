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
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
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

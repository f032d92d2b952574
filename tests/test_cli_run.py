"""`python -m mlx_tinyllama.trace` (the `run` command): JSON, dump, options, human output, bad input.

Most runs call `trace.main` in this process (the model loads in milliseconds, the CLI's
imports are paid once); the ones that are about the process itself (exit code, stderr,
the README command) run it as a subprocess."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import SEED_IDS, assert_close
from mlx_tinyllama import sources, trace
from mlx_tinyllama.taps import Taps, select, tap_names

TINY = "synthetic:tiny"
TINY_LAYERS = 2
DEFAULT_TAPS_TINY = ([n for n in tap_names(TINY_LAYERS) if n == "embed" or n.startswith("layers.0.")]
                     + ["layers.1.out", "final_norm", "logits"])


def cli(capfd, *args) -> tuple[int, str, str]:
    """Run the CLI in this process; (exit code, stdout, stderr) as the file descriptors saw them."""
    rc = trace.main([str(a) for a in args])
    out, err = capfd.readouterr()
    return rc, out, err


def cli_subprocess(*args, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    # os.environ carries conftest's MLX_TINYLLAMA_CACHE and HF_HUB_OFFLINE to the child.
    return subprocess.run([sys.executable, "-m", "mlx_tinyllama.trace", *map(str, args)], cwd=cwd,
                          env=dict(os.environ), capture_output=True, text=True, timeout=timeout)


def reference_run(spec=TINY, names=DEFAULT_TAPS_TINY, ids=SEED_IDS, **load_args):
    """The same forward pass through the library API: full tensors and stats of `names`."""
    lm = sources.load(spec, **load_args)
    taps = Taps(names, "full")
    logits = lm.model(mx.array(ids), tap=taps)
    mx.eval(logits, taps.tensors)
    return taps


def sentencepiece(model_dir: Path):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))


@pytest.fixture
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # so rich never crops a stage name


# --- the JSON a user's engine is compared with ----------------------------------


def test_json_from_a_subprocess(tmp_path, tiny_dir):
    out = tmp_path / "out.json"
    proc = cli_subprocess("--model", TINY, "--json", out)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    result = json.loads(out.read_text())
    assert result["prompt"]["ids"] == SEED_IDS
    assert list(result["taps"]) == DEFAULT_TAPS_TINY  # the seed's bisection taps, in forward order
    ref = reference_run(dtype="float16")
    for name, s in result["taps"].items():
        x = np.array(ref.tensors[name].astype(mx.float32))
        assert s["shape"] == list(x.shape), name
        assert s["dtype"] == "float16"
        assert s["nan"] == 0 and s["inf"] == 0
        assert_close(s["absmax"], float(np.abs(x).max()), rel=1e-6, where=name)
        assert_close(s["sum"], float(x.sum(dtype=np.float64)), rel=1e-3, abs=float(1e-2 * x.std() + 1e-6), where=name)
        token_axis = 1 if x.ndim == 3 else 0  # [heads, T, ...] vs [T, ...]
        assert_close(s["first"], np.take(x, 0, axis=token_axis).reshape(-1)[:3].tolist(), where=name)
    # top-k: the highest logits of the last position, their pieces, descending.
    last = np.array(ref.tensors["logits"][-1].astype(mx.float32))
    expected_ids = np.argsort(-last, kind="stable")[:10].tolist()
    assert [e["token_id"] for e in result["top_k"]] == expected_ids
    assert_close([e["logit"] for e in result["top_k"]], last[expected_ids].tolist())
    sp = sentencepiece(tiny_dir)
    assert [e["token"] for e in result["top_k"]] == [sp.id_to_piece(i) for i in expected_ids]
    assert result["prompt"]["source"] == "seed chat prompt"
    assert (result["dtype"], result["policy"], result["kernels"]) == ("float16", "hf", "fused")


def test_token_ids(tmp_path, capfd):
    out = tmp_path / "out.json"
    assert cli(capfd, "--model", TINY, "--token-ids", "1, 450, 4996", "--json", out)[0] == 0
    result = json.loads(out.read_text())
    assert result["prompt"]["ids"] == [1, 450, 4996]
    assert result["prompt"]["source"] == "--token-ids"
    assert result["taps"]["logits"]["shape"] == [3, 32000]


def test_prompt_text(tmp_path, capfd, tiny_dir):
    out = tmp_path / "out.json"
    text = "The capital of France is"
    assert cli(capfd, "--model", TINY, "--prompt", text, "--json", out)[0] == 0
    result = json.loads(out.read_text())
    assert result["prompt"]["ids"] == sentencepiece(tiny_dir).encode(text)  # no BOS, as the reference
    assert (result["prompt"]["text"], result["prompt"]["source"]) == (text, "--prompt")
    assert result["taps"]["embed"]["shape"] == [len(result["prompt"]["ids"]), 64]


def test_tap_globs_select_in_forward_order(tmp_path, capfd):
    out = tmp_path / "out.json"
    assert cli(capfd, "--model", TINY, "--taps", "logits", "--taps", "*.attn.probs", "--json", out)[0] == 0
    taps = json.loads(out.read_text())["taps"]
    assert list(taps) == ["layers.0.attn.probs", "layers.1.attn.probs", "logits"]
    assert taps["layers.1.attn.probs"]["shape"] == [4, 38, 38]


def test_top_k(tmp_path, capfd):
    out = tmp_path / "out.json"
    assert cli(capfd, "--model", TINY, "--top-k", "3", "--json", out)[0] == 0
    top = json.loads(out.read_text())["top_k"]
    assert len(top) == 3
    assert [e["logit"] for e in top] == sorted((e["logit"] for e in top), reverse=True)
    assert all(set(e) >= {"token_id", "logit", "token", "prob"} for e in top)


# changes_logits: whether the option must change the fp16 logits of the default run
# (explicit kernels may round exactly like the fused ones).
@pytest.mark.parametrize("options, load_args, reported, changes_logits", [
    (["--dtype", "float32"], {"dtype": "float32"}, ("float32", "hf", "fused"), True),
    (["--dtype", "bfloat16"], {"dtype": "bfloat16"}, ("bfloat16", "hf", "fused"), True),
    (["--dtype", "fp32"], {"dtype": "float32"}, ("float32", "hf", "fused"), True),
    (["--policy", "fp16-pure"], {"dtype": "float16", "policy": "fp16-pure"}, ("float16", "fp16-pure", "explicit"),
     True),
    (["--kernels", "explicit"], {"dtype": "float16", "kernels": "explicit"}, ("float16", "hf", "explicit"), False),
])
def test_numeric_options_reach_the_forward_pass(tmp_path, capfd, options, load_args, reported, changes_logits):
    out = tmp_path / "out.json"
    assert cli(capfd, "--model", TINY, "--taps", "logits", "--json", out, *options)[0] == 0
    result = json.loads(out.read_text())
    assert (result["dtype"], result["policy"], result["kernels"]) == reported
    assert result["taps"]["logits"]["dtype"] == reported[0]
    expected = reference_run(names=["logits"], **load_args).stats()["logits"]
    assert_close(result["taps"]["logits"], expected)
    if changes_logits:
        default = reference_run(names=["logits"], dtype="float16").stats()["logits"]
        assert result["taps"]["logits"]["sum"] != default["sum"]


def test_dump_holds_the_runs_tensors_by_canonical_name(tmp_path, capfd):
    dump, out = tmp_path / "taps.safetensors", tmp_path / "out.json"
    assert cli(capfd, "--model", TINY, "--dump", dump, "--json", out, "--taps", "layers.1.*",
               "--taps", "logits")[0] == 0
    tensors = mx.load(str(dump))
    result = json.loads(out.read_text())
    names = select(["layers.1.*", "logits"], TINY_LAYERS)
    assert sorted(tensors) == sorted(names) == sorted(result["taps"])
    ref = reference_run(names=names, dtype="float16")
    for name in names:
        assert tensors[name].dtype == mx.float16
        assert mx.array_equal(tensors[name], ref.tensors[name]).item(), name
        x = np.array(tensors[name].astype(mx.float32))
        assert_close(result["taps"][name]["absmax"], float(np.abs(x).max()), where=name)
    _, meta = mx.load(str(dump), return_metadata=True)
    assert json.loads(meta["tokens"]) == SEED_IDS
    assert meta["dtype"] == "float16"


def test_human_output_lists_stages_in_forward_order_and_the_top_k(tmp_path, capfd, wide_terminal):
    out = tmp_path / "out.json"
    rc, stdout, _ = cli(capfd, "--model", TINY, "--json", out, "--top-k", "4")
    assert rc == 0
    result = json.loads(out.read_text())
    rows = [line.split("│")[1].strip() for line in stdout.splitlines() if line.startswith("│")]
    stage_rows = [r for r in rows if r in tap_names(TINY_LAYERS)]
    assert stage_rows == DEFAULT_TAPS_TINY
    assert "stages in forward order" in stdout and "next token (last position)" in stdout
    table = stdout[stdout.index("next token (last position)"):]
    ranked = [line.split("│") for line in table.splitlines() if line.startswith("│")]
    assert [(int(c[1]), int(c[2])) for c in ranked] == [(r, e["token_id"]) for r, e in
                                                        enumerate(result["top_k"], 1)]
    assert "38 tokens" in stdout


# --- bad input: exit code 2, one `error:` line, nothing written --------------------------


def variant(tiny_dir: Path, dst: Path, config=None, weights=None, remove=()) -> Path:
    """A copy of the tiny model with config.json fields changed, weights changed, or files removed."""
    shutil.copytree(tiny_dir, dst)
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, **config}))
    if weights:
        t = load_file(str(dst / "model.safetensors"))
        weights(t)
        save_file(t, str(dst / "model.safetensors"))
    for name in remove:
        (dst / name).unlink()
    return dst


def _truncate(d: Path) -> Path:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return d


def _wrong_shape(t):
    t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"].T.copy()


BAD_INPUTS = {
    # name: (extra arguments given the tiny model dir and tmp_path, words in the message)
    "dir without config.json": (lambda d, tmp: ["--model", variant(d, tmp / "m", remove=["config.json"])],
                                "has no config.json"),
    "dir without weights": (lambda d, tmp: ["--model", variant(d, tmp / "m", remove=["model.safetensors"])],
                            "has no weights"),
    "truncated safetensors": (lambda d, tmp: ["--model", _truncate(variant(d, tmp / "m"))],
                              "truncated or not a safetensors file"),
    "wrong-shape weight": (lambda d, tmp: ["--model", variant(d, tmp / "m", weights=_wrong_shape)],
                           r"model.layers.0.self_attn.k_proj.weight .*has shape \(64, 32\)"),
    "token id >= vocab_size": (lambda d, tmp: ["--model", TINY, "--token-ids", "1,2,32000"],
                               "32000 at position 2 is outside the vocabulary"),
    "negative token id": (lambda d, tmp: ["--model", TINY, "--token-ids", "1,-5"],
                          "-5 at position 1 is outside the vocabulary"),
    "prompt longer than max_position_embeddings": (
        lambda d, tmp: ["--model", variant(d, tmp / "m", config={"max_position_embeddings": 16})],
        "38 tokens, more than max_position_embeddings=16"),
    "unknown tap glob": (lambda d, tmp: ["--model", TINY, "--taps", "layers.5.*"],
                         r"'layers.5.\*' matches no stage. Valid names .*embed, layers.i.attn_norm.*logits"),
    "unknown dtype": (lambda d, tmp: ["--model", TINY, "--dtype", "float8"], "unknown dtype 'float8'"),
    "--dump not .safetensors": (lambda d, tmp: ["--model", TINY, "--dump", tmp / "taps.npz"],
                                "--dump writes safetensors"),
    "--dump into a missing directory": (lambda d, tmp: ["--model", TINY, "--dump", tmp / "no" / "t.safetensors"],
                                        "directory does not exist"),
    "--dump onto a directory": (lambda d, tmp: ["--model", TINY, "--dump", _mkdir(tmp / "d.safetensors")],
                                "is a directory"),
    "--json onto a directory": (lambda d, tmp: ["--model", TINY, "--json", _mkdir(tmp / "d.json")],
                                "is a directory"),
    "--top-k 0": (lambda d, tmp: ["--model", TINY, "--top-k", "0"], "--top-k must be at least 1"),
}


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_error_line_and_exit_2(case, tmp_path, tiny_dir, capfd):
    make_args, words = BAD_INPUTS[case]
    args = make_args(tiny_dir, tmp_path)
    json_out = tmp_path / "result.json"
    if "--json" not in args:
        args += ["--json", json_out]
    if "--dump" not in args:
        args += ["--dump", tmp_path / "result.safetensors"]
    before = {p for p in tmp_path.rglob("*") if p.is_file()}
    rc, stdout, stderr = cli(capfd, *args)
    assert rc == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert re.search(words, lines[0]), lines[0]
    assert "Traceback" not in stderr + stdout
    written = {p for p in tmp_path.rglob("*") if p.is_file()} - before
    assert written == set(), f"bad input wrote {written}"


@pytest.mark.parametrize("case", ["dir without config.json", "token id >= vocab_size"])
def test_bad_input_in_a_real_process(case, tmp_path, tiny_dir):
    make_args, words = BAD_INPUTS[case]
    out = tmp_path / "out.json"
    proc = cli_subprocess(*make_args(tiny_dir, tmp_path), "--json", out, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: "), proc.stderr
    assert re.search(words, proc.stderr)
    assert not out.exists()


# --- the README's command, on the full TinyLlama shape -----------------------------------


@pytest.mark.slow
def test_readme_command_full_tinyllama_shape(tmp_path):
    proc = cli_subprocess("--model", "synthetic", "--json", "out.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["prompt"]["ids"] == SEED_IDS
    assert result["dtype"] == "float16"
    assert result["model"]["config"]["num_hidden_layers"] == 22
    taps = result["taps"]
    wanted = (["embed"] + [n for n in tap_names(22) if n.startswith("layers.0.")]
              + ["layers.21.out", "final_norm", "logits"])
    assert set(wanted) <= set(taps)
    assert taps["logits"]["shape"] == [38, 32000] and taps["layers.21.out"]["shape"] == [38, 2048]
    for name, s in taps.items():
        assert s["nan"] == 0 and s["inf"] == 0, name
        assert s["finite"] == int(np.prod(s["shape"])), name
        assert all(isinstance(v, float) and np.isfinite(v) for k in ("min", "max", "absmax", "sum", "std")
                   for v in [s[k]]), name
    assert len(result["top_k"]) == 10 and all(np.isfinite(e["logit"]) for e in result["top_k"])

"""`python -m mlx_tinyllama.trace tokens`: table, --compare-ids, --json, warnings, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mlx_tinyllama.chat_template import SEED_PROMPT
from mlx_tinyllama.trace import main
from conftest import PACKAGED, SEED_IDS


def run(capsys, *argv):
    code = main(["tokens", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def ids_arg(ids) -> str:
    return ",".join(map(str, ids))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    (d / "tokenizer.model").write_bytes(PACKAGED.read_bytes())
    return d


def test_default_is_the_seed_prompt(capsys):
    code, out, err = run(capsys)
    assert code == 0 and err == ""
    assert "38 tokens" in out and f"ids: {SEED_IDS}" in out and "</s>" in out


def test_bos_gives_39(capsys, model_dir):
    code, out, _ = run(capsys, "--model", str(model_dir), "--bos")
    assert code == 0 and f"ids: {[1] + SEED_IDS}" in out


def test_json_output(capsys, model_dir, tmp_path):
    path = tmp_path / "t.json"
    code, _, _ = run(capsys, "--model", str(model_dir), "--chat", "Hello! How are you?",
                     "--system", "You are a friendly chatbot.", "--json", str(path))
    data = json.loads(path.read_text(encoding="utf-8"))
    prompt = data["prompt"]
    assert code == 0 and data["schema"] == 1 and data["command"] == "tokens"
    assert prompt["ids"] == SEED_IDS and prompt["text"] == SEED_PROMPT
    assert prompt["pieces"][:2] == ["▁<", "|"] and "alignment" not in data


def test_compare_ids_names_an_extra_bos(capsys, model_dir, tmp_path):
    path = tmp_path / "t.json"
    code, out, _ = run(capsys, "--model", str(model_dir), "--compare-ids", ids_arg([1] + SEED_IDS),
                       "--json", str(path))
    assert code == 1 and "extra BOS (id 1) at position 0" in out
    alignment = json.loads(path.read_text(encoding="utf-8"))["alignment"]
    assert [d["kind"] for d in alignment["differences"]] == ["extra_bos"]


def test_compare_ids_names_eos_as_text(capsys, model_dir):
    import sentencepiece

    whole = sentencepiece.SentencePieceProcessor(model_file=str(PACKAGED)).encode(SEED_PROMPT)
    code, out, _ = run(capsys, "--model", str(model_dir), "--compare-ids", ids_arg(whole))
    assert code == 1
    assert "`</s>` was encoded as text (`</`, `s`, `>`) instead of the special token 2 at positions 28-30" in out


def test_identical_compare_exits_0(capsys):
    code, out, _ = run(capsys, "--compare-ids", f"[{ids_arg(SEED_IDS)}]")
    assert code == 0 and "identical: 38 ids" in out


def test_token_ids_and_prompt_file(capsys, model_dir, tmp_path):
    code, out, _ = run(capsys, "--model", str(model_dir), "--token-ids", "1, 3492, 2")
    assert code == 0 and "ids: [1, 3492, 2]" in out
    f = tmp_path / "p.txt"
    f.write_bytes(SEED_PROMPT.encode("utf-8"))
    code, out, _ = run(capsys, "--model", str(model_dir), "--prompt-file", str(f))
    assert code == 0 and f"ids: {SEED_IDS}" in out


def test_warns_when_tokenizer_json_disagrees(capsys, tmp_path, write_tokenizer_dir):
    d = write_tokenizer_dir(tmp_path, merges_by="vocab")
    code, _, err = run(capsys, "--model", str(d), "--prompt", "<s> bos")
    assert code == 0 and "warning: --tokenizer hf (tokenizer.json) gives different ids" in err
    code, out, err = run(capsys, "--model", str(d), "--prompt", "<s> bos", "--tokenizer", "hf")
    assert "ids: [1, 259, 27737]" in out and "warning: --tokenizer sentencepiece" in err
    code, _, err = run(capsys, "--model", str(d))  # the seed prompt: both agree
    assert err == ""


# --- bad input: exit code 2 and one line ----------------------------------------------------


def _bad(capsys, *argv) -> str:
    code, out, err = run(capsys, *argv)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_missing_and_corrupt_tokenizer(capsys, tmp_path):
    assert "has no tokenizer.model" in _bad(capsys, "--model", str(tmp_path))
    (tmp_path / "tokenizer.model").write_bytes(b"\x00garbage")
    assert "not a valid SentencePiece model" in _bad(capsys, "--model", str(tmp_path))
    assert "has no tokenizer.json" in _bad(capsys, "--model", str(tmp_path), "--tokenizer", "hf")


def test_ids_outside_the_vocabulary(capsys, model_dir):
    line = _bad(capsys, "--model", str(model_dir), "--compare-ids", "1,529,32000")
    assert "32000" in line and "position 2" in line
    assert "-5" in _bad(capsys, "--model", str(model_dir), "--token-ids", "-5")
    assert "not an integer" in _bad(capsys, "--model", str(model_dir), "--compare-ids", "1,x")


def test_invalid_utf8_prompt_file(capsys, model_dir, tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"hello \xff\xfe world")
    assert "not valid UTF-8" in _bad(capsys, "--model", str(model_dir), "--prompt-file", str(f))
    assert "does not exist" in _bad(capsys, "--model", str(model_dir), "--prompt-file", str(tmp_path / "no"))


def test_system_without_chat(capsys, model_dir):
    assert "--system needs --chat" in _bad(capsys, "--model", str(model_dir), "--system", "x")


def test_subprocess_bad_input_has_no_traceback(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"corrupt")
    proc = subprocess.run([sys.executable, "-m", "mlx_tinyllama.trace", "tokens", "--model", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'tokenizer.model'} is not a valid SentencePiece model (corrupt or truncated tokenizer.model?)"]

"""tokenizer.json of the real Llama 3 and Qwen2/2.5 kinds (issue 25, "done when"): their exact
components (tests/tokenizer_kinds.py says where each comes from) over a vocabulary trained here.
Our ids, pieces, text, BOS handling, `tokens --compare-ids` and `--chat` must be AutoTokenizer's
on a hidden-string-style set. Where a llama.cpp checkout is at hand (LLAMACPP_DIR), the same
components on the real vocabularies must give the ids AutoTokenizer gave on the real files
(llama.cpp's vocabulary tests); that check names what it skipped when there is none."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import has_torch
from mlx_tinyllama.errors import UserError
from tokenizer_kinds import QWEN2_ADDED, trained, write_tokenizer

pytestmark = pytest.mark.skipif(not has_torch(), reason="needs torch + transformers")

KINDS = ("llama3", "qwen2")
HIDDEN = [
    "", " ", "  ", "\n", "\n\n\n", "\t", " \n \n", "\r\n\r\n", "   leading and trailing   ",
    "Hello world", " Hello World!", "Hello, world!\n", "HELLO wOrLd", "I'm sure you'll see it's what they've done",
    "DON'T SHOUT, I'LL SEE", "don''t 's", "1", "12", "123", "1234", "1234567890", "3.14159", "2026-12-08", "x1y22z333",
    "½ Ⅻ ٣٤ ๑๒", "café naïve Ünïcödé", "cafe\u0301 (not NFC)", "\u00a0nbsp\u200bzero width",
    "中文字符和日本語のテキスト", "한국어 텍스트", "нещо на Български", "العربية हिन्दी עברית",
    "emoji 🙂🚀🦙", "👩‍👩‍👧 family", "🙂🙂🙂", "Cửa Việt",
    "<|im_start|>user\nhi<|im_end|>", "<|begin_of_text|>text<|eot_id|>", "<|im_start", "<tool_call>x</tool_call>",
    "def f(x):\n\treturn x ** 2  # comment\n", "<html><body>x</body></html>", "{\"json\": [1, 2]}",
    "a" * 60, "   " * 10 + "end", "!!!???...", " ?!", "\n\n\tx\n  y",
]


def _model_dir(kind: str, d: Path) -> Path:
    """A tiny transformers model of the kind's architecture beside the tokenizer; Qwen2's
    embedding is padded past the tokenizer as Qwen2's are (151936 rows for 151665 tokens)."""
    import torch
    import transformers

    n = write_tokenizer(kind, d)
    cls, config = ("LlamaForCausalLM", "LlamaConfig") if kind == "llama3" else ("Qwen2ForCausalLM", "Qwen2Config")
    vocab = n if kind == "llama3" else (n // 64 + 1) * 64
    torch.manual_seed(0)
    getattr(transformers, cls)(getattr(transformers, config)(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab, bos_token_id=n - 256 if kind == "llama3" else None, tie_word_embeddings=True,
        eos_token_id=n - 256 + 9 if kind == "llama3" else n - len(QWEN2_ADDED) + 2)).save_pretrained(str(d))
    return d


@pytest.fixture(scope="module", params=KINDS)
def kind_dir(request, tmp_path_factory):
    from transformers import AutoTokenizer

    d = _model_dir(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, d, AutoTokenizer.from_pretrained(str(d))


def _ids(x):
    return list(x["input_ids"] if hasattr(x, "keys") else x)


def test_ids_pieces_and_text_equal_autotokenizers(kind_dir):
    from mlx_tinyllama.tokenizer import load_tokenizer

    kind, d, theirs = kind_dir
    ours = load_tokenizer(d)
    assert ours.kind == "hf" and ours.vocab_size == len(theirs)
    assert ours.eos_id == theirs.eos_token_id
    assert ours.bos_id == (theirs.bos_token_id if theirs.bos_token_id is not None else -1)
    for text in HIDDEN:
        ids = ours.encode(text)
        assert ids == theirs(text, add_special_tokens=False)["input_ids"], (kind, text)
        assert ours.pieces(ids) == theirs.convert_ids_to_tokens(ids), (kind, text)
        assert ours.decode(ids) == theirs.decode(ids), (kind, text)
        assert ours.decode(ids, skip_special=True) == theirs.decode(ids, skip_special_tokens=True), (kind, text)


def test_the_kinds_differ_where_their_real_files_do(kind_dir):
    """Not one tokenizer twice: Llama 3 groups digits by three and Qwen2 splits each, Qwen2
    normalizes to NFC and Llama 3 does not (each shown by AutoTokenizer on these files too)."""
    from mlx_tinyllama.tokenizer import load_tokenizer

    kind, d, theirs = kind_dir
    ours = load_tokenizer(d)
    digits = ours.pieces(ours.encode("1234567"))
    assert "".join(digits) == "1234567"
    assert (max(map(len, digits)) if kind == "llama3" else 1) == max(map(len, digits)) <= 3, digits
    assert kind == "qwen2" or max(map(len, digits)) > 1, digits
    composed, decomposed = ours.encode("caf\u00e9"), ours.encode("cafe\u0301")
    assert (composed == decomposed) == (kind == "qwen2")


def test_bos_is_added_as_autotokenizer_adds_it_or_refused_where_there_is_none(kind_dir):
    """Llama 3's post-processor prepends <|begin_of_text|> (our --bos gives the same ids); Qwen2
    has no BOS token, so --bos is refused in one line instead of running id -1."""
    from mlx_tinyllama.tokenizer import load_tokenizer

    kind, d, theirs = kind_dir
    ours = load_tokenizer(d)
    for text in ("Hello world", "中文 🙂 123"):
        with_specials = theirs(text)["input_ids"]
        if kind == "llama3":
            assert ours.encode(text, bos=True) == with_specials and with_specials[0] == theirs.bos_token_id
        else:
            assert with_specials == ours.encode(text)  # Qwen2 adds nothing
            with pytest.raises(UserError, match="has no BOS token"):
                ours.encode(text, bos=True)


def test_bos_on_the_command_line_is_refused_in_one_line_for_any_tokenizer_without_one(tmp_path, capsys):
    """The same refusal on another kind: a Llama-3-structured tokenizer.json whose
    tokenizer_config.json names no bos_token, through `tokens --bos` (exit 2, one line); with
    the bos_token named, the same command runs (exit 0)."""
    from mlx_tinyllama.trace import main as cli

    d = _model_dir("llama3", tmp_path)
    config = json.loads((d / "tokenizer_config.json").read_text())
    assert cli(["tokens", "--model", str(d), "--prompt", "Hello", "--bos"]) == 0
    capsys.readouterr()
    (d / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "bos_token"}))
    assert cli(["tokens", "--model", str(d), "--prompt", "Hello", "--bos"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no BOS token" in err, err


@pytest.mark.parametrize("system", [None, "Be brief. 简短。"])
def test_chat_ids_equal_apply_chat_template(kind_dir, system, tmp_path):
    from mlx_tinyllama.trace import main as cli

    kind, d, theirs = kind_dir
    user = "  Hello! How're you? 🙂 12345 <|im_end|>"
    out = tmp_path / "t.json"
    args = ["tokens", "--model", str(d), "--chat", user, "--json", str(out)] + \
        (["--system", system] if system is not None else [])
    assert cli(args) == 0
    ours = json.loads(out.read_text())["prompt"]
    messages = ([{"role": "system", "content": system}] if system is not None else []) + \
        [{"role": "user", "content": user}]
    assert ours["text"] == theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ours["ids"] == _ids(theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def test_compare_ids_passes_autotokenizers_ids_and_names_an_engine_of_the_wrong_kind(kind_dir, capsys):
    """`tokens --compare-ids`: AutoTokenizer's ids for the prompt are identical (exit 0); an engine
    that tokenizes it the other kind's way (Qwen2's single digits in a Llama 3 vocabulary; no NFC
    for Qwen2) is named (exit 1)."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers

    from mlx_tinyllama.trace import main as cli
    from tokenizer_kinds import QWEN2_REGEX

    kind, d, theirs = kind_dir
    text = "Year 2026: 1234567 cafe\u0301s."
    ids = theirs(text, add_special_tokens=False)["input_ids"]
    assert cli(["tokens", "--model", str(d), "--prompt", text, "--compare-ids", ",".join(map(str, ids))]) == 0
    capsys.readouterr()
    wrong = Tokenizer.from_file(str(d / "tokenizer.json"))
    if kind == "llama3":
        wrong.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        wrong.normalizer = normalizers.Sequence([])
    other = wrong.encode(text, add_special_tokens=False).ids
    assert other != ids and wrong.decode(other) == text
    assert cli(["tokens", "--model", str(d), "--prompt", text, "--compare-ids", ",".join(map(str, other))]) == 1
    out = capsys.readouterr().out
    assert ("1" if kind == "llama3" else "cafe") in out and "differ" in out, out


REAL = {"llama3": "llama-bpe", "qwen2": "qwen2"}


@pytest.mark.slow  # ~30 s each: the real vocabularies are 128k and 152k tokens
@pytest.mark.parametrize("kind", KINDS)
def test_the_components_on_the_real_vocabularies_give_the_real_files_ids(kind, tmp_path):
    """These components with Meta-Llama-3's and Qwen's own vocabularies and merges (read from
    llama.cpp's vocabulary GGUFs, not committed) give, for llama.cpp's test strings, the ids
    AutoTokenizer gave on the real tokenizer.json (its .out files); and AutoTokenizer on the files
    made here agrees. Needs a llama.cpp source checkout (LLAMACPP_DIR or .llamacpp)."""
    import gguf
    from transformers import AutoTokenizer

    from mlx_tinyllama.tokenizer import load_tokenizer

    root = Path(os.environ.get("LLAMACPP_DIR") or Path(__file__).resolve().parents[1] / ".llamacpp")
    models = root / "src" / "models"
    base = models / f"ggml-vocab-{REAL[kind]}.gguf"
    if not base.is_file():
        pytest.skip(f"no llama.cpp vocabulary {base}: the real-vocabulary check was not run")
    fields = gguf.GGUFReader(str(base)).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 1}  # normal tokens; the rest are added
    write_tokenizer(kind, tmp_path, vocab, fields["tokenizer.ggml.merges"].contents())
    ours, theirs = load_tokenizer(tmp_path, "hf"), AutoTokenizer.from_pretrained(str(tmp_path))
    texts = Path(f"{base}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    wants = Path(f"{base}.out").read_text(encoding="utf-8").split("\n")
    assert len(texts) >= 40
    for text, want in zip(texts, wants):
        want = [int(x) for x in want.split()]
        assert ours.encode(text) == want, (kind, text)
        assert theirs(text, add_special_tokens=False)["input_ids"] == want, (kind, text)

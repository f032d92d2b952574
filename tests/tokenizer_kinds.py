"""tokenizer.json files of the two real byte-level BPE kinds, Llama 3 and Qwen2/2.5, with their
published components (pre-tokenizer regex and ByteLevel settings, normalizer, post-processor,
decoder, BPE options, added tokens, tokenizer_config.json and a chat template of their form), on
a vocabulary trained here (no third-party vocabulary is committed).

Where the structure comes from: Meta-Llama-3's tokenizer.json (normalizer null; Split with the
cl100k-style regex whose digit runs are \\p{N}{1,3}, "Isolated", then ByteLevel without its own
regex; a Sequence post-processor ByteLevel + TemplateProcessing that prepends <|begin_of_text|>;
BPE with ignore_merges; 256 special tokens after the vocabulary), and Qwen2's (normalizer NFC;
the same regex with single digits \\p{N}; ByteLevel post-processor and decoder; <|endoftext|>,
<|im_start|>, <|im_end|> and Qwen2.5's further added tokens, two of them not special; no BOS).
transformers' own Qwen2Tokenizer builds the same pipeline in code (tokenization_qwen2.py), and
llama.cpp's vocabulary tests (models/ggml-vocab-{llama-bpe,qwen2}.gguf.inp/.out, made by
AutoTokenizer on the real files) are matched by these components on the real vocabularies:
tests/test_family_tokenizers.py checks that where a llama.cpp checkout is at hand."""

from __future__ import annotations

import json
from pathlib import Path

LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

LLAMA3_SPECIALS = (["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
                   + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)])  # 256 in all
QWEN2_ADDED = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
               ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
               ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True),
               ("<|vision_end|>", True), ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
               ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", True), ("<|fim_middle|>", True),
               ("<|fim_suffix|>", True), ("<|fim_pad|>", True), ("<|repo_name|>", True), ("<|file_sep|>", True)]

# Llama 3 Instruct's template (trimmed content, BOS written by the template on the first message).
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Qwen2.5 Instruct's form: a default system prompt when none is given, a tools branch (tojson),
# `message.role` attribute access; its tool-call branches are left out.
QWEN2_CHAT_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}"
    "{{- messages[0]['content'] }}{%- else %}{{- 'You are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.' }}{%- endif %}{{- '\\n\\n# Tools\\n\\n<tools>' }}{%- for tool in tools %}{{- '\\n' }}"
    "{{- tool | tojson }}{%- endfor %}{{- '\\n</tools><|im_end|>\\n' }}{%- else %}"
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
    "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a "
    "helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- endif %}{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
    "(message.role == 'assistant') %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + "
    "'\\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

CORPUS = [
    "The quick brown fox jumps over the lazy dog. I'm sure you'll see it's what they've done, isn't it?",
    "Hello, world! Hello World! HELLO wOrLd. print('hello')  # comment\n\tdef f(x):\n\t\treturn x ** 2\n",
    "Numbers: 0 1 12 123 1234 12345 3.14159 2026-12-08 1,000,000 ½ Ⅻ ٣٤ ๑๒",
    "café naïve Ünïcödé façade Äpfel Cửa Việt нещо на Български Ελληνικά עברית العربية हिन्दी",
    "中文字符和日本語のテキスト、한국어 텍스트。我们的模型很好。",
    "emoji 🙂🚀🦙 👩‍👩‍👧 ✨ mixed with text 🙂🙂",
    "   leading spaces\n\n\nnewlines\r\n\r\nand\t\ttabs    trailing   ",
    "mixedCASE_snake-case/path.py <html><body>x</body></html> {\"json\": [1, 2]} a+b=c; x->y",
] * 8


def _train(regex: str, nfc: bool, vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=not nfc, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _added(content: str, id: int, special: bool) -> dict:
    return {"id": id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": special}


def llama3_tokenizer_json(vocab: dict[str, int], merges: list) -> dict:
    """A tokenizer.json of Llama 3's structure over `vocab` and `merges`."""
    n = len(vocab)
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [_added(s, n + i, True) for i, s in enumerate(LLAMA3_SPECIALS)],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": {"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
            {"type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                        {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                      {"Sequence": {"id": "A", "type_id": 0}},
                      {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}},
                      {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [n],
                                                      "tokens": ["<|begin_of_text|>"]}}}]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": merges},
    }


def qwen2_tokenizer_json(vocab: dict[str, int], merges: list) -> dict:
    """A tokenizer.json of Qwen2/Qwen2.5's structure over `vocab` and `merges`."""
    n = len(vocab)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [_added(s, n + i, special) for i, (s, special) in enumerate(QWEN2_ADDED)],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_REGEX}, "behavior": "Isolated", "invert": False},
            byte_level]},
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


def llama3_tokenizer_config(bos_id: int) -> dict:
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
            "clean_up_tokenization_spaces": True, "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": 131072, "chat_template": LLAMA3_CHAT_TEMPLATE}


def qwen2_tokenizer_config(first_added: int) -> dict:
    return {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>", "unk_token": None, "errors": "replace", "split_special_tokens": False,
            "add_prefix_space": False, "clean_up_tokenization_spaces": False, "model_max_length": 131072,
            "additional_special_tokens": [s for s, special in QWEN2_ADDED[1:] if special and "im_" in s],
            "added_tokens_decoder": {str(first_added + i): {k: v for k, v in _added(s, 0, sp).items() if k != "id"}
                                     for i, (s, sp) in enumerate(QWEN2_ADDED)},
            "chat_template": QWEN2_CHAT_TEMPLATE}


def trained(kind: str, vocab_size: int = 1200) -> tuple[dict, list]:
    """(vocab, merges) trained here with `kind`'s own pre-tokenizer."""
    tok = _train(LLAMA3_REGEX if kind == "llama3" else QWEN2_REGEX, kind == "qwen2", vocab_size)
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], model["merges"]


def write_tokenizer(kind: str, d: Path, vocab: dict | None = None, merges: list | None = None) -> int:
    """tokenizer.json + tokenizer_config.json of `kind` in `d`; returns the tokenizer's size."""
    if vocab is None:
        vocab, merges = trained(kind)
    make = llama3_tokenizer_json if kind == "llama3" else qwen2_tokenizer_json
    tj = make(vocab, merges)
    (d / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    config = llama3_tokenizer_config(len(vocab)) if kind == "llama3" else qwen2_tokenizer_config(len(vocab))
    (d / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return len(vocab) + len(tj["added_tokens"])

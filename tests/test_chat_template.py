"""The chat prompt is rendered exactly as transformers' apply_chat_template renders it."""

from __future__ import annotations

import argparse
import json

import pytest

from mlx_tinyllama.chat_template import (SEED_MESSAGES, SEED_PROMPT, TINYLLAMA_CHAT_TEMPLATE, render_chat,
                                         template_for)
from mlx_tinyllama.errors import UserError
from mlx_tinyllama.cli_common import add_prompt_arguments
from mlx_tinyllama.prompt import resolve_prompt
from conftest import PACKAGED, SEED_IDS

# TinyLlama-1.1B-Chat-v1.0's tokenizer_config.json `chat_template`, as JSON text.
TINYLLAMA_JSON = ('"{% for message in messages %}\\n{% if message[\'role\'] == \'user\' %}\\n'
                  '{{ \'<|user|>\\\\n\' + message[\'content\'] + eos_token }}\\n'
                  '{% elif message[\'role\'] == \'system\' %}\\n{{ \'<|system|>\\\\n\' + message[\'content\'] + eos_token }}\\n'
                  '{% elif message[\'role\'] == \'assistant\' %}\\n'
                  '{{ \'<|assistant|>\\\\n\'  + message[\'content\'] + eos_token }}\\n{% endif %}\\n'
                  '{% if loop.last and add_generation_prompt %}\\n{{ \'<|assistant|>\' }}\\n{% endif %}\\n{% endfor %}"')

CONVERSATIONS = [
    list(SEED_MESSAGES),
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "  spaces  \n and lines\n"}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
     {"role": "user", "content": "And 3+3? 日本語 😀"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<s> literal </s> tokens"},
     {"role": "assistant", "content": "ok"}],
    [{"role": "tool", "content": "ignored role"}, {"role": "user", "content": "{{ not jinja }}"}],
]


def test_builtin_template_is_tinyllamas():
    assert TINYLLAMA_CHAT_TEMPLATE == json.loads(TINYLLAMA_JSON)


def test_seed_messages_render_the_seed_prompt():
    assert render_chat(SEED_MESSAGES) == SEED_PROMPT
    assert render_chat(SEED_MESSAGES, add_generation_prompt=False) == SEED_PROMPT[: -len("<|assistant|>\n")]


@pytest.fixture(scope="module")
def transformers_tokenizer(tmp_path_factory, write_tokenizer_dir):
    from transformers import PreTrainedTokenizerFast

    model_dir = write_tokenizer_dir(tmp_path_factory.mktemp("chat"))
    return PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", chat_template=TINYLLAMA_CHAT_TEMPLATE)


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_matches_transformers_apply_chat_template(transformers_tokenizer, index, generation_prompt):
    messages = CONVERSATIONS[index]
    expected = transformers_tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                                          tokenize=False)
    assert render_chat(messages, add_generation_prompt=generation_prompt) == expected


def test_model_template_wins_over_builtin(tmp_path):
    assert template_for(None) == TINYLLAMA_CHAT_TEMPLATE
    assert template_for(tmp_path) == TINYLLAMA_CHAT_TEMPLATE  # nothing there
    own = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": own}))
    assert template_for(tmp_path) == own
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "x"}, {"name": "default", "template": own}]}))
    assert template_for(tmp_path) == own
    (tmp_path / "chat_template.jinja").write_text("jinja file")
    assert template_for(tmp_path) == "jinja file"


def test_resolve_prompt_renders_the_model_template(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(PACKAGED.read_bytes())
    parser = argparse.ArgumentParser()
    add_prompt_arguments(parser)
    assert resolve_prompt(parser.parse_args([]), tmp_path, tmp_path).ids == SEED_IDS
    own = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": own}))
    prompt = resolve_prompt(parser.parse_args(["--chat", "hi", "--system", "sys"]), tmp_path, tmp_path)
    assert prompt.text == "[system] sys</s>\n[user] hi</s>\n" and prompt.source == "--chat"


def test_bad_templates_and_messages_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not parse"):
        render_chat(SEED_MESSAGES, template="{% for %}")
    with pytest.raises(UserError, match="only user"):
        render_chat(SEED_MESSAGES, template="{{ raise_exception('only user') }}")
    with pytest.raises(UserError, match="role"):
        render_chat([{"content": "no role"}])
    (tmp_path / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(UserError, match="not valid JSON"):
        template_for(tmp_path)

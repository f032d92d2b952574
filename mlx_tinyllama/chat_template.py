"""TinyLlama's chat template (Zephyr style), rendered as transformers renders it.

The built-in template is TinyLlama-1.1B-Chat-v1.0's `chat_template` from its
tokenizer_config.json, character for character (the double space before `+` in the
assistant branch included). A model directory's own template wins over it.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from .errors import UserError

# Real newlines separate the blocks; `\n` inside the quotes is a Jinja escape.
TINYLLAMA_CHAT_TEMPLATE = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)

SEED_MESSAGES = (
    {"role": "system", "content": "You are a friendly chatbot."},
    {"role": "user", "content": "Hello! How are you?"},
)
SEED_PROMPT = "<|system|>\nYou are a friendly chatbot.</s>\n<|user|>\nHello! How are you?</s>\n<|assistant|>\n"


@lru_cache(maxsize=16)
def _compile(template: str):
    """The same Jinja environment as transformers' apply_chat_template."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' tojson: no HTML escaping
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"chat template does not parse: {e.message} (line {e.lineno})") from None


def render_chat(messages, add_generation_prompt: bool = True, template: str | None = None,
                eos_token: str = "</s>", bos_token: str = "<s>") -> str:
    """The prompt text for `messages` (dicts with `role` and `content`)."""
    import jinja2

    messages = [_check_message(m, i) for i, m in enumerate(messages)]
    compiled = _compile(TINYLLAMA_CHAT_TEMPLATE if template is None else template)
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               eos_token=eos_token, bos_token=bos_token, unk_token="<unk>", pad_token=eos_token)
    except jinja2.TemplateError as e:
        raise UserError(f"chat template failed: {e}") from None


def _check_message(message, index: int) -> dict:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise UserError(f"chat message {index} needs a string 'role': {message!r}")
    if not isinstance(message.get("content"), str):
        raise UserError(f"chat message {index} ({message['role']}) needs a string 'content'")
    return dict(message)


def template_for(model_dir) -> str:
    """The model directory's own chat template (chat_template.jinja, else tokenizer_config.json's
    `chat_template`), or the built-in TinyLlama one when it has none (or is not a directory)."""
    return own_template(model_dir) or TINYLLAMA_CHAT_TEMPLATE


def own_template(model_dir) -> str | None:
    """The model directory's own chat template, or None when it declares none."""
    if model_dir is None or not Path(model_dir).is_dir():
        return None
    model_dir = Path(model_dir)
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():  # transformers prefers this file when both exist
        return _read_text(jinja_file)
    config_file = model_dir / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(_read_text(config_file))
    except json.JSONDecodeError as e:
        raise UserError(f"{config_file} is not valid JSON: {e}") from None
    template = config.get("chat_template") if isinstance(config, dict) else None
    return _pick_template(template, config_file)


def _pick_template(template, where: Path) -> str | None:
    """A template string, or the "default" of a list of named templates."""
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise UserError(f"{where}: chat_template is neither a string nor a list with a 'default' template")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not valid UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None

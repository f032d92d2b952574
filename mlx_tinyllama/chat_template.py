"""TinyLlama's chat template (Zephyr style), rendered as transformers renders it.

The built-in template is TinyLlama-1.1B-Chat-v1.0's `chat_template` from its
tokenizer_config.json, character for character (the double space before `+` in the
assistant branch included). A model directory's own template wins over it.
"""

from __future__ import annotations

import json
import re
import time
from contextvars import ContextVar
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


# A template is code from a model directory: it runs in jinja2's sandbox and within this budget, so a
# hostile or broken one (nested loops, string multiplication, runaway recursion) ends in one clear line.
MAX_OUTPUT_CHARS = 1 << 20  # a prompt that fits any Llama context is far shorter
MAX_STEPS = 1 << 20  # range() iterations, calls and operators, all together
MAX_SECONDS = 10.0

_budget: ContextVar["_Budget | None"] = ContextVar("chat_template_budget", default=None)


class _Budget:
    def __init__(self):
        self.steps, self.deadline = 0, time.monotonic() + MAX_SECONDS

    def step(self, n: int = 1) -> None:
        self.steps += n
        if self.steps > MAX_STEPS:
            raise _OverBudget(f"it takes more than {MAX_STEPS} steps")
        if self.steps % 1024 == 0 and time.monotonic() > self.deadline:
            raise _OverBudget(f"it runs longer than {MAX_SECONDS:g} s")


class _OverBudget(Exception):
    pass


def _spend(n: int = 1) -> None:
    budget = _budget.get()
    if budget is not None:
        budget.step(n)


def _sized(value):
    """Refuse a string or list longer than the output could ever be, as soon as it is made."""
    if isinstance(value, (str, list, tuple)) and len(value) > MAX_OUTPUT_CHARS:
        raise _OverBudget(f"it builds a value of {len(value)} items (at most {MAX_OUTPUT_CHARS})")
    return value


def _budget_range(*args):
    for a in args:
        if isinstance(a, int) and abs(a) > MAX_STEPS:
            raise _OverBudget(f"range({', '.join(map(str, args))}) is beyond {MAX_STEPS} steps")
    for i in range(*args):
        _spend()
        yield i


def _guard_filter(f):
    def guarded(*args, **kwargs):
        for a in (*args[1:], *kwargs.values()):  # the first is the filtered value (or the context)
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_OUTPUT_CHARS:
                raise _OverBudget(f"a filter argument of {a} is beyond {MAX_OUTPUT_CHARS}")
        _spend()
        return _sized(f(*args, **kwargs))

    for attr in ("jinja_pass_arg",):  # context/environment-passing filters keep their marker
        if hasattr(f, attr):
            setattr(guarded, attr, getattr(f, attr))
    return guarded


@lru_cache(maxsize=16)
def _compile(template: str):
    """The same Jinja environment as transformers' apply_chat_template, inside a budget."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BudgetedEnvironment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**", "+", "%"])

        def call_binop(self, context, operator, left, right):
            _spend()
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
                raise _OverBudget(f"it raises to the power {right}")
            if isinstance(left, int) and left.bit_length() > 1 << 16:
                raise _OverBudget(f"it computes with a {left.bit_length()}-bit integer")
            if operator == "%" and isinstance(left, str) and re.search(r"\d{7,}", left):
                raise _OverBudget("it formats with a width of millions")
            if operator == "*" and isinstance(left, int) and isinstance(right, (str, list, tuple)):
                left, right = right, left
            if operator == "*" and isinstance(left, (str, list, tuple)) and isinstance(right, int):
                if len(left) * right > MAX_OUTPUT_CHARS:
                    raise _OverBudget(f"it multiplies a value of {len(left)} items by {right}")
            return _sized(super().call_binop(context, operator, left, right))

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
            _spend()
            return _sized(super().call(__context, __obj, *args, **kwargs))

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' tojson: no HTML escaping
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = BudgetedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.filters = {name: _guard_filter(f) for name, f in env.filters.items()}
    env.globals["range"] = _budget_range
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        compiled = env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"chat template does not parse: {e.message} (line {e.lineno})") from None
    except RecursionError:
        raise UserError("chat template does not parse: it nests too deeply") from None
    # `a ~ b` compiles to a call of the module-level str_join/markup_join, which no sandbox hook sees;
    # sized versions in the compiled template's own namespace stop a doubling loop before memory goes.
    namespace = compiled.root_render_func.__globals__
    for name in ("str_join", "markup_join"):
        if name in namespace:
            namespace[name] = _sized_join(namespace[name])
    return compiled


def _sized_join(join):
    def sized(seq):
        _spend()
        return _sized(join(seq))

    return sized


def render_chat(messages, add_generation_prompt: bool = True, template: str | None = None,
                eos_token: str = "</s>", bos_token: str = "<s>") -> str:
    """The prompt text for `messages` (dicts with `role` and `content`), within the template budget."""
    import jinja2

    messages = [_check_message(m, i) for i, m in enumerate(messages)]
    compiled = _compile(TINYLLAMA_CHAT_TEMPLATE if template is None else template)
    token = _budget.set(_Budget())
    try:
        chunks, size = [], 0
        for chunk in compiled.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                       eos_token=eos_token, bos_token=bos_token, unk_token="<unk>",
                                       pad_token=eos_token):
            size += len(chunk)
            if size > MAX_OUTPUT_CHARS:
                raise _OverBudget(f"it renders more than {MAX_OUTPUT_CHARS} characters")
            _spend()
            chunks.append(chunk)
        return "".join(chunks)
    except _OverBudget as e:
        raise UserError(f"chat template stopped: {e}; a chat prompt needs far less") from None
    except jinja2.TemplateError as e:
        raise UserError(f"chat template failed: {e}") from None
    except RecursionError:
        raise UserError("chat template failed: it recurses too deeply") from None
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, ZeroDivisionError, OverflowError,
            MemoryError) as e:
        raise UserError(f"chat template failed: {type(e).__name__}: {e}") from None
    finally:
        _budget.reset(token)


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


MAX_FILE_BYTES = 16 << 20  # a tokenizer_config.json with its added tokens is well under this


def _read_text(path: Path) -> str:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise UserError(f"{path} is {path.stat().st_size} bytes; at most {MAX_FILE_BYTES} are read")
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not valid UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None

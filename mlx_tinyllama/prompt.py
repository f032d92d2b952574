"""The prompt that the prompt options name (cli_common.add_prompt_arguments), shared by
`run`, `generate`, `paths`, `stability`, `compare` and `tokens`.

Without a prompt option the prompt is the seed's chat prompt (system "You are a
friendly chatbot." + user "Hello! How are you?" + generation prompt) rendered with
the model's chat template, without BOS: exactly the reference's 38 ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .chat_template import SEED_MESSAGES, render_chat, template_for
from .errors import UserError, read_bytes
from .tokenizer import load_tokenizer


# Prompts are read up to this size: any Llama context holds far less text (TinyLlama's 2048 tokens are
# ~10 kB), and tokenizing or printing tens of MB would run for minutes.
MAX_PROMPT_BYTES = 1 << 20


def check_prompt_size(text: str, option: str) -> str:
    try:
        n = len(text.encode("utf-8"))
    except UnicodeEncodeError as e:  # bytes the shell could not decode arrive as lone surrogates
        raise UserError(f"{option}: the text is not valid UTF-8 (character {e.start}); give UTF-8 text or "
                        "use --prompt-file") from None
    if n > MAX_PROMPT_BYTES:
        raise UserError(f"{option}: the prompt is {n} bytes; prompts are read up to {MAX_PROMPT_BYTES} bytes "
                        "(a 2048-token context holds about 10 kB of text)")
    return text


@dataclass
class Prompt:
    ids: list[int]
    text: str | None  # None when the ids were given directly
    pieces: list[str] = field(default_factory=list)
    source: str = "seed chat prompt"


def parse_ids(text: str, option: str = "--token-ids") -> list[int]:
    """`1,2,3` (spaces and surrounding brackets allowed) -> [1, 2, 3]."""
    body = text.strip().strip("[]").replace(" ", "")
    if not body:
        raise UserError(f"{option}: no token ids given")
    ids = []
    for pos, item in enumerate(body.split(",")):
        try:
            ids.append(int(item))
        except ValueError:
            raise UserError(f"{option}: {item!r} at position {pos} is not an integer token id") from None
    return ids


def check_ids(ids: list[int], vocab_size: int, option: str = "--token-ids") -> None:
    for pos, i in enumerate(ids):
        if not 0 <= i < vocab_size:
            raise UserError(f"{option}: id {i} at position {pos} is outside the vocabulary (0..{vocab_size - 1})")


def read_prompt_file(path) -> str:
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError:
        size = 0  # read_bytes says what is wrong with it
    if size > MAX_PROMPT_BYTES:
        raise UserError(f"--prompt-file: {path} is {size} bytes; prompts are read up to {MAX_PROMPT_BYTES} bytes "
                        "(a 2048-token context holds about 10 kB of text)")
    data = read_bytes(path, "--prompt-file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"--prompt-file: {path} is not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 1]!r})") from None


def prompt_text(args, chat_template_dir, eos_token: str = "</s>", bos_token: str = "<s>") -> tuple[str | None, str]:
    """(text, source) for the options in `args`; text is None for --token-ids."""
    system = getattr(args, "system", None)
    chat = getattr(args, "chat", None)
    if system is not None and chat is None:
        raise UserError("--system needs --chat USER")
    if getattr(args, "token_ids", None) is not None:
        return None, "--token-ids"
    for option in ("prompt", "chat", "system"):
        if getattr(args, option, None) is not None:
            check_prompt_size(getattr(args, option), f"--{option}")
    if getattr(args, "prompt", None) is not None:
        return args.prompt, "--prompt"
    if getattr(args, "prompt_file", None) is not None:
        return read_prompt_file(args.prompt_file), f"--prompt-file {args.prompt_file}"
    if chat is not None:
        messages = ([{"role": "system", "content": system}] if system is not None else [])
        messages.append({"role": "user", "content": chat})
        source = "--chat"
    else:
        messages, source = list(SEED_MESSAGES), "seed chat prompt"
    text = render_chat(messages, add_generation_prompt=True, template=template_for(chat_template_dir),
                       eos_token=eos_token, bos_token=bos_token)
    return text, source


def resolve_prompt(args, tokenizer_location: Path, chat_template_dir: Path | None) -> Prompt:
    """The prompt's ids (and text and pieces) from the options added by `add_prompt_arguments`."""
    tokenizer = load_tokenizer(tokenizer_location, getattr(args, "tokenizer", None) or "auto")
    specials = {i: p for p, i in tokenizer.special_ids.items()}
    text, source = prompt_text(args, chat_template_dir, eos_token=specials.get(tokenizer.eos_id, "</s>"),
                               bos_token=specials.get(tokenizer.bos_id, "<s>"))
    if text is None:
        ids = parse_ids(args.token_ids)
        check_ids(ids, tokenizer.vocab_size)
    else:
        ids = tokenizer.encode(text, bos=bool(getattr(args, "bos", False)))
    if not ids:  # nothing downstream can run on zero tokens
        raise UserError(f"{source}: the prompt is empty, it gives no tokens")
    return Prompt(ids=ids, text=text, pieces=tokenizer.pieces(ids), source=source)

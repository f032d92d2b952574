"""`tokens`: tokenize a prompt, show ids with their pieces, diff against another engine's ids.

Exit code 0, or 1 when `--compare-ids` differs from ours; bad input is exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import UserError
from .. import cli_common, contracts
from ..prompt import check_ids, parse_ids, resolve_prompt
from ..tokendiff import compare_ids
from ..tokenizer import load_tokenizer


def add_arguments(p) -> None:
    p.add_argument("--model", default="synthetic",
                   help="where the tokenizer comes from: a model directory (tokenizer.model / tokenizer.json), "
                        "a .gguf file, a Hugging Face repo id, or synthetic[:preset] (the packaged Llama 2 "
                        "tokenizer; default)")
    cli_common.add_prompt_arguments(p)
    p.add_argument("--compare-ids", metavar="1,529,...",
                   help="another engine's ids for this prompt: align them with ours and name each difference")
    p.add_argument("--json", metavar="PATH",
                   help="write the prompt {ids, pieces, text, source} (and the alignment) as JSON")


SPEC = contracts.Spec(paths=(cli_common.MODEL_PATH, cli_common.PROMPT_PATH, cli_common.JSON_PATH),
                      unused=cli_common.PROMPT_UNUSED)


def _tokenizer_location(spec: str) -> Path:
    from ..sources import tokenizer_location  # lazy: sources imports MLX and the model

    return tokenizer_location(spec)


def main(args) -> int:
    location = _tokenizer_location(args.model)
    template_dir = location if location.is_dir() else None
    prompt = resolve_prompt(args, location, template_dir)
    tokenizer = load_tokenizer(location, args.tokenizer)

    alignment = other = None
    if args.compare_ids is not None:
        other = parse_ids(args.compare_ids, "--compare-ids")
        check_ids(other, tokenizer.vocab_size, "--compare-ids")
        alignment = compare_ids(prompt.ids, other, tokenizer)

    _print_tokens(prompt, tokenizer, alignment)
    if prompt.text is not None:
        _warn_if_tokenizers_disagree(location, args, prompt.ids)
    if args.json:
        _write_json(args.json, prompt, tokenizer, alignment)
    return 1 if alignment is not None and not alignment.identical else 0


# --- output --------------------------------------------------------------------------


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def _shown(piece: str | None) -> str:
    """A piece with control characters made visible, markup-safe for rich."""
    from rich.markup import escape

    return "" if piece is None else escape(piece.encode("unicode_escape").decode("ascii")
                                           if not piece.isprintable() else piece)


def _print_tokens(prompt, tokenizer, alignment) -> None:
    con = _console()
    con.print(f"prompt ({prompt.source}, {tokenizer.kind} tokenizer): {len(prompt.ids)} tokens")
    if prompt.text is not None:
        con.print(f"text: {_shown(prompt.text)}")
    con.print(_ids_table(prompt, tokenizer) if alignment is None else _alignment_table(alignment, tokenizer))
    con.print(f"ids: {prompt.ids}")
    if alignment is not None:
        con.print(f"compared: {alignment.summary()}")
        for d in alignment.differences:
            con.print(f"  - {_shown(d.message)}")


# Rows shown in a table: a long prompt's rows beyond this would take minutes to print and nobody reads
# them; the `ids:` line and --json still carry every id.
MAX_ROWS = 4096


def _ids_table(prompt, tokenizer):
    from rich.table import Table

    table = Table(show_edge=False, pad_edge=False)
    for name in ("pos", "id", "piece"):
        table.add_column(name, justify="right" if name != "piece" else "left")
    for pos, (i, piece) in enumerate(zip(prompt.ids[:MAX_ROWS], prompt.pieces)):
        table.add_row(str(pos), str(i), _shown(piece))
    if len(prompt.ids) > MAX_ROWS:
        table.add_row("…", "", f"{len(prompt.ids) - MAX_ROWS} more tokens not shown (all ids below and in --json)")
    return table


def _alignment_table(alignment, tokenizer):
    from rich.table import Table

    table = Table(show_edge=False, pad_edge=False)
    for name in ("pos", "ours", "piece", "", "theirs", "piece ", "pos "):
        table.add_column(name)
    marks = {"equal": "", "substitute": "≠", "insert": "+", "delete": "-"}
    first = next((k for k, (tag, _, _) in enumerate(alignment.ops) if tag != "equal"), 0)
    start = max(0, min(first - 8, len(alignment.ops) - MAX_ROWS))  # the rows around the first difference
    if start:
        table.add_row("…", "", f"{start} equal rows not shown", "", "", "", "")
    for tag, i, j in alignment.ops[start:start + MAX_ROWS]:
        a = alignment.expected[i] if i is not None else None
        b = alignment.actual[j] if j is not None else None
        style = None if tag == "equal" else "bold red"
        table.add_row("" if i is None else str(i), "" if a is None else str(a),
                      _shown(None if a is None else tokenizer.piece(a)), marks[tag],
                      "" if b is None else str(b), _shown(None if b is None else tokenizer.piece(b)),
                      "" if j is None else str(j), style=style)
    if len(alignment.ops) > start + MAX_ROWS:
        table.add_row("…", "", f"{len(alignment.ops) - start - MAX_ROWS} more rows not shown", "", "", "", "")
    return table


def _warn_if_tokenizers_disagree(location: Path, args, ids: list[int]) -> None:
    """SentencePiece is the ground truth; a tokenizer.json may differ from it (see tokenizer.py)."""
    used = load_tokenizer(location, args.tokenizer).kind if args.tokenizer == "auto" else args.tokenizer
    other_kind = "hf" if used == "sentencepiece" else "sentencepiece"
    other_file = "tokenizer.json" if other_kind == "hf" else "tokenizer.model"
    if not (location.is_dir() and (location / other_file).is_file()):
        return
    try:
        other = resolve_prompt(_with(args, tokenizer=other_kind), location, location)
    except UserError as e:
        print(f"warning: could not compare with --tokenizer {other_kind}: {e}", file=sys.stderr)
        return
    if other.ids == ids:
        return
    first = compare_ids(ids, other.ids, load_tokenizer(location, args.tokenizer)).differences[0]
    print(f"warning: --tokenizer {other_kind} ({other_file}) gives different ids for this text "
          f"({len(other.ids)} vs {len(ids)}); first difference: {first.message}", file=sys.stderr)


def _with(args, **changes):
    import argparse

    return argparse.Namespace(**{**vars(args), **changes})


def _write_json(path, prompt, tokenizer, alignment) -> None:
    from ..results import PromptRecord, ResultHeader

    data = {**ResultHeader.without_model("tokens", None, PromptRecord.of(prompt)).as_dict(),
            "tokenizer": tokenizer.kind}
    if alignment is not None:
        data["compare_ids"] = alignment.actual
        data["compare_pieces"] = tokenizer.pieces(alignment.actual)
        data["alignment"] = alignment.to_dict()
    cli_common.write_json(path, data)

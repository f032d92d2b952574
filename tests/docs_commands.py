"""The shell commands printed in README.md and docs/*.md, as a reader would copy them.

Read from fenced blocks (```bash / ```sh: every line; other fences: the lines that start a
command) and from indented code blocks, with `\\` continuations joined and a here-document kept
with the line that opens it. In a block not marked as shell, indented lines after a command go
on with it (a usage synopsis). A `$ ` prompt and a trailing `# comment` are dropped. The lines of a
non-shell block that do not start with a launcher (`python`, `bash`, `xz`, `VAR=value ...`) are
output or code, never commands.

In prose, an inline code span that starts with a launcher is a command too (`python -m
mlx_tinyllama.trace COMMAND --help`), its line breaks joined.

A helper of tests/test_docs_commands.py, kept apart so that the extraction is tested on its own.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

SHELL_INFOS = {"bash", "sh", "shell", "zsh"}
# the first word of a command line in a block that is not marked as shell (after VAR=value words)
LAUNCHERS = {"python", "python3", "bash", "sh", "xz", "pip", "pip3", "/usr/bin/time", "mlx-tinyllama-trace"}
_FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")
_HEREDOC = re.compile(r"<<-?\s*(['\"]?)(\w+)\1")
_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_SPAN = re.compile(r"(?<!`)`([^`]+)`(?!`)")


@dataclass(frozen=True)
class DocCommand:
    path: str  # relative to the repository, e.g. "docs/paths.md"
    line: int  # 1-based line of the command's first line
    text: str  # the command, continuations joined, without `$ ` or a trailing comment
    output: tuple[str, ...] = ()  # the lines the doc prints after a `$ ` command (its expected output)

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def strip_comment(line: str) -> str:
    """The line without a trailing `# comment` (a `#` outside quotes, after a space)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def starts_command(line: str) -> bool:
    """Whether a line of a block not marked as shell is a command (`$ ` prompt or a launcher)."""
    s = line.strip()
    if s.startswith("$ "):
        return True
    try:
        words = shlex.split(s, comments=True)
    except ValueError:
        words = s.split()
    while words and _ASSIGN.match(words[0]):
        words = words[1:]
    return bool(words) and words[0] in LAUNCHERS


def _commands_of_block(path: str, first_line: int, lines: list[str], shell: bool) -> list[DocCommand]:
    out: list[DocCommand] = []
    i = 0
    while i < len(lines):
        raw = lines[i]
        start = first_line + i
        i += 1
        if not raw.strip() or raw.strip().startswith("#"):
            continue
        prompt = raw.strip().startswith("$ ")
        if not shell and not starts_command(raw):
            continue
        text = raw.strip()[2:] if prompt else raw.strip()
        while i < len(lines) and (text.endswith("\\") or (  # continuation lines
                not shell and not prompt and lines[i][:1].isspace() and lines[i].strip())):
            # (a usage synopsis in a plain block goes on in indented lines without a backslash)
            text = text.rstrip("\\").rstrip() + " " + strip_comment(lines[i].strip())
            i += 1
        text = strip_comment(text)
        here = _HEREDOC.search(text)
        if here:  # the here-document's body and terminator belong to this command
            body = []
            while i < len(lines) and lines[i].strip() != here.group(2):
                body.append(lines[i])
                i += 1
            i += 1
            text = "\n".join([text, *body, here.group(2)])
        output: list[str] = []
        if prompt:  # what the doc shows the command printing, up to the next command
            while i < len(lines) and not starts_command(lines[i]):
                output.append(lines[i])
                i += 1
        out.append(DocCommand(path, start, text, tuple(output)))
    return out


def extract(repo: Path, path: str) -> list[DocCommand]:
    """Every command of one Markdown file: the code blocks' in the order printed, then the prose's."""
    lines = (repo / path).read_text(encoding="utf-8").split("\n")
    prose = list(lines)  # the file with its code blocks blanked, for the inline spans
    out: list[DocCommand] = []
    i = 0
    prev_blank = True
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m:
            fence, info = m.group(2), m.group(3).lower()
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith(fence):
                j += 1
            out += _commands_of_block(path, i + 2, lines[i + 1:j], info in SHELL_INFOS)
            prose[i:j + 1] = [""] * len(prose[i:j + 1])
            i, prev_blank = j + 1, False
            continue
        if prev_blank and lines[i].startswith("    ") and lines[i].strip():  # an indented code block
            j = i
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                j += 1
            out += _commands_of_block(path, i + 1, [ln[4:] for ln in lines[i:j]], False)
            prose[i:j] = [""] * (j - i)
            i, prev_blank = j, True
            continue
        prev_blank = not lines[i].strip()
        i += 1
    text = "\n".join(prose)
    for m in _SPAN.finditer(text):
        span = " ".join(m.group(1).split())
        if starts_command(span) and not span.startswith("$ "):
            out.append(DocCommand(path, text.count("\n", 0, m.start()) + 1, strip_comment(span)))
    return out


def doc_files(repo: Path) -> list[str]:
    return ["README.md", *sorted(f"docs/{p.name}" for p in (repo / "docs").glob("*.md"))]


def all_commands(repo: Path) -> list[DocCommand]:
    return [c for path in doc_files(repo) for c in extract(repo, path)]

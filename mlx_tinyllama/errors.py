"""The one exception type that means "the user's input is wrong".

The CLI turns it into a single `error: ...` line and exit code 2; OutputError (a
failed write) into one line and exit code 1; anything else is a bug in this package:
one line and exit code 3, the traceback under --debug.
"""


class UserError(Exception):
    """Bad input (file, option, model, prompt): reported as one line, exit code 2."""


class OutputError(Exception):
    """An output could not be written (disk full, read-only, I/O error): one line, exit code 1.
    The earlier file, if any, is intact (writes go through a temporary file)."""


def read_bytes(path, what: str) -> bytes:
    """The bytes of a file the user named; a missing or unreadable one is a UserError
    that says which option or file kind (`what`) it was."""
    from pathlib import Path

    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{what}: {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{what}: {path} is a directory, not a file") from None
    except OSError as e:
        raise UserError(f"{what}: cannot read {path}: {e.strerror or e}") from None

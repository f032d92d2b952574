"""The one exception type that means "the user's input is wrong".

The CLI turns it into a single `error: ...` line and exit code 2; anything else
is a bug in this package and keeps its traceback.
"""


class UserError(Exception):
    """Bad input (file, option, model, prompt): reported as one line, exit code 2."""

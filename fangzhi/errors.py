"""User-facing errors: the CLI prints their message and exits with status 2, never a traceback."""


class FangzhiError(Exception):
    """A problem the user can fix (bad input, missing file, wrong setting). The message says what to change."""

"""The one exception type for bad user input."""


class UserError(Exception):
    """Bad input at the boundary (a path, a value, a file). The CLI prints its message on one line,
    prefixed with ``error:``, and exits with code 2, without a traceback. The message names the input
    and says how to fix it."""

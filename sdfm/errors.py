"""The one exception type for bad user input."""


class UserError(Exception):
    """Bad input at the boundary (a path, a value, a file). The CLI prints its message on one line,
    prefixed with ``error:``, and exits with code 2, without a traceback. The message names the input
    and says how to fix it."""


class AgreedError(UserError):
    """A UserError that every rank of a data-parallel job raised from the same agreed facts (a config
    that differs between ranks, a batch that does not divide): only rank 0 prints it."""

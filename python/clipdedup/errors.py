"""Errors a user can cause. They carry a one-line message that the CLI prints without a traceback."""


class UserError(Exception):
    """Bad input, wrong model for a DB, missing directory: the CLI prints the message and exits 2."""


class ModelError(UserError):
    """The model cannot be loaded (unknown id, not cached and no network, bad checkpoint)."""


class DBMismatchError(UserError):
    """The DB was written with another model or embedding layout."""

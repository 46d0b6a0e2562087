"""Errors a user can cause. They carry a one-line message that the CLI prints without a traceback."""


class UserError(Exception):
    """Bad input, wrong model for a DB, missing directory: the CLI prints the message and exits 2."""


class ModelError(UserError):
    """The model cannot be loaded (unknown id, not cached and no network, bad checkpoint)."""


class DBMismatchError(UserError):
    """The DB was written with another model or embedding layout."""


class TooManyPairsError(UserError):
    """More candidate pairs than a GPU screen's limit in one call (thousands of copies of one image).

    Raised by the Triton kernel's wrapper (`clipdedup.kernels.pairwise`, which re-exports it) and by
    `torch-cuda`'s streamed screen; it lives here so that the latter needs no triton."""

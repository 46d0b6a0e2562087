"""The only importer of the compiled clipdedup._native module.

Paths cross into C++ as bytes (os.fsencode), so names that are not valid UTF-8 round-trip.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from clipdedup import _native


def default_threads() -> int:
    return max(1, min(16, (os.cpu_count() or 1) * 2))


def npy_dim(path: str | os.PathLike[str]) -> tuple[int | None, str | None]:
    """(D, None) for a valid one-vector float32 .npy file, else (None, reason)."""
    dim, _offset, err = _native.npy_header(os.fsencode(path))
    return dim, err


def read_npy_into(
    paths: Sequence[str | os.PathLike[str]], out: np.ndarray, threads: int | None = None
) -> list[tuple[int, str]]:
    """Reads each one-vector .npy file into the matching row of `out`.

    Args:
        paths: N file paths.
        out: float32 array of shape (N, D), C-contiguous and writable; owned by the caller (a
            numpy array, or the `.numpy()` view of a pinned torch tensor).
        threads: reader threads; default twice the core count (I/O bound), at most 16.

    Returns:
        (row, reason) for each file that could not be read; those rows are left untouched.
    """
    if out.dtype != np.float32 or out.ndim != 2 or not out.flags.c_contiguous:
        raise ValueError("out must be a C-contiguous float32 (N, D) array")
    encoded = [os.fsencode(p) for p in paths]
    return list(_native.read_npy_into(encoded, out, threads or default_threads()))

"""Atomic file writes: a temp file in the target's directory, then a rename over the target.

A crash or a failed write leaves either the old file or the new one, never a truncated file. Temp
names end in TMP_MARK, so the DB's orphan clean-up can recognise and remove leftovers.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import IO, Any

TMP_MARK = ".clipdedup-tmp"


@contextlib.contextmanager
def atomic_file(
    path: str | os.PathLike[str], mode: str = "wb", *, mtime_ns: int | None = None, **open_kwargs: Any
) -> Iterator[IO[Any]]:
    """Yields a file to write; on a clean exit it replaces `path` (with `mtime_ns` set, if given)."""
    path = os.fspath(path)
    d, name = os.path.split(path)
    d = d or "."
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=TMP_MARK, dir=d)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
        if mtime_ns is not None:
            os.utime(tmp, ns=(mtime_ns, mtime_ns))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise

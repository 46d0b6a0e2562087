"""An asynchronous writer of the DB's `.npy` files.

Small-file writes (create a temp file, write 2 KB, rename) cost a few syscalls each; on a
network or spinning disk they add up to as much as encoding. One background thread writes while
the encoder works on the next batch. The queue is bounded, so a slow disk slows the encoder rather
than filling memory; every file goes through `db.atomic_write` (temp file + rename), so a crash or
an error never leaves a truncated `.npy`; the first error is raised in the caller's thread at the
next `put` or at `close`, and the writer stops taking work.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable

import numpy as np

from clipdedup.db import layout as dbmod
from clipdedup.errors import UserError

_STOP = object()


class AsyncWriter:
    """Writes (image rel, vector, image mtime) as `db_dir/rel.npy` on a background thread.

    Use as a context manager, or call `close()`; `close()` waits for every queued file.

    Args:
        db_dir: the DB directory.
        max_queue: vectors waiting at most (a `put` blocks beyond that).
        write: the function that writes one file (default `db.write_embedding`).
    """

    def __init__(
        self,
        db_dir: str | os.PathLike[str],
        max_queue: int = 1024,
        write: Callable[..., None] = dbmod.write_embedding,
    ) -> None:
        self.db_dir, self._write = db_dir, write
        self._q: queue.Queue = queue.Queue(maxsize=max(1, max_queue))
        self._error: BaseException | None = None
        self._failed_rel: str | None = None
        self.written = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="clipdedup-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is _STOP:
                return
            if self._error is not None:
                continue  # drain: after the first error nothing more is written
            rel, vec, mtime_ns = job
            try:
                self._write(self.db_dir, rel, vec, mtime_ns)
                self.written += 1
            except BaseException as e:  # handed to the caller's thread
                self._error, self._failed_rel = e, rel

    def _raise(self) -> None:
        e = self._error
        if e is None:
            return
        if isinstance(e, OSError):
            where = dbmod.npy_path(self.db_dir, self._failed_rel or "")
            raise UserError(f"{where}: cannot write embedding ({e.strerror or e})") from e
        raise e

    def put(self, rel: str, vec: np.ndarray, image_mtime_ns: int | None = None) -> None:
        """Queues one vector (copied: the caller may reuse its buffer). Raises an earlier write error.

        `image_mtime_ns` is stamped on the file (see `db.write_embedding`)."""
        if self._closed:
            raise RuntimeError("AsyncWriter is closed")
        self._raise()
        self._q.put((rel, np.array(vec, dtype=np.float32, copy=True), image_mtime_ns))

    def close(self) -> None:
        """Waits until every queued vector is written; raises the first write error, if any."""
        if not self._closed:
            self._closed = True
            self._q.put(_STOP)
            self._thread.join()
        self._raise()

    def __enter__(self) -> AsyncWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        # Already failing: finish what was queued (each file is whole or absent), keep that error.
        self._closed = True
        self._q.put(_STOP)
        self._thread.join()

"""One run at a time per DB dir (and per trash dir): an advisory lock file holding pid and host.

The lock is `flock(2)` on a file that stays in place, so the kernel drops it when its holder dies,
even by `kill -9`, and no stale lock can block a later run. The file's content says who holds it
(pid, host, start time, command); it is emptied on a clean release, so content found by the next
holder means the last run died holding it: that is reported ("taking over a stale lock") and the
run goes on. Where the file system has no flock (some network mounts), the content alone decides:
a pid of this host that no longer runs is stale, anything else is refused.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable

from clipdedup.errors import UserError

DB_LOCK_NAME = ".clipdedup.lock"
# The trash dir's own folder (journal, lock); trash.journal names it META_DIR.
TRASH_META_DIR = ".clipdedup"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _describe(info: dict) -> str:
    if info.get("starting"):
        return "a run that is just starting, or one on a disk too full to note its pid"
    who = f"pid {info.get('pid', '?')} on {info.get('host', '?')}"
    if info.get("time"):
        who += f", started {info['time']}"
    if info.get("cmd"):
        who += f": {info['cmd']}"
    return who


class DirLock:
    """Exclusive lock on `path` (a file, created if missing). Use as a context manager.

    Raises:
        UserError: another live run holds the lock.
    """

    def __init__(self, path: str, what: str, log: Callable[[str], None] | None = None):
        self.path = path
        self.what = what
        self.log = log or (lambda line: print(line, file=sys.stderr))
        self._fd: int | None = None

    def _read(self, fd: int) -> dict:
        raw = os.pread(fd, 4096, 0)
        if not raw.strip():
            return {}
        try:
            info = json.loads(raw.decode("utf-8", "replace"))
            return info if isinstance(info, dict) else {"raw": raw[:80].decode("ascii", "replace")}
        except ValueError:
            return {"raw": raw[:80].decode("ascii", "replace")}

    def _holder(self, fd: int, wait_s: float = 1.0) -> dict:
        """Who holds the lock. A holder that has just taken it may not have written its note yet:
        wait for it a moment rather than report an unknown holder."""
        end = time.monotonic() + wait_s
        info = self._read(fd)
        while not info and time.monotonic() < end:
            time.sleep(0.02)
            info = self._read(fd)
        return info or {"starting": True}

    def acquire(self) -> DirLock:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserError(
                    f"{self.path}: {self.what} is in use by another run ({_describe(self._holder(fd))}); "
                    "wait for it to finish"
                ) from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                self._check_without_flock(fd)
            prev = self._read(fd)
            if prev:
                self.log(
                    f"{self.path}: taking over a stale lock ({_describe(prev)}): "
                    "that run ended without releasing it"
                )
            me = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "cmd": " ".join(os.path.basename(a) if k == 0 else a for k, a in enumerate(sys.argv))[:100],
            }
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(me).encode() + b"\n", 0)
                os.fsync(fd)
            except OSError as e:
                # A full disk must not stop `undo`, which is what frees it: the flock alone
                # excludes other runs; only the note of who holds it is missing.
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                os.ftruncate(fd, 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def _check_without_flock(self, fd: int) -> None:
        info = self._read(fd)
        if not info:
            return
        same_host = info.get("host") == socket.gethostname()
        pid = info.get("pid")
        if same_host and isinstance(pid, int) and not pid_alive(pid):
            return
        raise UserError(
            f"{self.path}: {self.what} is in use by another run ({_describe(info)}); if that run is "
            "gone, remove this file"
        )

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # empty means: released cleanly
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        except OSError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def db_lock(db_dir: str, log: Callable[[str], None] | None = None) -> DirLock:
    return DirLock(os.path.join(db_dir, DB_LOCK_NAME), f"DB dir {db_dir}", log)


def trash_lock(trash_dir: str, log: Callable[[str], None] | None = None) -> DirLock:
    return DirLock(os.path.join(trash_dir, TRASH_META_DIR, "lock"), f"trash dir {trash_dir}", log)


def run_locks(
    stack: contextlib.ExitStack,
    db_dirs: list[str],
    trash_dir: str | None,
    log: Callable[[str], None] | None = None,
) -> None:
    """Takes, on `stack`, the locks of the DB dirs a run writes and of its trash dir (one lock per
    distinct directory)."""
    taken: set[str] = set()
    for d in db_dirs:
        if os.path.realpath(d) not in taken:
            taken.add(os.path.realpath(d))
            stack.enter_context(db_lock(d, log))
    if trash_dir is not None:
        stack.enter_context(trash_lock(trash_dir, log))

"""The move journal: an append-only JSON-lines file in the trash dir (`undo.py` reads it back).

Every move is written down and fsynced *before* it happens, and marked done after, so a run killed
at any instant leaves a journal that names every file it may have touched. `undo` walks the journal
backwards and puts each file back, whatever state the crash left it in:

- only in the trash (the move finished)            -> moved back;
- at both names, one inode (killed between link and unlink) -> the trash name is dropped;
- only at the source (killed before the link)       -> nothing to do;
- at the source and as a full or partial copy in the trash (cross-device copy cut short) -> the
  source is intact; an identical copy is dropped, a partial one is left and reported.

Records (one JSON object per line, `"t"` says which):
    run     {run, time, image_dir, trash_dir, strategy, mode, host, pid}
    move    {run, seq, source, dest, size, mtime_ns, hash, group, kept, strategy}  (intent)
    done    {run, seq}                 the move finished
    failed  {run, seq, reason}         the move was rolled back; the file is at its source
    undone  {run, seq, status}         undo dealt with this move

`source` and `kept` are absolute paths; `dest` is relative to the trash dir, so a trash dir that was
moved as a whole can still be undone. Non-UTF-8 names are stored as Python's surrogate escapes
(`\\udcXX` in JSON) and round-trip to the original bytes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

from clipdedup.util.lock import TRASH_META_DIR

META_DIR = TRASH_META_DIR
JOURNAL_NAME = "journal.jsonl"
HASH_NAME = "blake2b"


def journal_path(trash_dir: str | os.PathLike[str]) -> str:
    return os.path.join(trash_dir, META_DIR, JOURNAL_NAME)


def undo_stage_path(source: str, run: str, seq: int) -> str:
    """The name beside `source` where undo copies a file back across file systems before linking
    it into place (see `fileops.restore_exact`); fixed per move, so a later undo finds a leftover.
    Short, whatever the source's name, so it always fits NAME_MAX."""
    return os.path.join(os.path.dirname(source), f".clipdedup-undo-{run}-{seq}.part")


def move_grab_path(source: str, run: str, seq: int) -> str:
    """The name beside `source` that a move renames the source to just before dropping it (see
    `fileops.move_exact`); fixed per move, so undo finds and drops one that a crash left behind."""
    return os.path.join(os.path.dirname(source), f".clipdedup-move-{run}-{seq}.part")


def new_run_id() -> str:
    """A sortable, unique run id: UTC time to the second plus 6 random hex digits."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def content_hash(path: str | os.PathLike[str]) -> str:
    """`blake2b:<hex>` of a file's bytes; of the link text for a symlink (moves never follow links)."""
    h = hashlib.blake2b(digest_size=32)
    if os.path.islink(path):
        h.update(b"symlink:" + os.fsencode(os.readlink(path)))
        return f"{HASH_NAME}:{h.hexdigest()}"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return f"{HASH_NAME}:{h.hexdigest()}"


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the file's own fsync still holds
    finally:
        os.close(fd)


def open_for_append(path: str) -> int:
    """Opens the journal for appending. A line cut short by a crash is ended first, so the next
    record does not glue onto it (the reader skips the broken line)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n" and os.write(fd, b"\n") != 1:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    except BaseException:
        os.close(fd)  # a full disk: the caller may try again later
        raise
    return fd


def append_record(fd: int, rec: dict[str, Any], *, sync: bool) -> None:
    """One record, one write(2) on an O_APPEND descriptor; fsynced when `sync`.

    A write that fails or comes up short (a full disk) is cut off again, so the journal never
    ends in a partial line that the next record would glue onto; the error is raised."""
    data = (json.dumps(rec, ensure_ascii=True, sort_keys=True) + "\n").encode("ascii")
    size = os.fstat(fd).st_size  # the writer holds the trash dir's lock: no one else appends
    try:
        n = os.write(fd, data)
        if n != len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if sync:
            os.fsync(fd)
    except OSError:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
        raise


class Journal:
    """Appends one run's records to the trash dir's journal. It opens on the first record, so a run
    that moves nothing leaves no journal (and no trash dir) behind."""

    def __init__(self, trash_dir: str, run_id: str, header: dict[str, Any]):
        self.trash_dir = trash_dir
        self.run_id = run_id
        self.path = journal_path(trash_dir)
        self._header = header
        self._fd: int | None = None
        self._seq = 0

    def _open(self) -> int:
        if self._fd is None:
            d = os.path.dirname(self.path)
            new = not os.path.exists(self.path)
            os.makedirs(d, exist_ok=True)
            self._fd = open_for_append(self.path)
            append_record(self._fd, {"t": "run", "run": self.run_id, **self._header}, sync=True)
            if new:
                fsync_dir(d)
        return self._fd

    def intend(self, rec: dict[str, Any]) -> int:
        """Records a move about to happen, durably (fsync), and returns its sequence number."""
        fd = self._open()
        self._seq += 1
        append_record(fd, {"t": "move", "run": self.run_id, "seq": self._seq, **rec}, sync=True)
        return self._seq

    def done(self, seq: int) -> None:
        # Not fsynced: if this record is lost, undo finds the file in the trash all the same.
        append_record(self._open(), {"t": "done", "run": self.run_id, "seq": seq}, sync=False)

    def failed(self, seq: int, reason: str) -> None:
        rec = {"t": "failed", "run": self.run_id, "seq": seq, "reason": reason}
        append_record(self._open(), rec, sync=True)

    def close(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_header(image_dir: str, trash_dir: str, strategy: str, mode: str) -> dict[str, Any]:
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "image_dir": os.path.abspath(image_dir),
        "trash_dir": os.path.abspath(trash_dir),
        "strategy": strategy,
        "mode": mode,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "version": 1,
    }


def read_records(trash_dir: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """All records of the trash dir's journal, in file order, and a note per unreadable line."""
    path = journal_path(trash_dir)
    recs: list[dict[str, Any]] = []
    bad: list[str] = []
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except FileNotFoundError:
        return recs, bad
    for k, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("ascii"))
            if not isinstance(rec, dict) or "t" not in rec or "run" not in rec:
                raise ValueError("not a journal record")
        except (ValueError, UnicodeDecodeError) as e:
            bad.append(f"{path}:{k}: unreadable journal line skipped ({str(e).splitlines()[0]})")
            continue
        recs.append(rec)
    return recs, bad


@dataclass
class MoveEntry:
    """One journaled move and what became of it."""

    run: str
    seq: int
    rec: dict[str, Any]
    state: str  # "pending" (no completion record), "done", "failed", "undone"

    @property
    def source(self) -> str:
        return self.rec["source"]


@dataclass
class RunInfo:
    run: str
    header: dict[str, Any]
    moves: list[MoveEntry]

    def count(self, state: str) -> int:
        return sum(1 for m in self.moves if m.state == state)


def runs(trash_dir: str | os.PathLike[str]) -> tuple[list[RunInfo], list[str]]:
    """The runs of the journal in the order they were started, each with its moves' states."""
    recs, bad = read_records(trash_dir)
    by_run: dict[str, RunInfo] = {}
    moves: dict[tuple[str, int], MoveEntry] = {}
    for rec in recs:
        run, t = rec["run"], rec["t"]
        info = by_run.setdefault(run, RunInfo(run, {}, []))
        if t == "run":
            info.header = rec
        elif t == "move":
            m = MoveEntry(run, int(rec["seq"]), rec, "pending")
            moves[(run, m.seq)] = m
            info.moves.append(m)
        elif t in ("done", "failed", "undone") and (run, rec.get("seq")) in moves:
            m = moves[(run, rec["seq"])]
            if not (m.state == "undone" and t != "undone"):
                m.state = t
    return list(by_run.values()), bad

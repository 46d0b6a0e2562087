"""Undo: put the files that runs moved back where they were, from the trash dir's journal.

The journal is walked backwards (newest run first, last move first), and each move is resolved by
what is on disk, whatever state a crash left it in (see `restore_one`). A move that was dealt with
gets an `undone` record, so undo can be run again, also after it was itself interrupted.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from clipdedup.errors import UserError
from clipdedup.trash.journal import (
    JOURNAL_NAME,
    META_DIR,
    MoveEntry,
    RunInfo,
    append_record,
    content_hash,
    journal_path,
    open_for_append,
    runs,
)
from clipdedup.trash.move import move_exact
from clipdedup.util.lock import trash_lock


@dataclass
class UndoResult:
    source: str
    dest: str
    status: str  # restored | nothing-to-do | refused | missing
    message: str

    def line(self) -> str:
        return f"{self.status}: {self.source}: {self.message}"


def iter_undo_order(infos: list[RunInfo], run: str | None) -> Iterator[MoveEntry]:
    """Moves to undo, newest run first and last move first (so a name freed later is refilled first)."""
    for info in reversed(infos):
        if run is not None and info.run != run:
            continue
        for m in reversed(info.moves):
            if m.state in ("pending", "done"):
                yield m


def undo(
    trash_dir: str,
    run: str | None = None,
    *,
    dry_run: bool = False,
    log: Callable[[str], None] | None = None,
) -> list[UndoResult]:
    """Puts the files moved by `run` (default: every run in the journal) back where they were.

    Never overwrites: a file that has reappeared at an original path is reported and its trashed
    twin left in the trash. A trashed file whose content hash differs from the journal's is left too.
    The trash dir's lock is held throughout (except for a dry run), so no run moves files meanwhile
    and a move without a completion record is one that a crash cut short.

    Returns:
        One result per journaled move that was not yet undone or rolled back.

    Raises:
        UserError: no journal, an unknown run, or another run holds the trash dir.
    """
    if not os.path.exists(journal_path(trash_dir)):
        raise UserError(f"{trash_dir}: no journal ({META_DIR}/{JOURNAL_NAME}); nothing to undo")
    if dry_run:
        return _undo_locked(trash_dir, run, dry_run=True, log=log)
    with trash_lock(trash_dir, log):
        return _undo_locked(trash_dir, run, dry_run=False, log=log)


def _undo_locked(
    trash_dir: str, run: str | None, *, dry_run: bool, log: Callable[[str], None] | None
) -> list[UndoResult]:
    say = log or (lambda line: None)
    infos, bad = runs(trash_dir)
    for note in bad:
        say(note)
    if run is not None and not any(i.run == run for i in infos):
        known = ", ".join(i.run for i in infos[-5:]) or "none"
        raise UserError(f"{journal_path(trash_dir)}: no run {run!r} in the journal (latest: {known})")
    results: list[UndoResult] = []
    fd: int | None = None
    try:
        for m in iter_undo_order(infos, run):
            res = restore_one(trash_dir, m, dry_run=dry_run)
            results.append(res)
            say(res.line())
            if not dry_run and res.status in ("restored", "nothing-to-do"):
                if fd is None:
                    fd = open_for_append(journal_path(trash_dir))
                rec = {"t": "undone", "run": m.run, "seq": m.seq, "status": res.status}
                append_record(fd, rec, sync=True)
    finally:
        if fd is not None:
            os.close(fd)
    return results


def _same_inode(a: str, b: str) -> bool:
    sa, sb = os.lstat(a), os.lstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _hash_or_none(path: str) -> str | None:
    try:
        return content_hash(path)
    except OSError:
        return None


def restore_one(trash_dir: str, m: MoveEntry, *, dry_run: bool = False) -> UndoResult:
    """Puts one journaled file back at its source, whatever state a crash left the move in.

    Never overwrites: if something else sits at the source, the trashed file stays where it is.
    """
    src = m.rec["source"]
    dst = os.path.join(trash_dir, m.rec["dest"])
    want = m.rec["hash"]
    at_src, at_dst = os.path.lexists(src), os.path.lexists(dst)

    def res(status: str, msg: str) -> UndoResult:
        return UndoResult(src, dst, status, msg)

    if not at_dst:
        if not at_src:
            return res("missing", f"neither here nor at {dst} in the trash")
        if m.state == "pending" or _hash_or_none(src) == want:
            return res("nothing-to-do", "already in place")
        return res("refused", f"not in the trash ({dst} is gone) and a different file is here")
    if at_src and _same_inode(src, dst):
        # Killed between link and unlink (of the move, or of an earlier undo): one file, two names.
        if not dry_run:
            os.unlink(dst)
        return res("restored", f"was at both names; dropped the trash name {dst}")
    got = _hash_or_none(dst)
    if at_src:
        if m.state == "pending" and _hash_or_none(src) == want:
            if got == want:
                if not dry_run:
                    os.unlink(dst)  # a complete copy made by a cross-device move cut short
                return res("restored", f"the move had not finished; dropped the copy {dst}")
            return res("nothing-to-do", f"the move had not finished; incomplete copy left at {dst}")
        return res("refused", f"a file has reappeared here; left {dst} in the trash")
    if got != want:
        return res("refused", f"{dst} no longer has the content that was moved; left in the trash")
    if dry_run:
        return res("restored", f"would move back from {dst}")
    try:
        os.makedirs(os.path.dirname(src) or ".", exist_ok=True)
        move_exact(dst, src)
    except FileExistsError:
        return res("refused", f"a file has reappeared here; left {dst} in the trash")
    except OSError as e:
        return res("refused", f"cannot move back from {dst}: {e.strerror or e}")
    return res("restored", f"moved back from {dst}")

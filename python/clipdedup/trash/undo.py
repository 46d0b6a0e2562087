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
from clipdedup.trash.fileops import restore_exact
from clipdedup.trash.journal import (
    JOURNAL_NAME,
    META_DIR,
    MoveEntry,
    RunInfo,
    append_record,
    content_hash,
    journal_path,
    move_grab_path,
    open_for_append,
    runs,
    undo_stage_path,
)
from clipdedup.trash.move import is_inside, stays_inside
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
    book = _UndoneRecords(journal_path(trash_dir))
    try:
        image_dirs = {i.run: i.header.get("image_dir") for i in infos}
        for m in iter_undo_order(infos, run):
            res = restore_one(trash_dir, m, image_dirs[m.run], dry_run=dry_run)
            results.append(res)
            say(res.line())
            if not dry_run and res.status in ("restored", "nothing-to-do"):
                book.add({"t": "undone", "run": m.run, "seq": m.seq, "status": res.status})
    finally:
        left = book.close()
    if left:
        say(
            f"{journal_path(trash_dir)}: {left} undone moves could not be written down ({book.error}); "
            "the files are back all the same, and a later undo finds them in place"
        )
    return results


class _UndoneRecords:
    """Appends `undone` records to the journal, as far as the disk allows.

    Undo must work on a full trash file system, where even one journal line may not fit. The
    records only spare a later undo some checks (a file found back in place is "nothing to do"),
    so a record that cannot be written waits and is tried again after the next file has been
    moved out (which frees space); whatever is still waiting at the end is only counted.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None
        self.waiting: list[dict] = []
        self.error: str | None = None

    def add(self, rec: dict) -> None:
        self.waiting.append(rec)
        try:
            if self.fd is None:
                self.fd = open_for_append(self.path)
            while self.waiting:
                append_record(self.fd, self.waiting[0], sync=True)
                self.waiting.pop(0)
        except OSError as e:
            self.error = e.strerror or str(e)

    def close(self) -> int:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        return len(self.waiting)


def _same_inode(a: str, b: str) -> bool:
    sa, sb = os.lstat(a), os.lstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _hash_or_none(path: str) -> str | None:
    try:
        return content_hash(path)
    except OSError:
        return None


def outside_image_dir(src: str, image_dir: str | None) -> str | None:
    """Why undo must not write `src` for a run of `image_dir` (its header's); None if it may.
    A source is taken only as an absolute, normalised path below the image dir, whose existing
    part resolves inside it: a damaged or forged journal line never makes undo write elsewhere."""
    if not isinstance(image_dir, str) or not os.path.isabs(image_dir):
        return "its run has no header naming its image dir (a damaged or forged journal); not touched"
    root = os.path.normpath(image_dir)
    if os.path.normpath(src) != src or not src.startswith(root.rstrip(os.sep) + os.sep):
        return f"outside its run's image dir {root} (a damaged or forged journal line); not touched"
    if not stays_inside(os.path.dirname(src), root):
        return f"its place leads outside its run's image dir {root} (symlink); not touched"
    return None


def restore_one(trash_dir: str, m: MoveEntry, image_dir: str | None, *, dry_run: bool = False) -> UndoResult:
    """Puts one journaled file back at its source, whatever state a crash left the move in.

    Never overwrites: if something else sits at the source, the trashed file stays where it is.
    A trash path that leads outside the trash dir (a directory in the trash replaced by a
    symlink, or a damaged record) is refused, so undo never takes files out of another tree; a
    source outside `image_dir` (the one its run's header records) is refused too, so undo never
    puts a file, or makes a directory, anywhere else.
    """
    fields = [m.rec.get(k) for k in ("source", "dest", "hash")]
    if not all(isinstance(v, str) and v and "\x00" not in v for v in fields):
        return UndoResult(str(fields[0]), str(fields[1]), "refused", "a damaged journal record")
    src, dest, want = (str(v) for v in fields)
    dst = os.path.join(trash_dir, dest)

    def res(status: str, msg: str) -> UndoResult:
        return UndoResult(src, dst, status, msg)

    why = outside_image_dir(src, image_dir)
    if why is not None:
        return res("refused", why)
    assert image_dir is not None  # outside_image_dir refuses a run without one
    if os.path.isabs(dest) or not is_inside(os.path.dirname(dst), trash_dir):
        return res("refused", f"its trash path {dst} leads outside the trash dir {trash_dir}; not touched")
    _drop_grab(src, dst, move_grab_path(src, m.run, m.seq), want, dry_run=dry_run)
    stage = undo_stage_path(src, m.run, m.seq)
    if os.path.lexists(stage):
        done = _resume_restore(src, dst, stage, dry_run=dry_run)
        if done is not None:
            return res("restored", done)
    at_src, at_dst = os.path.lexists(src), os.path.lexists(dst)
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
    if not os.path.isdir(image_dir):
        return res("refused", f"its image dir {image_dir} is gone; put it back and undo again")
    try:
        os.makedirs(os.path.dirname(src), exist_ok=True)
        if not is_inside(os.path.dirname(src), image_dir):
            return res("refused", f"its place leads outside its run's image dir {image_dir}; not touched")
        restore_exact(dst, src, stage)
    except FileExistsError:
        return res("refused", f"a file has reappeared here; left {dst} in the trash")
    except OSError as e:
        return res("refused", f"cannot move back from {dst}: {e.strerror or e}")
    return res("restored", f"moved back from {dst}")


def _drop_grab(src: str, dst: str, grab: str, want: str, *, dry_run: bool) -> None:
    """Drops the name a move cut short between renaming its source to `grab` and unlinking that
    (see `fileops.move_exact`), when another name holds the same file: the trash name or the
    source as the same inode, or (a move across file systems) a copy with the journaled hash."""
    if dry_run or not os.path.lexists(grab):
        return
    if any(os.path.lexists(p) and _same_inode(p, grab) for p in (dst, src)):
        os.unlink(grab)
    elif _hash_or_none(grab) == want and any(_hash_or_none(p) == want for p in (dst, src)):
        os.unlink(grab)


def _resume_restore(src: str, dst: str, stage: str, *, dry_run: bool) -> str | None:
    """Deals with `stage`, left by an undo of this move that was cut short (see
    `act.restore_exact`). Returns how the restore was finished, or None when it had not reached
    the source yet: then the partial copy is dropped (the trash copy is whole) and undo starts over.
    """
    if os.path.lexists(src) and _same_inode(src, stage):
        # The copy was linked into place: the file is back; what is left are the extra names.
        if not dry_run:
            if os.path.lexists(dst) and not _same_inode(dst, src):
                os.unlink(dst)
            os.unlink(stage)
        return f"finished an undo that was cut short; dropped {dst} and {stage}"
    if not os.path.lexists(dst):
        return None  # not ours to judge: the stage is left for the user, the result says the rest
    if not dry_run:
        os.unlink(stage)
    return None

"""Moving duplicates to the trash dir: verified right before, journaled, never overwriting, never
deleting (`undo.py` puts them back).

A move is a hard link to the destination (which fails rather than replace anything) followed by
unlinking the source, so at every instant at least one name holds the content. Across file systems
the link becomes an exclusive-create copy with fsync, then the unlink.

What the move takes is what was checked: the file's inode, size and mtime are taken before it is
hashed, and after the link (or while copying) the new name must show the same ones, else the link
is rolled back and the file is left in place (`Replaced`). After the first failure for lack of
space (or a read-only trash) a `Mover` stops trying: one reason, not one per file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import uuid

from clipdedup.records import FileEntry, MoveResult
from clipdedup.trash.journal import Journal, content_hash, fsync_dir, move_grab_path
from clipdedup.trash.keep import Candidate, choose_keep

_NO_LINK = (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK, errno.EACCES)
MAX_NAME_TRIES = 1000
# After one of these, every later move into the same trash would fail the same way.
STOP_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


class Replaced(Exception):
    """The file at the source is no longer the one that was checked; nothing was moved."""


def _same_file(st: os.stat_result, want: os.stat_result) -> bool:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == (
        want.st_dev,
        want.st_ino,
        want.st_size,
        want.st_mtime_ns,
    )


def free_destination(path: str) -> str:
    """`path` if nothing is there, else `stem (k).ext` with the first free k."""
    if not os.path.lexists(path):
        return path
    stem, ext = os.path.splitext(path)
    k = 1
    while os.path.lexists(f"{stem} ({k}){ext}"):
        k += 1
    return f"{stem} ({k}){ext}"


def _copy_exclusive(src: str, dst: str, expect: os.stat_result | None) -> None:
    """Creates dst (exclusively) as an fsynced copy of src with its mode and times; on any
    failure dst is removed. With `expect`, the file read must be that inode, unchanged throughout."""
    if os.path.islink(src):
        if expect is not None and not _same_file(os.lstat(src), expect):
            raise Replaced(src)
        os.symlink(os.readlink(src), dst)  # fails if dst exists
        return
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            if expect is not None and not _same_file(os.fstat(inp.fileno()), expect):
                raise Replaced(src)
            shutil.copyfileobj(inp, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
            if expect is not None and not _same_file(os.fstat(inp.fileno()), expect):
                raise Replaced(src)  # written to while it was copied
            st = os.fstat(inp.fileno())
            os.fchmod(out.fileno(), stat.S_IMODE(st.st_mode))
            os.utime(out.fileno(), ns=(st.st_atime_ns, st.st_mtime_ns))
    except BaseException:
        os.unlink(dst)
        raise


def _try_link(src: str, dst: str) -> bool:
    """Hard-links src (itself, if a symlink) to dst: True if done, False where the file system
    cannot (another device, no hard links); FileExistsError if dst exists, never replacing it."""
    try:
        os.link(src, dst, follow_symlinks=False)  # atomic, and fails if dst exists
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in _NO_LINK:
            raise
        return False
    return True


def _link_or_copy_no_replace(src: str, dst: str, expect: os.stat_result | None = None) -> None:
    """Creates dst with src's content; raises FileExistsError instead of replacing anything, and
    `Replaced` (dst not left behind) when src is not the file `expect` describes."""
    if _try_link(src, dst):
        if expect is not None and not _same_file(os.lstat(dst), expect):
            os.unlink(dst)  # our link, to a file that was never checked
            raise Replaced(src)
        return
    # Another file system, or one without hard links: exclusive create, copy, fsync.
    _copy_exclusive(src, dst, expect)


def move_exact(src: str, dst: str, *, expect: os.stat_result | None = None, grab: str | None = None) -> None:
    """Moves src to exactly dst. Raises FileExistsError if dst exists; on any failure src stays.

    With `expect` (src's `os.lstat` when it was checked), raises `Replaced` and leaves src alone
    when the file at src is no longer that one (another inode, size or mtime). Once dst is made,
    the source name is released by renaming it to `grab` (a name beside it; default a random one)
    rather than by unlinking it, so a file put at src in the last instant is never unlinked: it is
    put back, and the checked file stays at dst.
    """
    _link_or_copy_no_replace(src, dst, expect)
    if expect is None:
        try:
            os.unlink(src)
        except BaseException:
            os.unlink(dst)  # dst is our link or copy; src still holds the content
            raise
        return
    grab = grab or os.path.join(os.path.dirname(src), f".clipdedup-move-{uuid.uuid4().hex[:12]}.part")
    try:
        os.rename(src, grab)  # whatever sits at src now is ours to look at, atomically
    except BaseException:
        if _still(src, expect):
            os.unlink(dst)  # src still holds the checked file: roll back
        raise  # else dst is the checked file's only name left: it stays
    if _same_file(os.lstat(grab), expect):
        with contextlib.suppress(OSError):  # if it stays, it is another name of dst; undo drops it
            os.unlink(grab)
        return
    # Replaced after dst was made: the checked file's only name is now dst (moved, as journaled);
    # the newcomer goes back to its name, or stays at `grab` if that is taken yet again.
    with contextlib.suppress(FileExistsError):
        os.link(grab, src, follow_symlinks=False)
        os.unlink(grab)


def _still(path: str, expect: os.stat_result) -> bool:
    try:
        return _same_file(os.lstat(path), expect)
    except OSError:
        return False


def restore_exact(src: str, dst: str, stage: str) -> None:
    """Moves src to exactly dst like `move_exact`, for undo: a copy across file systems is written
    to `stage` (a name beside dst, fixed per move), so dst never holds a partial file.

    Order: copy to stage, link stage to dst, unlink src, unlink stage. A crash leaves, at worst,
    stage alone (a partial copy; src intact), or stage and dst as one inode with src still there:
    `undo.restore_one` recognises both by the stage name and finishes or rolls back.
    """
    if _try_link(src, dst):
        try:
            os.unlink(src)
        except BaseException:
            os.unlink(dst)
            raise
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(stage)  # a partial copy from an interrupted undo of this very move
    _copy_exclusive(src, stage, None)
    try:
        os.link(stage, dst, follow_symlinks=False)  # fails if something appeared at dst
    except BaseException:
        os.unlink(stage)
        raise
    fsync_dir(os.path.dirname(dst) or ".")
    os.unlink(src)
    os.unlink(stage)


def move_no_replace(src: str, dst: str, *, expect: os.stat_result | None = None) -> str:
    """Moves src to dst (or the next free name beside it); returns where it went."""
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    for _ in range(MAX_NAME_TRIES):
        dst = free_destination(dst)
        try:
            move_exact(src, dst, expect=expect)
            return dst
        except FileExistsError:
            continue  # lost a race for that name: take the next one
    raise OSError(errno.EEXIST, f"no free name beside {dst}")


def verify_unchanged(path: str, entry: FileEntry) -> str | None:
    """None if `path` still has the size and mtime it was scanned with, else why not."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError as e:
        return f"gone since the scan ({e.strerror})"
    if stat.S_ISLNK(st.st_mode):
        try:
            st = os.stat(path)  # a followed symlink was scanned with its target's size and mtime
        except OSError as e:
            return f"a symlink whose target is gone since the scan ({e.strerror}); not touched"
    if st.st_size != entry.size or st.st_mtime_ns != entry.mtime_ns:
        return "changed since it was scanned"
    return None


def is_inside(path: str, root: str) -> bool:
    """Whether `path` (resolved) is `root` (resolved) or below it."""
    p, r = os.path.realpath(path), os.path.realpath(root)
    return p == r or p.startswith(r.rstrip(os.sep) + os.sep)


def stays_inside(path: str, root: str) -> bool:
    """Whether `path` and every part of it that exists already resolves inside `root`, checked
    before anything is created there (a symlinked subdir leading out is refused, not entered)."""
    p, r = os.path.abspath(path), os.path.abspath(root)
    while not os.path.lexists(p) and p != r and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    return not os.path.lexists(p) or is_inside(p, root)


def link_chain(path: str, limit: int = 40) -> list[str]:
    """The symlinks a path passes through on the way to its target, `path` first (normalised,
    absolute); empty for a path that is not a symlink. A loop or a too-long chain just stops."""
    chain: list[str] = []
    p = os.path.abspath(path)
    while os.path.islink(p) and len(chain) < limit and p not in chain:
        chain.append(p)
        p = os.path.normpath(os.path.join(os.path.dirname(p), os.readlink(p)))
    return chain


def depends_on(path: str, other: str) -> bool:
    """Whether moving `other` away would break `path`.

    True when `other` is a symlink on `path`'s chain of links, or when `other` is not a symlink
    and `path` resolves to the very same directory entry by another route (`path` is a symlink to
    it, or lies in a symlinked directory). Hard links are separate entries: moving one leaves the
    other whole, so they do not depend on each other.
    """
    if os.path.abspath(path) == os.path.abspath(other):
        return False
    if os.path.islink(other):
        return os.path.abspath(other) in link_chain(path)
    return os.path.realpath(path) == os.path.realpath(other)


def is_direct(path: str, image_dir: str, rel: str) -> bool:
    """Whether image_dir/rel is the file's own entry, reached through no symlink below image_dir."""
    return not os.path.islink(path) and os.path.realpath(path) == os.path.join(
        os.path.realpath(image_dir), *rel.split("/")
    )


def check_before_move(
    image_dir: str, entry: FileEntry, kept_path: str, kept_entry: FileEntry | None
) -> str | None:
    """Everything re-checked right before a move; None if it may go ahead, else why not."""
    src = os.path.join(image_dir, entry.rel)
    why = verify_unchanged(src, entry)
    if why is not None:
        return why
    if not is_inside(os.path.dirname(src), image_dir):
        return "reached through a symlinked directory outside the image dir; not touched"
    if not os.path.exists(kept_path):
        return f"its kept copy {kept_path} is gone"
    if kept_entry is not None and verify_unchanged(kept_path, kept_entry) is not None:
        return f"its kept copy {kept_path} changed since the scan"
    if depends_on(kept_path, src):
        return f"its kept copy {kept_path} is this very file, or a symlink to it"
    return None


def move_duplicate(
    image_dir: str,
    trash_dir: str,
    entry: FileEntry,
    kept_path: str,
    *,
    dry_run: bool = False,
    kept_entry: FileEntry | None = None,
    journal: Journal | None = None,
    group: int | None = None,
    strategy: str | None = None,
) -> MoveResult:
    """Moves image_dir/entry.rel to trash_dir/entry.rel after checking it and its kept twin.

    With a `journal`, the move is recorded (and fsynced) before it happens and marked done after.
    Every failure is a skipped MoveResult with a one-line reason, never an exception.
    """
    src = os.path.join(image_dir, entry.rel)
    why = check_before_move(image_dir, entry, kept_path, kept_entry)
    if why is not None:
        return MoveResult(entry.rel, src, None, why)
    dst = os.path.join(trash_dir, entry.rel)
    if dry_run:
        return MoveResult(entry.rel, src, free_destination(dst))
    outside = "its trash path leads outside the trash dir (symlink)"
    try:
        if not stays_inside(os.path.dirname(dst), trash_dir):
            return MoveResult(entry.rel, src, None, outside)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if not is_inside(os.path.dirname(dst), trash_dir):
            return MoveResult(entry.rel, src, None, outside)
        checked = os.lstat(src)
        digest = content_hash(src)
        # The hash must describe the scanned file: a write during hashing changes size or mtime,
        # a replacement changes the inode.
        if verify_unchanged(src, entry) is not None or not _same_file(os.lstat(src), checked):
            return MoveResult(entry.rel, src, None, "changed while it was being checked")
        if journal is None:
            return MoveResult(entry.rel, src, move_no_replace(src, dst, expect=checked))
        return _journaled_move(src, dst, entry, digest, checked, kept_path, journal, group, strategy)
    except Replaced:
        return MoveResult(entry.rel, src, None, REPLACED)
    except OSError as e:
        return MoveResult(entry.rel, src, None, f"cannot move: {e.strerror or e}", error=e.errno or -1)


REPLACED = "replaced by another file after it was checked; left in place"


def _journaled_move(
    src: str,
    dst: str,
    entry: FileEntry,
    digest: str,
    checked: os.stat_result,
    kept_path: str,
    journal: Journal,
    group: int | None,
    strategy: str | None,
) -> MoveResult:
    trash = os.path.abspath(journal.trash_dir)
    for _ in range(MAX_NAME_TRIES):
        target = free_destination(dst)
        seq = journal.intend(
            {
                "source": os.path.abspath(src),
                "dest": os.path.relpath(os.path.abspath(target), trash),
                "size": entry.size,
                "mtime_ns": entry.mtime_ns,
                "hash": digest,
                "group": group,
                "kept": os.path.abspath(kept_path),
                "strategy": strategy,
            }
        )
        try:
            move_exact(src, target, expect=checked, grab=move_grab_path(src, journal.run_id, seq))
        except FileExistsError:
            journal.failed(seq, "destination name taken meanwhile")
            continue
        except Replaced:
            journal.failed(seq, REPLACED)
            return MoveResult(entry.rel, src, None, REPLACED)
        except OSError as e:
            why = f"cannot move: {e.strerror or e}"
            with contextlib.suppress(OSError):  # the journal may sit on the very disk that is full
                journal.failed(seq, why)
            return MoveResult(entry.rel, src, None, why, error=e.errno or -1)
        journal.done(seq)
        return MoveResult(entry.rel, src, target)
    return MoveResult(entry.rel, src, None, f"cannot move: no free name beside {dst}", error=errno.EEXIST)


def choose_keep_safe(image_dir: str, cands: list[Candidate], strategy: str) -> int:
    """`keep.choose_keep`, restricted to the members that are safe to keep.

    A member that depends on another (a symlink to it or through it, or the same file reached
    through a symlinked directory) is never kept, since moving that other would break it; and a
    file reached through a symlink is kept only when no member is reached directly.
    """
    safe = [
        k for k, c in enumerate(cands) if not any(depends_on(c.path, o.path) for o in cands if o is not c)
    ]
    direct = [k for k in safe if is_direct(cands[k].path, image_dir, cands[k].rel)]
    eligible = direct or safe or list(range(len(cands)))
    return eligible[choose_keep([cands[k] for k in eligible], strategy)]


class Mover:
    """Moves one run's duplicates from `image_dir` to `trash_dir` through one journal.

    The journal opens at the first real move, so a run that moves nothing writes none. After
    `close()`, `journal_path` names the journal if anything was moved through it.
    """

    def __init__(self, image_dir: str, trash_dir: str, *, dry_run: bool, strategy: str, mode: str):
        self.image_dir, self.trash_dir, self.dry_run, self.strategy = image_dir, trash_dir, dry_run, strategy
        self.run_id: str | None = None
        self.journal_path: str | None = None
        self._journal: Journal | None = None
        self.stopped: MoveResult | None = None  # the failure after which no more moves were tried
        if not dry_run:
            from clipdedup.trash.journal import new_run_id, run_header

            self.run_id = new_run_id()
            self._journal = Journal(trash_dir, self.run_id, run_header(image_dir, trash_dir, strategy, mode))

    def move(self, entry: FileEntry, kept_path: str, kept_entry: FileEntry, group: int) -> MoveResult:
        """`move_duplicate` of image_dir/entry.rel, its kept twin checked against `kept_entry`.

        After a move failed for lack of space (or a read-only trash, see STOP_ERRNOS), later
        moves are not tried: they come back failed with `tried=False`."""
        if self.stopped is not None:
            src = os.path.join(self.image_dir, entry.rel)
            why = f"not tried after {self.stopped.reason}"
            return MoveResult(entry.rel, src, None, why, error=self.stopped.error, tried=False)
        r = move_duplicate(
            self.image_dir,
            self.trash_dir,
            entry,
            kept_path,
            dry_run=self.dry_run,
            kept_entry=kept_entry,
            journal=self._journal,
            group=group,
            strategy=self.strategy,
        )
        if r.dest is not None and self._journal is not None:
            self.journal_path = self._journal.path
        if r.error in STOP_ERRNOS:
            self.stopped = r
        return r

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()

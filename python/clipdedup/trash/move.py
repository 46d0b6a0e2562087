"""Moving duplicates to the trash dir: verified right before, journaled, never overwriting, never
deleting (`undo.py` puts them back).

A move is a hard link to the destination (which fails rather than replace anything) followed by
unlinking the source, so at every instant at least one name holds the content. Across file systems
the link becomes an exclusive-create copy with fsync, then the unlink.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat

from clipdedup.records import FileEntry, MoveResult
from clipdedup.trash.journal import Journal, content_hash
from clipdedup.trash.keep import Candidate, choose_keep

_NO_LINK = (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK, errno.EACCES)
MAX_NAME_TRIES = 1000


def free_destination(path: str) -> str:
    """`path` if nothing is there, else `stem (k).ext` with the first free k."""
    if not os.path.lexists(path):
        return path
    stem, ext = os.path.splitext(path)
    k = 1
    while os.path.lexists(f"{stem} ({k}){ext}"):
        k += 1
    return f"{stem} ({k}){ext}"


def _link_or_copy_no_replace(src: str, dst: str) -> None:
    """Creates dst with src's content; raises FileExistsError instead of replacing anything."""
    try:
        os.link(src, dst, follow_symlinks=False)  # atomic, and fails if dst exists
        return
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in _NO_LINK:
            raise
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)  # fails if dst exists
        return
    # Another file system, or one without hard links: exclusive create, copy, fsync.
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        shutil.copystat(src, dst)
    except BaseException:
        os.unlink(dst)
        raise


def move_exact(src: str, dst: str) -> None:
    """Moves src to exactly dst. Raises FileExistsError if dst exists; on any failure src stays."""
    _link_or_copy_no_replace(src, dst)
    try:
        os.unlink(src)
    except BaseException:
        os.unlink(dst)  # dst is our link or copy; src still holds the content
        raise


def move_no_replace(src: str, dst: str) -> str:
    """Moves src to dst (or the next free name beside it); returns where it went."""
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    for _ in range(MAX_NAME_TRIES):
        dst = free_destination(dst)
        try:
            move_exact(src, dst)
            return dst
        except FileExistsError:
            continue  # lost a race for that name: take the next one
    raise OSError(errno.EEXIST, f"no free name beside {dst}")


def verify_unchanged(path: str, entry: FileEntry) -> str | None:
    """None if `path` still has the size and mtime it was scanned with, else why not."""
    try:
        st = os.stat(path, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            st = os.stat(path)  # a followed symlink was scanned with its target's size and mtime
    except OSError as e:
        return f"gone since the scan ({e.strerror})"
    if st.st_size != entry.size or st.st_mtime_ns != entry.mtime_ns:
        return "changed since it was scanned"
    return None


def is_inside(path: str, root: str) -> bool:
    """Whether `path` (resolved) is `root` (resolved) or below it."""
    p, r = os.path.realpath(path), os.path.realpath(root)
    return p == r or p.startswith(r.rstrip(os.sep) + os.sep)


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
    try:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if not is_inside(os.path.dirname(dst), trash_dir):
            return MoveResult(entry.rel, src, None, "its trash path leads outside the trash dir (symlink)")
        digest = content_hash(src)
        # The hash must describe the scanned file: a write during hashing changes size or mtime.
        if verify_unchanged(src, entry) is not None:
            return MoveResult(entry.rel, src, None, "changed while it was being checked")
        if journal is None:
            return MoveResult(entry.rel, src, move_no_replace(src, dst))
        return _journaled_move(src, dst, entry, digest, kept_path, journal, group, strategy)
    except OSError as e:
        return MoveResult(entry.rel, src, None, f"cannot move: {e.strerror or e}")


def _journaled_move(
    src: str,
    dst: str,
    entry: FileEntry,
    digest: str,
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
            move_exact(src, target)
        except FileExistsError:
            journal.failed(seq, "destination name taken meanwhile")
            continue
        except OSError as e:
            journal.failed(seq, f"cannot move: {e.strerror or e}")
            return MoveResult(entry.rel, src, None, f"cannot move: {e.strerror or e}")
        journal.done(seq)
        return MoveResult(entry.rel, src, target)
    return MoveResult(entry.rel, src, None, f"cannot move: no free name beside {dst}")


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
        if not dry_run:
            from clipdedup.trash.journal import new_run_id, run_header

            self.run_id = new_run_id()
            self._journal = Journal(trash_dir, self.run_id, run_header(image_dir, trash_dir, strategy, mode))

    def move(self, entry: FileEntry, kept_path: str, kept_entry: FileEntry, group: int) -> MoveResult:
        """`move_duplicate` of image_dir/entry.rel, its kept twin checked against `kept_entry`."""
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
        return r

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()

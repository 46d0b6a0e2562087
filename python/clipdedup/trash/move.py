"""Moving duplicates to the trash dir: verified right before, journaled, never overwriting, never
deleting (`undo.py` puts them back).

A move is a hard link to the destination (which fails rather than replace anything) followed by
releasing the source name, so at every instant at least one name holds the content. Across file
systems the link becomes an exclusive-create copy with fsync (see `fileops`).

What the move takes is what was checked: the file's inode, size and mtime are taken before it is
hashed, and after the link (or while copying) the new name must show the same ones, else the link
is rolled back and the file is left in place (`Replaced`). After the first failure for lack of
space (or a read-only trash) a `Mover` stops trying: one reason, not one per file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from clipdedup.records import FileEntry, MoveResult
from clipdedup.trash.fileops import (
    MAX_NAME_TRIES,
    Replaced,
    free_destination,
    move_exact,
    move_no_replace,
    same_file,
)
from clipdedup.trash.journal import Journal, content_hash, move_grab_path
from clipdedup.trash.keep import Candidate, choose_keep
from clipdedup.util.fsutil import is_inside

# Callers (and tests) reach the file operations through this module too.
__all__ = [
    "REPLACED",
    "STOP_ERRNOS",
    "MoveResult",
    "Mover",
    "Replaced",
    "check_before_move",
    "choose_keep_safe",
    "depends_on",
    "entry_id",
    "free_destination",
    "is_direct",
    "is_inside",
    "link_chain",
    "move_duplicate",
    "move_exact",
    "move_no_replace",
    "stays_inside",
    "verify_unchanged",
]

# After one of these, every later move into the same trash would fail the same way.
STOP_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


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


def entry_id(path: str) -> tuple[int, int, str] | None:
    """The directory entry `path` names: its directory's (st_dev, st_ino) and its name; None when
    its directory cannot be read. One entry id is one file, however the path is spelt, also in a
    directory reached twice through a bind mount, which `realpath` cannot tell."""
    try:
        st = os.stat(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return None
    return st.st_dev, st.st_ino, os.path.basename(path)


def depends_on(path: str, other: str) -> bool:
    """Whether moving `other` away would break `path`.

    True when `other` is a symlink on `path`'s chain of links, or when `other` is not a symlink
    and `path` resolves to the very same directory entry by another route (`path` is a symlink to
    it, or lies in a symlinked or bind-mounted directory). Hard links are separate entries: moving
    one leaves the other whole, so they do not depend on each other.
    """
    if os.path.abspath(path) == os.path.abspath(other):
        return False
    if os.path.islink(other):
        return os.path.abspath(other) in link_chain(path)
    if os.path.realpath(path) == os.path.realpath(other):
        return True
    ids = entry_id(os.path.realpath(path)), entry_id(other)
    return ids[0] is not None and ids[0] == ids[1]


def is_direct(path: str, image_dir: str, rel: str) -> bool:
    """Whether image_dir/rel is the file's own entry, reached through no symlink below image_dir."""
    return not os.path.islink(path) and os.path.realpath(path) == os.path.join(
        os.path.realpath(image_dir), *rel.split("/")
    )


def check_before_move(
    image_dir: str, entry: FileEntry, kept_path: str, kept_entry: FileEntry | None
) -> str | None:
    """Everything re-checked right before a move; None if it may go ahead, else why not."""
    if entry.rel.startswith("/") or ".." in entry.rel.split("/"):
        return "its path is absolute or climbs out of the image dir with '..'; not touched"
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
        return f"its kept copy {kept_path} is this very file (by another route), or a symlink to it"
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
        if verify_unchanged(src, entry) is not None or not same_file(os.lstat(src), checked):
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


def choose_keep_safe(
    image_dir: str, cands: list[Candidate], strategy: str, dirs: dict[str, str] | None = None
) -> int:
    """`keep.choose_keep`, restricted to the members that are safe to keep.

    A member that depends on another (a symlink to it or through it, or the same file reached
    through a symlinked directory) is never kept, since moving that other would break it; and a
    file reached through a symlink is kept only when no member is reached directly.

    `dirs`: real paths of directories already resolved (`real_dir`), shared by the groups of one
    run so that a member costs one lstat, not one per component of its path.
    """
    absp, link, real, safe = _resolve(cands, dirs)
    root = real_dir(image_dir, dirs)  # once per run with `dirs`, else once per group
    # is_direct, from the paths resolved once above
    direct = [k for k in safe if not link[k] and real[k] == os.path.join(root, *cands[k].rel.split("/"))]
    eligible = direct or safe or list(range(len(cands)))
    return eligible[choose_keep([cands[k] for k in eligible], strategy)]


def safe_members(cands: list[Candidate]) -> list[int]:
    """The members that depend on no other member (`depends_on`), with each path resolved once: a
    group of m members costs O(m) system calls, not the O(m^2) of `safe_members_ref`."""
    return _resolve(cands)[3]


def real_dir(d: str, dirs: dict[str, str] | None) -> str:
    """`os.path.realpath(d)`, looked up in and added to `dirs` (directory -> real path) when given."""
    if dirs is None:
        return os.path.realpath(d)
    real = dirs.get(d)
    if real is None:
        real = dirs[d] = os.path.realpath(d)
    return real


def real_path(p: str, dirs: dict[str, str] | None, is_link: bool) -> str:
    """`os.path.realpath(p)`. When `p`'s last component is not a symlink (`is_link` False), that is
    its directory's real path (`real_dir`, once per directory per `dirs`) joined with its name, so a
    run's members cost one lstat each instead of one per path component. `dirs` lives for one
    run's act stage: a directory swapped for a symlink after it was resolved is not seen here
    (each move checks its file again, `move_exact`)."""
    head, tail = os.path.split(p)
    if dirs is None or is_link or tail in ("", ".", ".."):
        return os.path.realpath(p)
    return os.path.join(real_dir(head, dirs), tail)


def _resolve(
    cands: list[Candidate], dirs: dict[str, str] | None = None
) -> tuple[list[str], list[bool], list[str], list[int]]:
    """Each member's absolute path, whether it is a symlink, its real path; and the safe members."""
    absp = [os.path.abspath(c.path) for c in cands]
    link = [os.path.islink(p) for p in absp]
    links = {p for p, is_link in zip(absp, link) if is_link}
    real = [real_path(p, dirs, is_link) for p, is_link in zip(absp, link)]
    entries: dict[str, set[str]] = {}  # realpath -> the members that are not symlinks, as abspaths
    for p, r, is_link in zip(absp, real, link):
        if not is_link:
            entries.setdefault(r, set()).add(p)
    safe = []
    for k, p in enumerate(absp):
        same_entry = entries.get(real[k], set()) - {p}
        through_link = links and any(q in links and q != p for q in link_chain(p))
        if not same_entry and not through_link:
            safe.append(k)
    return absp, link, real, safe


def safe_members_ref(cands: list[Candidate]) -> list[int]:
    """`safe_members` by its definition: every pair of members asked `depends_on`."""
    return [
        k for k, c in enumerate(cands) if not any(depends_on(c.path, o.path) for o in cands if o is not c)
    ]


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
        self._kept: dict[tuple[int, str], tuple[int, int]] = {}  # (group, kept) -> its inode
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
        replaced = self._kept_changed(kept_path, group)
        if replaced is not None:
            return MoveResult(entry.rel, os.path.join(self.image_dir, entry.rel), None, replaced)
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

    def _kept_changed(self, kept_path: str, group: int) -> str | None:
        """Why `group`'s kept file is no longer the inode it was at the group's first move; None if
        it still is. A move that took the kept file with it (the same file by a route no check saw)
        stops its group here, before the next copy goes too."""
        try:
            st = os.lstat(kept_path)
        except OSError:
            return None  # gone: `check_before_move` says so
        now = (st.st_dev, st.st_ino)
        if self._kept.setdefault((group, kept_path), now) == now:
            return None
        return f"its kept copy {kept_path} was replaced since its group began moving; not moved"

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()

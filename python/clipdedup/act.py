"""Moving duplicates to the trash dir: verified right before, never overwriting, never deleting."""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass

from clipdedup.scan import FileEntry


@dataclass
class MoveResult:
    rel: str
    source: str
    dest: str | None  # None when skipped
    reason: str | None = None  # why skipped


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
        os.link(src, dst)  # atomic, and fails if dst exists
        return
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK, errno.EACCES):
            raise
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


def move_no_replace(src: str, dst: str) -> str:
    """Moves src to dst (or the next free name beside it); returns where it went.

    The destination is made to hold the file before the source name is removed, so at every moment
    at least one name refers to the content.
    """
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    while True:
        dst = free_destination(dst)
        try:
            _link_or_copy_no_replace(src, dst)
            break
        except FileExistsError:
            continue  # lost a race for that name: take the next one
    os.unlink(src)
    return dst


def verify_unchanged(path: str, entry: FileEntry) -> str | None:
    """None if `path` still has the size and mtime it was scanned with, else why not."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError as e:
        return f"gone since the scan ({e.strerror})"
    if st.st_size != entry.size or st.st_mtime_ns != entry.mtime_ns:
        return "changed since it was scanned"
    return None


def move_duplicate(
    image_dir: str, trash_dir: str, entry: FileEntry, kept_path: str, *, dry_run: bool = False
) -> MoveResult:
    """Moves image_dir/entry.rel to trash_dir/entry.rel after checking it and its kept twin."""
    src = os.path.join(image_dir, entry.rel)
    why = verify_unchanged(src, entry)
    if why is None and not os.path.exists(kept_path):
        why = f"its kept copy {kept_path} is gone"
    if why is not None:
        return MoveResult(entry.rel, src, None, why)
    dst = os.path.join(trash_dir, entry.rel)
    if dry_run:
        return MoveResult(entry.rel, src, free_destination(dst))
    try:
        return MoveResult(entry.rel, src, move_no_replace(src, dst))
    except OSError as e:
        return MoveResult(entry.rel, src, None, f"cannot move: {e.strerror or e}")

"""One file to one exact name, never replacing anything and never losing the content.

`move_exact` (forward, into the trash) and `restore_exact` (undo, back out) link where they can and
copy (exclusive create, fsync, mode and times kept) where they cannot; at every instant at least
one name holds the whole content. `move_exact` with `expect` moves only the file that was
checked: see its docstring. `trash.move` decides what to move; this module only moves it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import uuid

from clipdedup.trash.journal import fsync_dir

_NO_LINK = (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK, errno.EACCES)
MAX_NAME_TRIES = 1000


class Replaced(Exception):
    """The file at the source is no longer the one that was checked; nothing was moved."""


def same_file(st: os.stat_result, want: os.stat_result) -> bool:
    """Same inode, size and mtime: the file that was checked, unchanged."""
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
        if expect is not None and not same_file(os.lstat(src), expect):
            raise Replaced(src)
        os.symlink(os.readlink(src), dst)  # fails if dst exists
        return
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            if expect is not None and not same_file(os.fstat(inp.fileno()), expect):
                raise Replaced(src)
            shutil.copyfileobj(inp, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
            if expect is not None and not same_file(os.fstat(inp.fileno()), expect):
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
        if expect is not None and not same_file(os.lstat(dst), expect):
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
    if same_file(os.lstat(grab), expect):
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
        return same_file(os.lstat(path), expect)
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

"""Atomic file writes: a temp file in the target's directory, then a rename over the target.

A crash or a failed write leaves either the old file or the new one, never a truncated file. Temp
names end in TMP_MARK, so the DB's orphan clean-up can recognise and remove leftovers.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import IO, Any

from clipdedup.errors import UserError

TMP_MARK = ".clipdedup-tmp"
NAME_MAX = 255  # bytes in one path component on Linux file systems (ext4, xfs, btrfs, tmpfs)
_TMP_EXTRA = 1 + 1 + 8 + len(TMP_MARK)  # ".", ".", mkstemp's 8 random characters, TMP_MARK


def name_max(d: str) -> int:
    """The longest file name (bytes) the file system of directory `d` allows."""
    try:
        return int(os.pathconf(d, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return NAME_MAX


def temp_prefix(name: str, limit: int = NAME_MAX) -> str:
    """`.{name}.`, with `name` cut (at a byte boundary) so that the temp name fits `limit` bytes;
    the temp name only has to be unique and recognisable (it ends in TMP_MARK)."""
    raw = os.fsencode(name)[: max(1, limit - _TMP_EXTRA)]
    return f".{os.fsdecode(raw)}."


@contextlib.contextmanager
def atomic_file(
    path: str | os.PathLike[str], mode: str = "wb", *, mtime_ns: int | None = None, **open_kwargs: Any
) -> Iterator[IO[Any]]:
    """Yields a file to write; on a clean exit it replaces `path` (with `mtime_ns` set, if given)."""
    path = os.fspath(path)
    d, name = os.path.split(path)
    d = d or "."
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(name, name_max(d)), suffix=TMP_MARK, dir=d)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
        if mtime_ns is not None:
            os.utime(tmp, ns=(mtime_ns, mtime_ns))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def check_run_dirs(image_dir: str, db_dir: str, trash_dir: str | None) -> list[str]:
    """Refuses a run whose trash or DB dir is the image dir or holds it (files could move into
    themselves); returns the ones inside the image dir, to leave out of its scan."""
    if not os.path.isdir(image_dir):
        raise UserError(f"{image_dir}: image directory does not exist")
    exclude = []
    for name, d in (("trash", trash_dir), ("DB", db_dir)):
        if d is None:
            continue
        if is_inside(image_dir, d):
            raise UserError(f"{d}: the {name} dir must not be the image dir or contain it")
        if is_inside(d, image_dir):
            exclude.append(os.path.realpath(d))
    return exclude


def is_inside(path: str, root: str) -> bool:
    """Whether `path` (resolved) is `root` (resolved) or below it."""
    p, r = os.path.realpath(path), os.path.realpath(root)
    return p == r or p.startswith(r.rstrip(os.sep) + os.sep)


def dir_id(path: str) -> tuple[int, int]:
    """(st_dev, st_ino) of what `path` leads to: one directory, whichever path reaches it."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def same_dir(a: str, b: str) -> bool:
    """Whether `a` and `b` lead to one directory: by `realpath`, or (a bind mount) by identity."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return dir_id(a) == dir_id(b)
    except OSError:
        return False


def check_import_dirs(
    base_image_dir: str, base_db_dir: str, import_image_dir: str, import_db_dir: str, trash_dir: str | None
) -> None:
    """Refuses layouts in which import mode would write into the base image dir or the base DB."""
    if same_dir(base_image_dir, import_image_dir):
        raise UserError("the base and import image dirs must differ")
    if os.path.realpath(base_db_dir) == os.path.realpath(import_db_dir):
        raise UserError("the base and import DB dirs must differ: import mode never writes the base DB")
    for name, d in (("import DB", import_db_dir), ("trash", trash_dir), ("import image", import_image_dir)):
        for ro_name, ro in (("base image dir", base_image_dir), ("base DB dir", base_db_dir)):
            if d is None or (name == "import image" and ro_name == "base image dir"):
                continue  # a nested import dir is left out of the base scan (pipeline.run_import)
            if is_inside(d, ro):
                raise UserError(
                    f"{d}: the {name} dir must not be inside the {ro_name} {ro}, which import mode only reads"
                )

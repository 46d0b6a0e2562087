"""Walk an image tree: relative path, mtime (ns) and size of every image file.

`scan_tree` runs the native multithreaded walker (csrc/scanner.cpp); `scan_tree_ref` is the plain
Python walker it must match, entry for entry and error for error. Paths are relative,
'/'-separated, and sorted by their bytes, so everything built on a scan (DB plan, matrix row order,
groups, kept files) is independent of the file system's listing order. Non-UTF-8 names survive as
surrogate-escaped str (os.fsdecode), round-tripping to bytes.

Semantics shared by both walkers:
- a file matches when `os.path.splitext(name)[1].lower()` is in `suffixes` (None: every file);
- symlinks are skipped, unless `follow_symlinks`: then a link to a file is listed with its target's
  mtime and size, a link to a directory is entered, and a dangling link is an error;
- a directory that is its own ancestor (a symlink or bind-mount loop) is reported, not entered, so a
  walk always ends;
- a directory on the device of /proc, /sys or /dev (each where it is a mount of its own) is reported,
  never entered, however it was reached;
- a directory reached through a followed symlink (anywhere above it) is entered only while it is on
  the root's file system, unless `cross_devices`: a link to `/` does not walk every mount;
- directories in `exclude` (same device and inode) are skipped;
- a directory that cannot be listed, or a file that cannot be stat'ed, becomes an error
  (path, one-line reason), never an exception.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from clipdedup import native
from clipdedup.records import FileEntry, ScanResult

IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .webp .gif .bmp .dib .tif .tiff .ppm .pgm .pbm .pnm "
    ".heic .heif .avif .svg".split()
)
LOOP_REASON = "directory loop (it is its own ancestor), not entered"
SYSTEM_REASON = "a system directory (/proc, /sys or /dev), never entered"
OTHER_FS_REASON = (
    "reached through a symlink, on another file system: not entered (--cross-file-systems enters it)"
)
SYSTEM_DIRS = ("/proc", "/sys", "/dev")


def system_devices() -> list[int]:
    """st_dev of /proc, /sys and /dev, each only where it is a mount of its own (a plain /dev
    directory on the root file system must not make the whole root file system off limits)."""
    try:
        root_dev = os.stat("/").st_dev
    except OSError:
        return []
    devs = []
    for d in SYSTEM_DIRS:
        try:
            dev = os.stat(d).st_dev
        except OSError:
            continue
        if dev != root_dev:
            devs.append(dev)
    return devs


def _with_progress(
    call: Callable[[], T], counter: np.ndarray, progress: Callable[[int], None], poll_s: float
) -> T:
    """Runs `call` (a native walk, which releases the GIL) on a thread and reports `counter[0]` to
    `progress` every `poll_s` seconds and once at the end, so a long walk shows it is alive."""
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["out"] = call()
        except BaseException as e:  # handed to the caller's thread
            box["err"] = e

    t = threading.Thread(target=work, name="clipdedup-scan", daemon=True)
    t.start()
    while True:
        t.join(poll_s)
        progress(int(counter[0]))
        if not t.is_alive():
            break
    if "err" in box:
        raise box["err"]
    return box["out"]


PathArg = str | os.PathLike[str]
T = TypeVar("T")


@dataclass
class ScanTable:
    """A scan as columns, with what a DB index needs beyond FileEntry.

    Attributes:
        rels: N relative paths, sorted by bytes.
        mtime_ns, ctime_ns, size: int64 (N,). ino: uint64 (N,).
        errors: (path, reason), sorted.
    """

    rels: list[str]
    mtime_ns: np.ndarray
    ctime_ns: np.ndarray
    size: np.ndarray
    ino: np.ndarray
    errors: list[tuple[str, str]]


_ENTRY_FIELDS = [f.name for f in fields(FileEntry)]


def sorted_by_bytes(names: Sequence[str]) -> list[str]:
    """`sorted(names, key=os.fsencode)`, without encoding each name when none holds an escape.

    UTF-8 orders like code points, so plain str order is byte order unless a name carries a
    surrogate escape (a non-UTF-8 byte), which strict encoding refuses.
    """
    try:
        "".join(names).encode("utf-8")
    except UnicodeEncodeError:
        return sorted(names, key=os.fsencode)
    return sorted(names)


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _suffix_ok(name: str, suffixes: frozenset[str] | None) -> bool:
    return suffixes is None or os.path.splitext(name)[1].lower() in suffixes


def scan_native(
    root: PathArg,
    *,
    suffixes: frozenset[str] | None = IMAGE_EXTENSIONS,
    exclude: Sequence[PathArg] | None = None,
    follow_symlinks: bool = False,
    threads: int | None = None,
    cross_devices: bool = False,
    progress: Callable[[int], None] | None = None,
    poll_s: float = 0.2,
) -> tuple[native.ScanOutput, list[tuple[str, str]]]:
    """The native walk's raw output, and its errors as (path, reason).

    With `suffixes`, records flagged `unsure()` (a non-ASCII suffix) still need the str.lower()
    check that `scan_table` applies; with suffixes=None there are none. `progress`, if given, is
    called with the number of entries seen so far every `poll_s` seconds during the walk.
    """
    root_s = str(Path(root))
    # Suffixes that are not lowercase never match (the name's suffix is lowercased first); the
    # native side compares ASCII only and flags non-ASCII suffixes for the caller.
    ascii_suffixes = None
    if suffixes is not None:
        ascii_suffixes = [s.encode() for s in suffixes if s.isascii() and s == s.lower()]
    counter = np.zeros(1, np.int64)

    def walk() -> native.ScanOutput:
        return native.scan_tree(
            os.fsencode(root_s),
            ascii_suffixes,
            [os.fsencode(p) for p in (exclude or [])],
            follow_symlinks,
            native.default_threads() if threads is None else threads,
            cross_devices,
            system_devices(),
            counter,
        )

    out = walk() if progress is None else _with_progress(walk, counter, progress, poll_s)
    errors = [(os.path.join(root_s, rel) if rel else root_s, reason) for rel, reason in out.errors()]
    return out, errors


def scan_table(
    root: PathArg,
    *,
    suffixes: frozenset[str] | None = IMAGE_EXTENSIONS,
    exclude: Sequence[PathArg] | None = None,
    follow_symlinks: bool = False,
    threads: int | None = None,
    cross_devices: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ScanTable:
    """The native walk as columns (see the module docstring for what is listed)."""
    out, errors = scan_native(
        root,
        suffixes=suffixes,
        exclude=exclude,
        follow_symlinks=follow_symlinks,
        threads=threads,
        cross_devices=cross_devices,
        progress=progress,
    )
    rels = out.rels()
    cols = [out.mtime_ns(), out.ctime_ns(), out.size(), out.ino()]
    drop = [i for i in out.unsure() if not _suffix_ok(rels[i].rsplit("/", 1)[-1], suffixes)]
    if drop:
        keep = np.ones(len(rels), bool)
        keep[drop] = False
        rels = [r for r, k in zip(rels, keep) if k]
        cols = [c[keep] for c in cols]
    return ScanTable(rels, cols[0], cols[1], cols[2], cols[3], errors)


def scan_tree(
    root: PathArg,
    *,
    suffixes: frozenset[str] | None = IMAGE_EXTENSIONS,
    exclude: Sequence[PathArg] | None = None,
    follow_symlinks: bool = False,
    threads: int | None = None,
    cross_devices: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ScanResult:
    """Lists the regular files under `root` whose lowercase suffix is in `suffixes` (None: all).

    Args:
        root: the tree to walk.
        suffixes: lowercase suffixes with their dot; None lists every regular file.
        exclude: directories to skip (for example a trash or DB dir nested in the image dir).
        follow_symlinks: list linked files and enter linked directories (loops are detected).
        threads: walker threads; default `native.default_threads()`.
        cross_devices: let a followed symlink lead onto another file system.
        progress: called with the entries seen so far, periodically while the walk runs.

    Returns:
        Entries sorted by path bytes, and errors (unreadable directories, dangling links, loops).
    """
    t = scan_table(
        root,
        suffixes=suffixes,
        exclude=exclude,
        follow_symlinks=follow_symlinks,
        threads=threads,
        cross_devices=cross_devices,
        progress=progress,
    )
    cols = [t.rels, t.mtime_ns.tolist(), t.size.tolist(), t.ctime_ns.tolist()]
    return ScanResult(native.construct(FileEntry, _ENTRY_FIELDS, cols), t.errors)


def scan_tree_ref(
    root: PathArg,
    *,
    suffixes: frozenset[str] | None = IMAGE_EXTENSIONS,
    exclude: Sequence[PathArg] | None = None,
    follow_symlinks: bool = False,
    cross_devices: bool = False,
) -> ScanResult:
    """The plain Python walker that defines what `scan_tree` returns (one thread, os.scandir)."""
    root_s = str(Path(root))
    system = set(system_devices())
    try:
        root_dev = os.stat(root_s).st_dev
    except OSError:
        root_dev = None
    excluded = set()
    for p in exclude or []:
        try:
            st = os.stat(p)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            excluded.add((st.st_dev, st.st_ino))
    entries: list[FileEntry] = []
    errors: list[tuple[str, str]] = []
    stack: list[tuple[str, frozenset, bool]] = [("", frozenset(), False)]
    while stack:
        rel_dir, ancestors, via_link = stack.pop()
        abs_dir = os.path.join(root_s, rel_dir) if rel_dir else root_s
        try:
            st = os.stat(abs_dir, follow_symlinks=follow_symlinks or not rel_dir)
            it = os.scandir(abs_dir)
        except OSError as e:
            errors.append((abs_dir, f"cannot list directory: {e.strerror or e}"))
            continue
        me = (st.st_dev, st.st_ino)
        if rel_dir and me in excluded:
            it.close()
            continue
        if rel_dir and st.st_dev in system:
            it.close()
            errors.append((abs_dir, SYSTEM_REASON))
            continue
        if rel_dir and via_link and not cross_devices and st.st_dev != root_dev:
            it.close()
            errors.append((abs_dir, OTHER_FS_REASON))
            continue
        if rel_dir and me in ancestors:
            it.close()
            errors.append((abs_dir, LOOP_REASON))
            continue
        below = ancestors | {me}
        with it:
            for de in it:
                rel = f"{rel_dir}/{de.name}" if rel_dir else de.name
                _ref_entry(de, rel, below, via_link, suffixes, follow_symlinks, stack, entries, errors)
    entries.sort(key=lambda e: os.fsencode(e.rel))
    errors.sort(key=lambda e: (os.fsencode(e[0]), e[1]))
    return ScanResult(entries, errors)


def _ref_entry(de, rel, below, via_link, suffixes, follow_symlinks, stack, entries, errors) -> None:
    # Only directories, symlinks (when followed) and files that could match are stat'ed, as in
    # the native walker, so both report the same errors.
    is_link = de.is_symlink()
    if is_link:
        if not follow_symlinks:
            return
    elif de.is_dir(follow_symlinks=False):
        stack.append((rel, below, via_link))
        return
    elif not de.is_file(follow_symlinks=False) or not _suffix_ok(de.name, suffixes):
        return
    try:
        st = de.stat(follow_symlinks=follow_symlinks)
    except OSError as e:
        errors.append((de.path, f"cannot stat: {e.strerror or e}"))
        return
    if stat.S_ISDIR(st.st_mode):
        stack.append((rel, below, via_link or is_link))
    elif stat.S_ISREG(st.st_mode) and _suffix_ok(de.name, suffixes):
        entries.append(FileEntry(rel, st.st_mtime_ns, st.st_size, st.st_ctime_ns))

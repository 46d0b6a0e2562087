"""Walk an image tree: relative path, mtime (ns) and size of every image file.

Symlinks are not followed. Paths are relative, '/'-separated, and sorted, so everything built on a
scan (DB plan, matrix row order, groups, kept files) is independent of the file system's listing
order. Non-UTF-8 names survive as surrogate-escaped str (os.fsdecode), round-tripping to bytes.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .webp .gif .bmp .dib .tif .tiff .ppm .pgm .pbm .pnm "
    ".heic .heif .avif .svg".split()
)


@dataclass(frozen=True)
class FileEntry:
    rel: str
    mtime_ns: int
    size: int


@dataclass
class ScanResult:
    entries: list[FileEntry]
    errors: list[tuple[str, str]]  # (path, one-line reason)


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def scan_tree(
    root: str | os.PathLike[str],
    *,
    suffixes: frozenset[str] | None = IMAGE_EXTENSIONS,
    exclude: list[str | os.PathLike[str]] | None = None,
) -> ScanResult:
    """Lists the regular files under `root` whose lowercase suffix is in `suffixes` (None: all).

    Directories in `exclude` (for example a trash or DB dir nested in the image dir) are skipped.
    Unreadable directories become errors, never exceptions.
    """
    root = Path(root)
    excluded = {os.path.realpath(p) for p in (exclude or [])}
    entries: list[FileEntry] = []
    errors: list[tuple[str, str]] = []
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        abs_dir = os.path.join(root, rel_dir) if rel_dir else str(root)
        try:
            it = os.scandir(abs_dir)
        except OSError as e:
            errors.append((abs_dir, f"cannot list directory: {e.strerror or e}"))
            continue
        with it:
            for de in it:
                rel = f"{rel_dir}/{de.name}" if rel_dir else de.name
                try:
                    st = de.stat(follow_symlinks=False)
                except OSError as e:
                    errors.append((de.path, f"cannot stat: {e.strerror or e}"))
                    continue
                if stat.S_ISDIR(st.st_mode):
                    if not excluded or os.path.realpath(de.path) not in excluded:
                        stack.append(rel)
                elif stat.S_ISREG(st.st_mode):
                    if suffixes is None or os.path.splitext(de.name)[1].lower() in suffixes:
                        entries.append(FileEntry(rel, st.st_mtime_ns, st.st_size))
    entries.sort(key=lambda e: os.fsencode(e.rel))
    return ScanResult(entries, errors)

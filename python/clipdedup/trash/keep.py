"""Keep strategies: which file of a duplicate group stays. One registry entry per strategy.

Each strategy maps a file to a sort key; the largest key is kept, and ties fall to the
lexicographically smallest relative path, so the choice never depends on listing order.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from PIL import Image

from clipdedup.registry import Registry


@dataclass
class Candidate:
    rel: str  # path relative to its image dir
    path: str  # absolute path
    size: int
    mtime_ns: int
    _header: tuple[int, str] | None = field(default=None, repr=False)

    def header(self) -> tuple[int, str]:
        """(pixel count, format name) from the image header; (0, "") when unreadable."""
        if self._header is None:
            try:
                with Image.open(self.path) as im:
                    self._header = (im.width * im.height, im.format or "")
            except Exception:
                self._header = (0, "")
        return self._header


Key = tuple[float, ...]
STRATEGIES: Registry[Callable[[Candidate], Key]] = Registry("keeping logic")


@STRATEGIES.register("newest", doc="latest mtime; ties by size")
def key_newest(c: Candidate) -> Key:
    return (c.mtime_ns, c.size)


@STRATEGIES.register("largest", priority=1, doc="largest file; ties by mtime")
def key_largest(c: Candidate) -> Key:
    return (c.size, c.mtime_ns)


@STRATEGIES.register("highest-quality", doc="most pixels; then PNG over lossy formats; then mtime")
def key_highest_quality(c: Candidate) -> Key:
    pixels, fmt = c.header()
    return (pixels, 1 if fmt == "PNG" else 0, c.mtime_ns)


WALLPAPER_DIRS = frozenset({"wallpaper", "vwallpaper"})
# Named image sources, best first: the original upload carries the most reliable metadata.
SOURCE_PATTERNS = [
    ("pixiv", re.compile(r"^\d+_p\d+\.[^.]+$")),
    ("yande.re", re.compile(r"^yande\.re \d+ ")),
    ("danbooru", re.compile(r"^__.*__[0-9a-f]{32}\.[^.]+$")),
    ("konachan", re.compile(r"^Konachan\.com - \d+ ")),
]


def source_rank(name: str) -> int:
    """len(SOURCE_PATTERNS) for the best-ranked source down to 0 for an unknown name."""
    for k, (_, pat) in enumerate(SOURCE_PATTERNS):
        if pat.search(name):
            return len(SOURCE_PATTERNS) - k
    return 0


@STRATEGIES.register(
    "pic-dir",
    doc="under a Wallpaper/VWallpaper dir first; then Pixiv > yande.re > Danbooru > Konachan; "
    "then highest-quality",
)
def key_pic_dir(c: Candidate) -> Key:
    parts = c.rel.split("/")
    in_wallpaper = any(p.lower() in WALLPAPER_DIRS for p in parts[:-1])
    return (1 if in_wallpaper else 0, source_rank(parts[-1]), *key_highest_quality(c))


def choose_keep(group: Sequence[Candidate], strategy: str) -> int:
    """Index in `group` of the file to keep under `strategy`."""
    key = STRATEGIES.get(strategy).fn
    keys = [key(c) for c in group]
    best = 0
    for k in range(1, len(group)):
        if keys[k] > keys[best] or (
            keys[k] == keys[best] and os.fsencode(group[k].rel) < os.fsencode(group[best].rel)
        ):
            best = k
    return best

"""Images that could not be decoded, remembered in the DB so that a rerun does not decode them again.

`clipdedup-unreadable.json` at the DB root maps each such image (its DB key, the path relative to
the image dir) to its size, mtime and ctime when it failed and the reason. A later update reports
the image again with that reason and leaves it out, unless one of the three changed (the file was
replaced or touched: it is tried again) or the run asks for `--retry-unreadable`. An image that is
gone, or that was read since, leaves the record. Like the match cache the file is only a cache:
written atomically (temp file, then rename), only when it changes, never in a dry run; a missing,
damaged or foreign one means "nothing remembered", and deleting it is always safe.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

from clipdedup.db.layout import UpdatePlan
from clipdedup.records import FileEntry, UpdateSummary
from clipdedup.util.fsutil import atomic_file

UNREADABLE_NAME = "clipdedup-unreadable.json"
FORMAT = 1


@dataclass(frozen=True)
class Unreadable:
    """One image that failed to decode: its size, mtime and ctime then (ns) and why."""

    size: int
    mtime_ns: int
    ctime_ns: int
    reason: str


def record_path(db_dir: str | os.PathLike[str]) -> str:
    return os.path.join(db_dir, UNREADABLE_NAME)


def read_unreadable(db_dir: str | os.PathLike[str]) -> dict[str, Unreadable]:
    """The remembered images by DB key; empty when there is no record or it cannot be used."""
    try:
        with open(record_path(db_dir), encoding="utf-8") as f:
            raw = json.load(f)
        if raw.get("format") != FORMAT:
            return {}
        return {
            str(k): Unreadable(int(v["size"]), int(v["mtime_ns"]), int(v["ctime_ns"]), str(v["reason"]))
            for k, v in raw["files"].items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def write_unreadable(db_dir: str | os.PathLike[str], files: dict[str, Unreadable]) -> None:
    """Replaces the record atomically (an empty one removes the file)."""
    if not files:
        if os.path.exists(record_path(db_dir)):
            os.remove(record_path(db_dir))
        return
    body = {k: vars(v) for k, v in sorted(files.items())}
    with atomic_file(record_path(db_dir), "w", encoding="utf-8") as f:
        json.dump({"format": FORMAT, "files": body}, f, indent=1)


def ctime_ns(path: str) -> int | None:
    try:
        return os.stat(path).st_ctime_ns
    except OSError:
        return None


def still_unreadable(image_dir: str, e: FileEntry, rec: Unreadable | None) -> bool:
    """Whether `e` is the very file that failed before (same size, mtime and ctime)."""
    if rec is None or (e.size, e.mtime_ns) != (rec.size, rec.mtime_ns):
        return False
    return ctime_ns(os.path.join(image_dir, e.rel)) == rec.ctime_ns


def remember(
    image_dir: str, skipped: dict[str, Unreadable], tried: list[FileEntry], failed: dict[str, str]
) -> dict[str, Unreadable]:
    """The new record: `skipped` (remembered and left out this run) and the images of `tried` that
    failed now (`failed`: DB key -> reason). Whatever else was remembered is gone or was read since
    (it is neither skipped nor tried: up to date in the DB, or not scanned)."""
    new = dict(skipped)
    for e in tried:
        reason = failed.get(e.rel)
        ct = ctime_ns(os.path.join(image_dir, e.rel)) if reason is not None else None
        if reason is not None and ct is not None:
            new[e.rel] = Unreadable(e.size, e.mtime_ns, ct, reason)
    return new


def leave_out(
    image_dir: str | os.PathLike[str],
    db_dir: str | os.PathLike[str],
    plan: UpdatePlan,
    retry: bool,
    s: UpdateSummary,
    log: Callable[[str], object],
) -> tuple[dict[str, Unreadable], dict[str, Unreadable]]:
    """Takes the images that failed to decode in an earlier run and have not changed since out of
    `plan.to_encode`, each reported (`s.failed`, `log`) with its remembered reason; none with
    `retry`. Returns the record as read and the part of it kept this run."""
    old = read_unreadable(db_dir)
    if not old:
        return old, {}
    skipped: dict[str, Unreadable] = {}
    todo = []
    for e in plan.to_encode:
        rec = old.get(e.rel)
        if rec is None or retry or not still_unreadable(os.fspath(image_dir), e, rec):
            todo.append(e)
            continue
        skipped[e.rel] = rec
        path = os.path.join(image_dir, e.rel)
        s.failed.append((path, rec.reason))
        log(f"{path}: skipped: {rec.reason} (unchanged since; --retry-unreadable decodes it again)")
    plan.to_encode = todo
    return old, skipped


def update_record(
    image_dir: str | os.PathLike[str],
    db_dir: str | os.PathLike[str],
    old: dict[str, Unreadable],
    skipped: dict[str, Unreadable],
    tried: list[FileEntry],
    failed: list[tuple[str, str]],
) -> None:
    """Writes the record of this update when it differs from `old` (`failed`: (image path, reason)
    of the update, `tried`: what it decoded)."""
    by_rel = {os.path.relpath(p, image_dir).replace(os.sep, "/"): why for p, why in failed}
    new = remember(os.fspath(image_dir), skipped, tried, by_rel)
    if new != old:
        with contextlib.suppress(OSError):  # only a cache: the images are decoded again next time
            write_unreadable(db_dir, new)

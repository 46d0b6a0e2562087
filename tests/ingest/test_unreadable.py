"""Images that failed to decode are remembered in the DB (ingest/unreadable.py): a rerun reports them
from the record without decoding them (or loading a model), and tries them again only when the file
changed (size, mtime or ctime) or with --retry-unreadable; a dry run writes no record."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from clipdedup.ingest.unreadable import UNREADABLE_NAME, read_unreadable
from clipdedup.ingest.update import update_db

MODEL = "builtin:dct"


def good_image(p: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(p)


def update(img: Path, db: Path, **kw):
    lines: list[str] = []
    u = update_db(str(img), str(db), MODEL, log=lines.append, **kw)
    return u, lines


def test_unreadable_images_are_remembered_until_they_change(tmp_path: Path) -> None:
    img, db = tmp_path / "img", tmp_path / "db"
    img.mkdir()
    good_image(img / "a.png", 1)
    (img / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg at all")
    (img / "sub").mkdir()
    (img / "sub" / "bad2.jpg").write_bytes(b"\xff\xd8 not a jpeg at all")  # an exact copy of bad.jpg
    u, _ = update(img, db, dry_run=True)
    assert len(u.failed) == 2 and not (db / UNREADABLE_NAME).exists()  # a dry run writes nothing
    u, _ = update(img, db)
    assert u.encoded == 1 and sorted(os.path.basename(p) for p, _ in u.failed) == ["bad.jpg", "bad2.jpg"]
    record = read_unreadable(db)
    assert set(record) == {"bad.jpg", "sub/bad2.jpg"}
    reasons = dict(u.failed)
    stamp = (db / UNREADABLE_NAME).stat().st_mtime_ns

    u, lines = update(img, db)  # nothing changed: reported from the record, no model loaded
    assert dict(u.failed) == reasons and "model load" not in u.seconds and u.encoded == 0
    assert len([ln for ln in lines if "--retry-unreadable" in ln]) == 2
    assert (db / UNREADABLE_NAME).stat().st_mtime_ns == stamp  # not written again

    u, _ = update(img, db, retry_unreadable=True)  # asked: decoded again (and failing again)
    assert "model load" in u.seconds and dict(u.failed) == reasons

    os.utime(img / "bad.jpg", ns=(1_700_000_000_000_000_000,) * 2)  # touched: tried again
    u, _ = update(img, db)
    assert "model load" in u.seconds and len(u.failed) == 2
    assert read_unreadable(db)["bad.jpg"].mtime_ns == 1_700_000_000_000_000_000

    good_image(img / "bad.jpg", 2)  # mended: encoded, and it leaves the record
    os.remove(img / "sub" / "bad2.jpg")  # gone: it leaves the record too
    u, _ = update(img, db)
    assert u.encoded == 1 and not u.failed
    assert not (db / UNREADABLE_NAME).exists() and read_unreadable(db) == {}


def test_a_damaged_record_means_nothing_remembered(tmp_path: Path) -> None:
    img, db = tmp_path / "img", tmp_path / "db"
    img.mkdir()
    (img / "bad.jpg").write_bytes(b"junk")
    good_image(img / "a.png", 1)
    update(img, db)
    (db / UNREADABLE_NAME).write_text("{not json")
    assert read_unreadable(db) == {}
    u, _ = update(img, db)
    assert "model load" in u.seconds and len(u.failed) == 1  # decoded again, and remembered again
    assert set(read_unreadable(db)) == {"bad.jpg"}

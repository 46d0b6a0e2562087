"""Content rewritten in place with its size and mtime put back (`touch -r`) is re-encoded: the
image's ctime, which no one can set, is newer than its embedding's (issue #25, item 7)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from clipdedup import db as dbmod
from clipdedup.cli import dedup_cmd, run_cli
from clipdedup.ingest.update import update_db
from clipdedup.pipeline import RunOptions, run_dedup
from clipdedup.records import FileEntry

MODEL = "builtin:dct"


def _bmp(path: Path, seed: int) -> None:
    """An uncompressed 64x64 image: every content has the same file size."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).save(path, format="BMP")


def _rewrite_keeping_size_and_mtime(path: Path, seed: int) -> None:
    st = path.stat()
    _bmp(path, seed)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # what `touch -r` does
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_plan_update_reads_the_image_ctime() -> None:
    f = dbmod.DBFile("a.bmp", "/db/a.bmp.npy", 100, 20, False, ctime_ns=500, ino=1)
    index = dbmod.DBIndex({"a.bmp": f}, [], [])
    older, newer = FileEntry("a.bmp", 100, 1, 400), FileEntry("a.bmp", 100, 1, 600)
    assert dbmod.plan_update([older], index, dim=None).up_to_date == [older]
    assert dbmod.plan_update([newer], index, dim=None).to_encode == [newer]
    assert dbmod.plan_update([newer], index, dim=None, use_ctime=False).up_to_date == [newer]
    assert dbmod.plan_update([FileEntry("a.bmp", 100, 1)], index, dim=None).up_to_date  # ctime unknown


def test_rewritten_content_with_size_and_mtime_restored_is_reencoded(tmp_path: Path) -> None:
    img, db = tmp_path / "img", tmp_path / "db"
    img.mkdir()
    _bmp(img / "a.bmp", 1)
    _bmp(img / "b.bmp", 2)
    quiet = {"log": lambda line: None}
    assert update_db(img, db, MODEL, **quiet).encoded == 2
    before = np.load(dbmod.npy_path(db, "a.bmp"))
    _rewrite_keeping_size_and_mtime(img / "a.bmp", 3)
    u = update_db(img, db, MODEL, dry_run=True, use_ctime=False, **quiet)
    assert u.encoded == 0 and u.up_to_date == 2  # --no-ctime: size and mtime only
    u = update_db(img, db, MODEL, **quiet)
    assert (u.encoded, u.up_to_date) == (1, 1)
    assert not np.array_equal(np.load(dbmod.npy_path(db, "a.bmp")), before)
    assert update_db(img, db, MODEL, **quiet).encoded == 0  # the new embedding is newer: up to date


def test_a_rewritten_duplicate_is_not_moved_as_its_old_self(tmp_path: Path) -> None:
    img, db, trash = tmp_path / "img", tmp_path / "db", tmp_path / "trash"
    img.mkdir()
    _bmp(img / "a.bmp", 1)
    _bmp(img / "b.bmp", 1)  # a byte-identical copy: a duplicate group
    opts = RunOptions(model_id=MODEL, log=lambda line: None)
    assert opts.use_ctime  # the default
    assert len(run_dedup(str(img), str(db), None, opts).groups) == 1
    _rewrite_keeping_size_and_mtime(img / "b.bmp", 7)  # now another picture
    s = run_dedup(str(img), str(db), str(trash), opts)
    assert s.groups == [] and not any(trash.rglob("*.bmp"))


def test_cli_no_ctime_keeps_the_old_embedding(tmp_path: Path, capsys) -> None:
    img, db = tmp_path / "img", tmp_path / "db"
    img.mkdir()
    _bmp(img / "a.bmp", 1)
    base = ["-i", str(img), "-d", str(db), "-m", MODEL, "-q"]
    assert run_cli(dedup_cmd, "test", base) == 0  # encode (not a dry run)
    _rewrite_keeping_size_and_mtime(img / "a.bmp", 2)
    capsys.readouterr()
    assert run_cli(dedup_cmd, "test", base + ["-n", "--json", "--no-ctime"]) == 0
    assert json.loads(capsys.readouterr().out)["encoded"] == 0
    assert run_cli(dedup_cmd, "test", base + ["-n", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["encoded"] == 1

"""What a rerun reads: with nothing changed and a match cache to answer, no row is read from the
store (the snapshot's rows are located by its index, not read) and the DB is listed once (the
update's or --skip-update's index serves the load). When the cache cannot answer alone, or a row
changed, the rows the match needs are read, each checked, a damaged snapshot row from its `.npy`
instead, and every answer equals a full match's."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from tests.match.test_cache import Collection

from clipdedup import native
from clipdedup.db import snapshot as snap_mod
from clipdedup.db import store_load
from clipdedup.pipeline import RunOptions, run_dedup


@pytest.fixture
def counted(monkeypatch):
    """Counts row reads (`native.gather_rows`, every checked read of a store) and DB listings
    (`index_columns` as the load and the --skip-update path call it); snapshots trust rows at once."""
    monkeypatch.setattr(snap_mod, "RACY_NS", 0)
    calls = {"gather": 0, "index": 0}

    def count(name, fn):
        def wrapped(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)

        return wrapped

    monkeypatch.setattr(native, "gather_rows", count("gather", native.gather_rows))
    monkeypatch.setattr(store_load, "index_columns", count("index", store_load.index_columns))
    import clipdedup.pipeline as pipeline

    monkeypatch.setattr(pipeline, "index_columns", count("index", pipeline.index_columns))
    return calls


def _damage_snapshot_row(db: Path, row: int, dim: int) -> None:
    with open(snap_mod.snapshot_path(db), "r+b") as f:
        f.seek(snap_mod.DATA_OFFSET + row * dim * 4 + 2)
        f.write(b"\x7f\x7f")


def test_nothing_changed_reads_no_row_and_lists_the_db_once(tmp_path: Path, counted) -> None:
    c = Collection(tmp_path, 5)
    c.add(80)
    t = 1.5
    got, _, how = c.run(t)
    assert got == c.reference(t) and how.startswith("full match") and len(got) > 5
    counted.update(gather=0, index=0)
    got, _, how = c.run(t)
    assert got == c.reference(t) and how.startswith("unchanged")
    assert counted == {"gather": 0, "index": 1}  # --skip-update's listing, reused by the load
    _damage_snapshot_row(c.db, 7, c.meta.dim)  # the rows are the .npy files': the cache still answers
    got, _, how = c.run(t * 0.9)
    assert got == c.reference(t * 0.9) and how.startswith("unchanged") and counted["gather"] == 0
    got, lines, how = c.run(t * 1.1)  # above the cache's threshold: every row read, row 7 from its file
    assert got == c.reference(t * 1.1) and how.startswith("full match"), (how, lines)
    assert counted["gather"] > 0


def test_a_changed_row_and_a_damaged_snapshot_row(tmp_path: Path, counted) -> None:
    c = Collection(tmp_path, 6)
    c.add(60)
    t = 1.5
    c.run(t)
    c.run(t)  # the snapshot now holds every row
    _damage_snapshot_row(c.db, 3, c.meta.dim)
    c.change(2)
    counted.update(gather=0, index=0)
    got, _, how = c.run(t)
    assert got == c.reference(t) and not how.startswith("unchanged") and counted["gather"] > 0


def test_an_update_that_writes_nothing_lends_its_listing(tmp_path: Path, testdata: Path, counted) -> None:
    """A whole run (no --skip-update) of builtin:dct on real images: the rerun lists the DB only in
    its update; a run that encodes lists it again for the load, and finds the new copy."""
    img, db = tmp_path / "img", tmp_path / "db"
    shutil.copytree(testdata / "base_images", img)
    opts = RunOptions(model_id="builtin:dct", log=lambda line: None)
    first = run_dedup(str(img), str(db), None, opts)
    assert first.match_cache.startswith("full match")
    counted.update(gather=0, index=0)
    again = run_dedup(str(img), str(db), None, opts)
    assert again.match_cache.startswith("unchanged") and counted == {"gather": 0, "index": 0}
    assert [g.members for g in again.groups] == [g.members for g in first.groups]
    src = sorted(p for p in img.iterdir() if p.suffix == ".jpg")[0]
    shutil.copyfile(src, img / ("copy-" + src.name))
    os.utime(img / ("copy-" + src.name), ns=(10**18, 10**18))
    third = run_dedup(str(img), str(db), None, opts)
    assert counted["index"] == 1 and not third.match_cache.startswith("unchanged")
    members = {m for g in third.groups for m in g.members}
    assert {src.name, "copy-" + src.name} <= members

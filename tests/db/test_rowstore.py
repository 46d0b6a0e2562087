"""The row store (rowstore.py): the same rows as the matrix load, through a snapshot that is
missing, used, stale or damaged; checked reads; dry runs write nothing; the snapshot is written
off the load's critical path."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from clipdedup import db as dbmod
from clipdedup.db import snapshot as snap_mod
from clipdedup.db.layout import NOT_FINITE
from clipdedup.db.rowstore import RowStoreError, rows_of, store_of_matrix
from clipdedup.db.store_load import index_columns, open_embeddings, open_store
from clipdedup.ingest.update import load_embeddings
from clipdedup.records import FileEntry
from clipdedup.scan import scan_tree

DIM = 12


@pytest.fixture
def trusting(monkeypatch):
    """Snapshots trust rows at once (no 2 s racy window), as in test_snapshot."""
    monkeypatch.setattr(snap_mod, "RACY_NS", 0)


def _make_db(root: Path, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    vecs = {f"d{i % 3}/img{i:03d}.jpg": rng.standard_normal(DIM).astype(np.float32) for i in range(n)}
    for rel, v in vecs.items():
        dbmod.write_embedding(root, rel, v)
    dbmod.write_meta(root, dbmod.DBMeta("m", DIM))
    return vecs


def _files(root: Path) -> list[dbmod.DBFile]:
    idx = dbmod.index_db(root)
    return [idx.files[r] for r in sorted(idx.files, key=os.fsencode)]


def _open(root: Path, **kw):
    files = _files(root)
    info = dbmod.LoadInfo()
    store, ok, errors = open_store(
        root, rows_of(root, files), DIM, started_ns=dbmod.index_db(root).started_ns, info=info, **kw
    )
    info.wait()
    want, want_ok, want_err = dbmod.load_rows(files, DIM)
    np.testing.assert_array_equal(ok, want_ok)
    assert errors == want_err
    np.testing.assert_array_equal(store.to_matrix(), want[want_ok])
    return store, info


@pytest.mark.parametrize("n", [0, 1, 63, 65, 130])
def test_store_of_matrix_reads_back(n):
    x = np.random.default_rng(n).standard_normal((n, 7)).astype(np.float32)
    with store_of_matrix(x, block_rows=16) as st:
        np.testing.assert_array_equal(st.to_matrix(), x)
        idx = np.array([n - 1, 0, n // 2, n - 1], np.int64) if n else np.zeros(0, np.int64)
        np.testing.assert_array_equal(st.take(idx), x[idx])
        seen = np.concatenate([b.copy() for _, b in st.blocks(5)]) if n else np.zeros((0, 7), np.float32)
        np.testing.assert_array_equal(seen, x)


def test_snapshot_missing_used_stale_damaged(tmp_path: Path, trusting) -> None:
    vecs = _make_db(tmp_path, 40)
    st, info = _open(tmp_path)
    assert (info.snapshot, info.from_files, info.written) == ("missing", 40, True)
    st.close()
    st, info = _open(tmp_path)
    assert (info.snapshot, info.from_snapshot, info.written) == ("used", 40, False)
    st.close()
    rel = sorted(vecs, key=os.fsencode)[5]
    dbmod.write_embedding(tmp_path, rel, np.full(DIM, 3, np.float32))  # changed: read from its file
    os.remove(dbmod.npy_path(tmp_path, sorted(vecs, key=os.fsencode)[9]))  # removed
    st, info = _open(tmp_path)
    assert (info.from_snapshot, info.from_files, info.written) == (38, 1, True)
    st.close()
    snap = snap_mod.snapshot_path(tmp_path)
    with open(snap, "r+b") as f:  # damage one row's bytes: that row comes from its file
        f.seek(snap_mod.DATA_OFFSET + 7 * DIM * 4 + 3)
        f.write(b"\x7f")
    st, info = _open(tmp_path)
    assert (info.from_snapshot, info.from_files, info.written) == (38, 1, True)
    st.close()


def test_rows_changed_under_the_store_are_refused(tmp_path: Path, trusting) -> None:
    _make_db(tmp_path, 10)
    _open(tmp_path)[0].close()
    st, info = _open(tmp_path)
    assert info.snapshot == "used"
    with open(snap_mod.snapshot_path(tmp_path), "r+b") as f:  # changed in place while the run reads it
        f.seek(snap_mod.DATA_OFFSET + 2 * DIM * 4)
        f.write(b"\x01\x02\x03\x04")
    st.take(np.array([0, 1, 3]))
    with pytest.raises(RowStoreError):
        st.take(np.array([2]))
    st.close()


def test_bad_files_are_errors_like_the_matrix_load(tmp_path: Path, trusting) -> None:
    _make_db(tmp_path, 12)
    (tmp_path / "d0" / "img000.jpg.npy").write_bytes(b"junk")
    np.save(tmp_path / "d1" / "img001.jpg.npy", np.zeros(DIM + 1, np.float32))
    st, info = _open(tmp_path)
    assert st.n == 10
    st.close()


def test_open_embeddings_dry_run_writes_nothing(tmp_path: Path, trusting) -> None:
    db, pics = tmp_path / "db", tmp_path / "pics"
    vecs = _make_db(db, 20)
    for rel in vecs:
        (pics / rel).parent.mkdir(parents=True, exist_ok=True)
        (pics / rel).write_bytes(b"x")
    entries = scan_tree(pics).entries
    before = sorted(os.listdir(db))
    extra = {entries[3].rel: np.ones(DIM, np.float32)}
    kept, st, errors, missing = open_embeddings(db, entries, dim=DIM, in_memory=extra, dry_run=True)
    assert sorted(os.listdir(db)) == before and not errors and missing == 0
    want = np.stack([extra.get(e.rel, vecs[e.rel]) for e in kept])
    np.testing.assert_array_equal(st.to_matrix(), want)
    st.close()
    kept, st, _, _ = open_embeddings(db, entries[:15], dim=DIM, index=index_columns(db))
    st.wait()
    assert snap_mod.read_snapshot(db)[0] is not None and len(kept) == 15
    st.close()


def test_load_does_not_wait_for_the_snapshot_write(tmp_path: Path, trusting, monkeypatch) -> None:
    _make_db(tmp_path, 30)
    release, started = threading.Event(), threading.Event()
    write = snap_mod.write_snapshot

    def slow(*args, **kw):
        started.set()
        assert release.wait(30)
        write(*args, **kw)

    monkeypatch.setattr(snap_mod, "write_snapshot", slow)
    info = dbmod.LoadInfo()
    paths, x = dbmod.load_db(tmp_path, info=info)  # returns while the write is held
    assert len(paths) == 30 and started.wait(30) and not os.path.exists(snap_mod.snapshot_path(tmp_path))
    release.set()
    assert info.written and os.path.exists(snap_mod.snapshot_path(tmp_path))
    second = dbmod.LoadInfo()
    dbmod.load_db(tmp_path, info=second)
    assert second.snapshot == "used"


@pytest.mark.parametrize("bad", ["nan", "inf", "huge"])
def test_unusable_rows_are_load_errors_in_every_loader(tmp_path: Path, trusting, bad: str) -> None:
    """A row that matching cannot use (NaN, infinity, a value too large to square: a random body)
    is an error naming its file in the store, the matrix load and load_rows, never a silent drop
    (issue #25, item 8). Through a snapshot too: the second open reads the row from it."""
    vecs = _make_db(tmp_path, 20)
    rel = sorted(vecs)[5]
    v = vecs[rel].copy()
    v[3] = {"nan": np.nan, "inf": np.inf, "huge": 3e38}[bad]
    dbmod.write_embedding(tmp_path, rel, v)
    path = dbmod.npy_path(tmp_path, rel)
    for _ in range(2):  # files, then (where one was written) the snapshot
        store, _info = _open(tmp_path)
        with store:
            assert store.n == 19
    entries = [FileEntry(r, 0, 0) for r in sorted(vecs, key=os.fsencode)]
    kept, store, errors, _ = open_embeddings(tmp_path, entries, dim=DIM)
    with store:
        assert errors == [(path, NOT_FINITE)] and rel not in {e.rel for e in kept}
    kept, mat, errors, _ = load_embeddings(tmp_path, entries, dim=DIM)
    assert errors == [(path, NOT_FINITE)] and len(kept) == len(mat) == 19


def _open_unchecked(root: Path):
    files = _files(root)
    info = dbmod.LoadInfo()
    started = dbmod.index_db(root).started_ns
    rows = rows_of(root, files)
    kw = dict(started_ns=started, info=info, unchecked=True, track=False)
    store, ok, errors = open_store(root, rows, DIM, **kw)
    info.wait()
    return store, ok, errors, info


def test_unchecked_open_reads_no_snapshot_row(tmp_path: Path, trusting, monkeypatch) -> None:
    """The snapshot's unchanged rows are located, not read, with the checked open's checksums; the
    rows read later are the same, and a row whose snapshot bytes are damaged comes from its .npy."""
    from clipdedup.db import store_load

    _make_db(tmp_path, 40)
    _open(tmp_path)[0].close()  # writes the snapshot
    checked, _ = _open(tmp_path)
    reads: list[int] = []
    real = store_load.native.gather_rows
    monkeypatch.setattr(store_load.native, "gather_rows", lambda *a: reads.append(1) or real(*a))
    st, ok, errors, info = _open_unchecked(tmp_path)
    assert not st.checked and reads == [] and ok.all() and errors == []
    assert (info.snapshot, info.from_snapshot, info.written) == ("used", 40, False)
    np.testing.assert_array_equal(st.hashes, checked.hashes)
    with open(snap_mod.snapshot_path(tmp_path), "r+b") as f:  # damaged after the open
        f.seek(snap_mod.DATA_OFFSET + 3 * DIM * 4 + 1)
        f.write(b"\x7f")
    want = dbmod.load_rows(_files(tmp_path), DIM)[0]
    np.testing.assert_array_equal(st.take(np.array([5, 3, 3, 39])), want[[5, 3, 3, 39]])
    np.testing.assert_array_equal(st.to_matrix(), want)
    with pytest.raises(RowStoreError):  # a checked store has read its rows at opening, not since
        checked.take(np.array([3]))
    os.remove(dbmod.npy_path(tmp_path, st.files[0].keys[3][:-4]))  # and now its file is gone too
    with pytest.raises(RowStoreError):
        st.take(np.array([3]))
    st.close()
    checked.close()


@pytest.mark.parametrize("change", ["edited", "removed", "added", "no snapshot", "racy", "damaged"])
def test_unchecked_open_reads_only_what_the_snapshot_lacks(
    tmp_path: Path, trusting, monkeypatch, change: str
) -> None:
    """Whatever changed, the unchecked store's rows are the matrix load's, and only the rows the
    snapshot does not hold unchanged are read from their files."""
    vecs = _make_db(tmp_path, 30, seed=3)
    _open(tmp_path)[0].close()
    rels = sorted(vecs, key=os.fsencode)
    lacks = {"edited": 1, "removed": 0, "added": 1, "no snapshot": 30, "racy": 30, "damaged": 0}[change]
    if change == "edited":
        dbmod.write_embedding(tmp_path, rels[4], np.full(DIM, 2, np.float32))
    elif change == "removed":
        os.remove(dbmod.npy_path(tmp_path, rels[7]))
    elif change == "added":
        dbmod.write_embedding(tmp_path, "d9/new.jpg", np.ones(DIM, np.float32))
    elif change == "no snapshot":
        os.remove(snap_mod.snapshot_path(tmp_path))
    elif change == "racy":  # the snapshot was written too soon after its rows' files: not vouched for
        monkeypatch.setattr(snap_mod, "RACY_NS", 10**18)
    else:
        with open(snap_mod.snapshot_path(tmp_path), "r+b") as f:
            f.seek(snap_mod.DATA_OFFSET + 11 * DIM * 4)
            f.write(b"\x01\x02\x03\x04")
    st, ok, errors, info = _open_unchecked(tmp_path)
    assert not st.checked and info.from_files == lacks
    want, want_ok, want_err = dbmod.load_rows(_files(tmp_path), DIM)
    np.testing.assert_array_equal(ok, want_ok)
    assert errors == want_err
    np.testing.assert_array_equal(st.to_matrix(), want[want_ok])
    st.close()


def test_the_snapshot_is_rewritten_past_a_share_of_changed_rows(tmp_path: Path, trusting) -> None:
    """A few changed rows are read from their files (no rewrite of the whole snapshot for them);
    past `REWRITE_SHARE` of the rows the snapshot is written again, holding them."""
    from clipdedup.db.store_load import REWRITE_SHARE

    vecs = _make_db(tmp_path, 200, seed=4)
    _open(tmp_path)[0].close()
    rels = sorted(vecs, key=os.fsencode)
    few = int(REWRITE_SHARE * 200)
    for rel in rels[:few]:
        dbmod.write_embedding(tmp_path, rel, np.full(DIM, 5, np.float32))
    st, info = _open(tmp_path)
    assert (info.from_files, info.written) == (few, False)
    st.close()
    dbmod.write_embedding(tmp_path, rels[-1], np.full(DIM, 6, np.float32))
    st, info = _open(tmp_path)
    assert (info.from_files, info.written) == (few + 1, True)
    st.close()
    st, info = _open(tmp_path)
    assert (info.from_files, info.written) == (0, False)
    st.close()

"""The packed snapshot: used when valid, rebuilt when missing, stale or damaged, never written in a
dry run; every load's result equals reading the .npy mirror with np.load."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from clipdedup import db as dbmod
from clipdedup.db import load as load_mod
from clipdedup.db import snapshot as snap_mod
from clipdedup.db.load import SnapshotPrefetch, _compact
from clipdedup.ingest.update import load_embeddings, update_db
from clipdedup.records import FileEntry
from clipdedup.scan import scan_tree, scan_tree_ref

DIM = 37  # odd on purpose: rows are not a multiple of 8 bytes


@pytest.fixture(autouse=True, params=["prefetch", "plain"])
def load_path(request, monkeypatch):
    """Every test runs with the snapshot read ahead on a thread, and with it read after the scan."""
    if request.param == "plain":
        monkeypatch.setattr(load_mod, "SnapshotPrefetch", lambda *a, **k: None)
        monkeypatch.setattr(dbmod, "SnapshotPrefetch", lambda *a, **k: None)
    return request.param


@pytest.fixture
def trusting(monkeypatch):
    """Rows written before a load are trusted at once (the 2 s racy window is tested separately);
    each test's later changes alter mtime, size or inode, which any timestamp granularity shows."""
    monkeypatch.setattr(snap_mod, "RACY_NS", 0)


def _make_db(db: Path, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    vecs = {}
    for k in range(n):
        rel = f"{'ab'[k % 2]}/{k % 5}/img {k}.jpg" if k % 3 else f"top_{k}.png"
        vecs[rel] = rng.standard_normal(DIM).astype(np.float32)
        dbmod.write_embedding(db, rel, vecs[rel], 10**18 + k)
    dbmod.write_meta(db, dbmod.DBMeta("test-model", DIM))
    return vecs


def _reference(db: Path) -> tuple[list[str], np.ndarray]:
    """What the mirror holds: np.load of every .npy, by sorted image path."""
    rels = sorted(
        (
            os.path.relpath(os.path.join(d, f), db)[:-4]
            for d, _, fs in os.walk(db)
            for f in fs
            if f.endswith(".npy")
        ),
        key=os.fsencode,
    )
    mat = np.stack([np.load(db / (r + ".npy")) for r in rels]) if rels else np.zeros((0, DIM), np.float32)
    return rels, mat


def _load(db: Path, **kw) -> tuple[list[str], np.ndarray, dbmod.LoadInfo]:
    info = dbmod.LoadInfo()
    paths, x = dbmod.load_db(db, info=info, **kw)
    info.wait()  # the snapshot is written on a thread
    ref_paths, ref = _reference(db)
    assert paths == ref_paths
    np.testing.assert_array_equal(x, ref)
    return paths, x, info


def test_written_then_used(tmp_path: Path, trusting) -> None:
    _make_db(tmp_path, 40)
    _, _, first = _load(tmp_path)
    assert (first.snapshot, first.from_files, first.written) == ("missing", 40, True)
    _, _, second = _load(tmp_path)
    assert (second.snapshot, second.from_snapshot, second.from_files, second.written) == (
        "used",
        40,
        0,
        False,
    )


def test_snapshot_is_not_an_embedding_or_orphan(tmp_path: Path, trusting) -> None:
    vecs = _make_db(tmp_path, 6)
    _load(tmp_path)
    assert (tmp_path / snap_mod.SNAPSHOT_NAME).is_file()
    index = dbmod.index_db(tmp_path)
    assert sorted(index.files) == sorted(vecs) and index.temp_files == [] and index.shadowed == []
    images = [FileEntry(rel, 10**18 + k, 1) for k, rel in enumerate(vecs)]
    assert dbmod.plan_update(images, index, dim=DIM).orphans == []


def test_stale_after_touch_add_delete(tmp_path: Path, trusting) -> None:
    vecs = _make_db(tmp_path, 30)
    _load(tmp_path)
    rels = sorted(vecs)
    # touch: same content, new mtime; and a re-encode stamped with the same mtime (new inode)
    os.utime(tmp_path / (rels[0] + ".npy"), ns=(5, 5))
    dbmod.write_embedding(tmp_path, rels[1], vecs[rels[1]] + 1, 10**18 + 999)
    np.save(tmp_path / (rels[2] + ".npy"), vecs[rels[2]] * 2)  # rewritten in place, new mtime
    os.utime(tmp_path / (rels[2] + ".npy"), ns=(7, 7))
    dbmod.write_embedding(tmp_path, "new/one.jpg", np.ones(DIM, np.float32))
    os.unlink(tmp_path / (rels[3] + ".npy"))
    _, _, info = _load(tmp_path)
    assert (info.snapshot, info.from_files, info.from_snapshot, info.written) == ("used", 4, 26, True)
    _, _, again = _load(tmp_path)
    assert (again.from_files, again.written) == (0, False)


def test_reencode_with_same_mtime_is_seen(tmp_path: Path, trusting) -> None:
    vecs = _make_db(tmp_path, 5)
    _load(tmp_path)
    rel = sorted(vecs)[2]
    before = (tmp_path / (rel + ".npy")).stat()
    dbmod.write_embedding(tmp_path, rel, -vecs[rel], before.st_mtime_ns)  # what a forced update does
    after = (tmp_path / (rel + ".npy")).stat()
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)
    _, x, info = _load(tmp_path)
    assert info.from_files == 1 and info.written  # rewritten over the snapshot it may have mapped
    np.testing.assert_array_equal(x[sorted(vecs).index(rel)], -vecs[rel])
    _, _, again = _load(tmp_path)
    assert (again.from_snapshot, again.written) == (5, False)


def test_inplace_rewrite_keeping_mtime_and_size_is_seen(tmp_path: Path, trusting) -> None:
    """Same size, same inode, mtime set back: only the ctime tells. The racy window is off
    (`trusting`), so nothing but the ctime comparison can send these rows back to the mirror."""
    vecs = _make_db(tmp_path, 8)
    _load(tmp_path)
    before = {rel: (tmp_path / (rel + ".npy")).stat() for rel in vecs}
    time.sleep(0.05)  # past any clock tick of the file system's ctime (jiffies: <= 10 ms)
    for rel, v in vecs.items():
        p = tmp_path / (rel + ".npy")
        st = before[rel]
        with open(p, "r+b") as f:
            f.seek(st.st_size - DIM * 4)
            f.write((v + 3).tobytes())
        os.utime(p, ns=(st.st_mtime_ns, st.st_mtime_ns))
        now = p.stat()
        assert (now.st_mtime_ns, now.st_size, now.st_ino) == (st.st_mtime_ns, st.st_size, st.st_ino)
        assert now.st_ctime_ns != st.st_ctime_ns  # the precondition: ctime moved, nothing else did
    _, x, info = _load(tmp_path)
    assert info.from_files == 8 and info.from_snapshot == 0
    np.testing.assert_array_equal(x, np.stack([vecs[r] + 3 for r in sorted(vecs, key=os.fsencode)]))


def test_reusable_rows_rules() -> None:
    """A row is reused only for the same key, mtime, size, ctime and inode, and only when its ctime
    is RACY_NS older than the load that wrote the snapshot (a rewrite within the timestamp
    granularity of that load could keep all four values)."""
    n, written = 6, 10**18
    stats = {
        "mtime_ns": np.arange(n, dtype=np.int64),
        "size": np.full(n, 100, np.int64),
        "ctime_ns": np.full(n, written - snap_mod.RACY_NS, np.int64),
        "ino": np.arange(n, dtype=np.uint64) + 7,
    }
    keys = [f"k{i}.npy" for i in range(n)]
    snap = snap_mod.Snapshot(
        "x", 3, written, list(keys), *(v.copy() for v in stats.values()), np.zeros(n, np.uint64)
    )
    snap.mtime_ns[1] += 1
    snap.size[2] += 1
    snap.ino[3] += 1
    snap.ctime_ns[4] -= 1  # differs, and is outside the racy window: only the ctime rule drops it
    src, dst, stale = snap_mod.reusable_rows(snap, keys, stats)
    assert src.tolist() == dst.tolist() == [0, 5] and stale == 4
    stats["ctime_ns"][:] = snap.ctime_ns[:] = written - snap_mod.RACY_NS + 1  # all racy
    assert len(snap_mod.reusable_rows(snap, keys, stats)[0]) == 0
    stats["ctime_ns"][:] = snap.ctime_ns[:] = written - snap_mod.RACY_NS
    wanted = ["k5.npy", "other.npy", "k0.npy"]
    sub = {k: v[[5, 0, 0]] for k, v in stats.items()}
    src, dst, stale = snap_mod.reusable_rows(snap, wanted, sub)
    assert src.tolist() == [5, 0] and dst.tolist() == [0, 2] and stale == 4


@pytest.mark.parametrize(
    "damage",
    ["garbage", "truncated", "empty", "magic", "header", "index", "matrix_row", "extra_bytes"],
)
def test_corrupt_snapshot_is_detected_and_rebuilt(tmp_path: Path, trusting, damage: str) -> None:
    _make_db(tmp_path, 12)
    _load(tmp_path)
    p = tmp_path / snap_mod.SNAPSHOT_NAME
    raw = bytearray(p.read_bytes())
    if damage == "garbage":
        raw = bytearray(np.random.default_rng(0).integers(0, 256, len(raw), np.uint8).tobytes())
    elif damage == "truncated":
        raw = raw[: len(raw) // 2]
    elif damage == "empty":
        raw = bytearray()
    elif damage == "magic":
        raw[0] ^= 1
    elif damage == "header":
        raw[30] ^= 1  # inside the dim/row counts, covered by the header checksum
    elif damage == "index":
        raw[-5] ^= 0x20  # a key's byte
    elif damage == "matrix_row":
        raw[snap_mod.DATA_OFFSET + 5 * DIM * 4 + 7] ^= 0x10  # one float of row 5
    elif damage == "extra_bytes":
        raw += b"\0" * 8
    p.write_bytes(bytes(raw))
    _, _, info = _load(tmp_path)
    assert info.written
    if damage == "matrix_row":
        assert (info.snapshot, info.from_files, info.from_snapshot) == ("used", 1, 11)
    else:
        assert info.snapshot.startswith("corrupt") and info.from_files == 12, info.snapshot
    _, _, healed = _load(tmp_path)
    assert (healed.snapshot, healed.from_snapshot) == ("used", 12)


def test_missing_snapshot_and_unwritable_place(tmp_path: Path, trusting) -> None:
    _make_db(tmp_path, 7)
    _load(tmp_path)
    os.unlink(tmp_path / snap_mod.SNAPSHOT_NAME)
    _, _, info = _load(tmp_path)
    assert (info.snapshot, info.written) == ("missing", True)
    os.unlink(tmp_path / snap_mod.SNAPSHOT_NAME)
    (tmp_path / snap_mod.SNAPSHOT_NAME).mkdir()  # cannot be read nor replaced: noted, not raised
    _, _, info = _load(tmp_path)
    assert info.snapshot.startswith("unreadable") and not info.written
    assert "not written" in info.write_error
    assert [q.name for q in tmp_path.iterdir() if q.name.endswith(dbmod.TMP_MARK)] == []


def test_snapshot_of_another_dim_is_ignored(tmp_path: Path, trusting) -> None:
    _make_db(tmp_path, 4)
    _load(tmp_path)
    shutil.rmtree(tmp_path / "a")
    shutil.rmtree(tmp_path / "b")
    for f in tmp_path.glob("*.npy"):
        f.unlink()
    dbmod.write_embedding(tmp_path, "x.jpg", np.ones(DIM + 1, np.float32))
    dbmod.write_meta(tmp_path, dbmod.DBMeta("other-model", DIM + 1))
    paths, x = dbmod.load_db(tmp_path, info=(info := dbmod.LoadInfo()))
    assert paths == ["x.jpg"] and x.shape == (1, DIM + 1)
    assert (info.snapshot, info.snapshot_detail) == ("other dim", f"dim {DIM}, DB holds dim {DIM + 1}")


def test_legacy_npz_rows_are_kept_in_the_snapshot(tmp_path: Path, trusting) -> None:
    vecs = _make_db(tmp_path, 4)
    legacy = np.arange(DIM, dtype=np.float32)
    np.savez_compressed(tmp_path / "old.jpg.npz", clip_embedding=legacy)
    for _ in range(2):
        info = dbmod.LoadInfo()
        paths, x = dbmod.load_db(tmp_path, info=info)
        assert paths == sorted([*vecs, "old.jpg"], key=os.fsencode)
        np.testing.assert_array_equal(x[paths.index("old.jpg")], legacy)
    assert (info.from_snapshot, info.from_files) == (5, 0)


def test_bad_rows_are_squeezed_out_in_order(tmp_path: Path, trusting) -> None:
    vecs = _make_db(tmp_path, 20)
    rels = sorted(vecs, key=os.fsencode)
    for r in rels[3:6] + rels[11:12]:
        (tmp_path / (r + ".npy")).write_bytes(b"broken")
    errors: list = []
    for _ in range(2):
        paths, x = dbmod.load_db(tmp_path, errors=errors)
        assert paths == [r for r in rels if r not in rels[3:6] + rels[11:12]]
        np.testing.assert_array_equal(x, np.stack([vecs[r] for r in paths]))
    assert len(errors) == 8


@pytest.mark.parametrize("seed", range(5))
def test_compact_matches_boolean_indexing(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 200))
    mat = rng.standard_normal((n, 5)).astype(np.float32)
    ok = rng.random(n) < rng.random()
    want = mat[ok].copy()
    k = _compact(mat, ok, chunk=int(rng.integers(1, 9)))
    np.testing.assert_array_equal(mat[:k], want)


def test_load_embeddings_subset_order_and_dry_run(tmp_path: Path, trusting) -> None:
    vecs = _make_db(tmp_path, 10)
    rels = sorted(vecs, key=os.fsencode)
    entries = [FileEntry(r, 0, 0) for r in rels[::2]] + [FileEntry("not/in/db.jpg", 0, 0)]
    kept, x, errors, missing = load_embeddings(tmp_path, entries, dim=DIM, dry_run=True)
    assert [e.rel for e in kept] == rels[::2] and missing == 1 and errors == []
    np.testing.assert_array_equal(x, np.stack([vecs[r] for r in rels[::2]]))
    assert not (tmp_path / snap_mod.SNAPSHOT_NAME).exists()  # dry run: nothing written
    info = dbmod.LoadInfo()
    load_embeddings(tmp_path, entries, dim=DIM, info=info)
    assert info.written
    info = dbmod.LoadInfo()
    kept, x, _, _ = load_embeddings(tmp_path, entries[::-1], dim=DIM, info=info)  # another order
    assert (info.from_snapshot, info.from_files) == (5, 0)
    np.testing.assert_array_equal(x, np.stack([vecs[e.rel] for e in kept]))


def _disk_state(root: Path) -> dict[str, tuple[int, int, bytes]]:
    out = {}
    for d, _, fs in os.walk(root):
        for f in fs:
            p = os.path.join(d, f)
            st = os.stat(p)
            out[p] = (st.st_mtime_ns, st.st_ino, Path(p).read_bytes())
    return out


def test_dry_run_update_and_load_change_nothing(pics: Path, tmp_path: Path) -> None:
    db = tmp_path / "db"
    update_db(pics, db, "builtin:dct")
    scan = scan_tree(pics)
    load_embeddings(db, scan.entries, dim=None)
    snap_mod.wait_for_write(db)  # written on a thread
    assert (db / snap_mod.SNAPSHOT_NAME).exists()
    victim = scan.entries[0]
    os.utime(pics / victim.rel, ns=(victim.mtime_ns + 10**9, victim.mtime_ns + 10**9))
    (db / "extra.jpg.npy").write_bytes((db / (victim.rel + ".npy")).read_bytes())  # an orphan
    before = _disk_state(db)
    u = update_db(pics, db, "builtin:dct", dry_run=True)
    assert victim.rel in u.in_memory
    entries = scan_tree(pics).entries
    kept, x, _, _ = load_embeddings(db, entries, dim=None, in_memory=u.in_memory, dry_run=True)
    assert victim.rel in {e.rel for e in kept} and len(kept) == len(x) > 10
    assert _disk_state(db) == before


def _index_ref(db: Path) -> dbmod.DBIndex:
    """index_db the plain way: the reference walker, then suffix rules per file."""
    files: dict[str, dbmod.DBFile] = {}
    temps, shadowed = [], []
    for e in scan_tree_ref(db, suffixes=None).entries:
        full = os.path.join(db, e.rel)
        st = os.stat(full)
        if e.rel.endswith(dbmod.TMP_MARK):
            temps.append(full)
        elif e.rel.endswith((".npy", ".npz")):
            legacy = e.rel.endswith(".npz")
            f = dbmod.DBFile(e.rel[:-4], full, e.mtime_ns, e.size, legacy, st.st_ctime_ns, st.st_ino)
            prev = files.get(f.rel)
            if prev is None or (prev.legacy and not legacy):
                files[f.rel] = f
                if prev is not None:
                    shadowed.append(prev.path)
            else:
                shadowed.append(full)
    return dbmod.DBIndex(files, sorted(temps, key=os.fsencode), sorted(shadowed, key=os.fsencode))


def test_index_db_matches_reference(tmp_path: Path) -> None:
    v = np.ones(3, np.float32)
    for rel in ["a.jpg", "b/c d.png", "ü/x.jpg", "x.npy", "x.npy.jpg", "n\nl.jpg", "dup.jpg", "z/dup.jpg"]:
        dbmod.write_embedding(tmp_path, rel, v)
    for rel in ["dup.jpg", "only_legacy.jpg", "z/dup.jpg", "z/y.jpg"]:
        np.savez(tmp_path / (rel + ".npz"), clip_embedding=v)
    (tmp_path / ".x.npy.123.clipdedup-tmp").write_bytes(b"")
    (tmp_path / "b" / "notes.txt").write_bytes(b"")
    (tmp_path / "upper.NPY").write_bytes(b"")
    os.mkdir(os.fsencode(tmp_path) + b"/\xff")
    dbmod.write_embedding(tmp_path, os.fsdecode(b"\xff/raw.jpg"), v)
    got, want = dbmod.index_db(tmp_path), _index_ref(tmp_path)
    assert list(got.files.items()) == list(want.files.items())
    assert got.temp_files == want.temp_files and got.shadowed == want.shadowed
    assert len(got.shadowed) == 2 and len(got.temp_files) == 1


def test_prefetch_hands_over_only_for_the_same_keys(tmp_path: Path, trusting) -> None:
    _make_db(tmp_path, 9)
    rels, ref = _reference(tmp_path)
    _load(tmp_path)
    keys = [r + ".npy" for r in rels]
    pre = SnapshotPrefetch(tmp_path, DIM, False)
    mat = pre.take(keys)
    assert mat is not None and pre.fatal is None and pre.bad == []
    np.testing.assert_array_equal(mat, ref)
    assert SnapshotPrefetch(tmp_path, DIM, False).take(keys[1:]) is None
    assert SnapshotPrefetch(tmp_path, DIM + 1, False).take(keys) is None
    assert SnapshotPrefetch(tmp_path / "nope", DIM, False).take(keys) is None

"""The .npy mirror DB: layout, metadata, update plan, orphans, legacy .npz, atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from clipdedup import db as dbmod
from clipdedup.errors import DBMismatchError
from clipdedup.ingest.update import update_db
from clipdedup.records import FileEntry


def test_npy_roundtrip_and_layout(tmp_path: Path) -> None:
    v = np.random.default_rng(0).standard_normal(77).astype(np.float32)
    dbmod.write_embedding(tmp_path, "a/b c/ü.jpg", v, image_mtime_ns=1_234_567_890_123)
    p = tmp_path / "a" / "b c" / "ü.jpg.npy"
    assert p.exists()
    assert np.array_equal(np.load(p), v)
    assert p.stat().st_mtime_ns == 1_234_567_890_123
    assert p.stat().st_size == dbmod.npy_file_size(77)
    assert [q.name for q in p.parent.iterdir()] == ["ü.jpg.npy"]  # no temp file left


def test_atomic_write_leaves_old_file_on_failure(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "x.npy"
    dbmod.atomic_write(target, b"old")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        dbmod.atomic_write(target, b"new contents")
    assert target.read_bytes() == b"old"
    assert sorted(q.name for q in tmp_path.iterdir()) == ["x.npy"]


def entries(*specs: tuple[str, int]) -> list[FileEntry]:
    return [FileEntry(rel, mtime, 10) for rel, mtime in specs]


def test_plan_update_rules(tmp_path: Path) -> None:
    v = np.ones(8, np.float32)
    dbmod.write_embedding(tmp_path, "same.jpg", v, 100)
    dbmod.write_embedding(tmp_path, "older_image.jpg", v, 200)  # image went back in time (restore)
    dbmod.write_embedding(tmp_path, "newer_image.jpg", v, 100)
    dbmod.write_embedding(tmp_path, "gone.jpg", v, 100)
    (tmp_path / "damaged.jpg.npy").write_bytes(b"\x93NUMPY junk")
    os.utime(tmp_path / "damaged.jpg.npy", ns=(100, 100))
    np.savez(tmp_path / "legacy.jpg.npz", clip_embedding=v)
    os.utime(tmp_path / "legacy.jpg.npz", ns=(500, 500))
    imgs = entries(
        ("same.jpg", 100),
        ("older_image.jpg", 150),
        ("newer_image.jpg", 300),
        ("new.jpg", 1),
        ("damaged.jpg", 100),
        ("legacy.jpg", 400),
    )
    index = dbmod.index_db(tmp_path)
    plan = dbmod.plan_update(imgs, index, dim=8)
    assert sorted(e.rel for e in plan.to_encode) == [
        "damaged.jpg",
        "new.jpg",
        "newer_image.jpg",
        "older_image.jpg",
    ]
    assert sorted(e.rel for e in plan.up_to_date) == ["legacy.jpg", "same.jpg"]
    assert plan.orphans == [str(tmp_path / "gone.jpg.npy")]
    forced = dbmod.plan_update(imgs, index, dim=8, force=True)
    assert len(forced.to_encode) == len(imgs)


def test_remove_orphans_prunes_empty_dirs_only(tmp_path: Path) -> None:
    v = np.ones(4, np.float32)
    dbmod.write_embedding(tmp_path, "a/b/c.jpg", v)
    dbmod.write_embedding(tmp_path, "a/keep.jpg", v)
    removed = dbmod.remove_orphans(tmp_path, [str(tmp_path / "a/b/c.jpg.npy")])
    assert removed == [str(tmp_path / "a/b/c.jpg.npy")]
    assert not (tmp_path / "a" / "b").exists()
    assert (tmp_path / "a" / "keep.jpg.npy").exists()


def test_load_db_reads_npy_and_legacy_npz_and_reports_bad(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    vs = rng.standard_normal((3, 16)).astype(np.float32)
    dbmod.write_embedding(tmp_path, "x/1.jpg", vs[0])
    np.savez(tmp_path / "x" / "2.jpg.npz", clip_embedding=vs[1].astype(np.float64))
    np.save(tmp_path / "3.png.npy", vs[2])
    np.save(tmp_path / "bad_dim.png.npy", np.ones(5, np.float32))
    np.savez(tmp_path / "bad_key.jpg.npz", other=vs[0])
    (tmp_path / "text.jpg.npy").write_text("hello")
    errors: list = []
    paths, x = dbmod.load_db(tmp_path, errors=errors)
    assert paths == ["3.png", "x/1.jpg", "x/2.jpg"]
    assert np.array_equal(x, vs[[2, 0, 1]])
    assert sorted(Path(p).name for p, _ in errors) == ["bad_dim.png.npy", "bad_key.jpg.npz", "text.jpg.npy"]
    assert all(len(r.splitlines()) == 1 for _, r in errors)


def test_npy_shadows_legacy_npz(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.jpg.npz", clip_embedding=np.zeros(4, np.float32))
    dbmod.write_embedding(tmp_path, "a.jpg", np.ones(4, np.float32))
    paths, x = dbmod.load_db(tmp_path)
    assert paths == ["a.jpg"] and np.array_equal(x, np.ones((1, 4), np.float32))


def test_other_model_on_existing_db_is_refused(pics: Path, tmp_path: Path, tiny_model: str) -> None:
    from conftest import make_tiny_model

    db = tmp_path / "db"
    sub = pics / "base_images"
    s = update_db(sub, db, tiny_model)
    assert s.encoded == 10 and s.meta.dim == 32
    other = "local-dir:" + str(make_tiny_model(tmp_path / "other_model", seed=1))
    with pytest.raises(DBMismatchError, match="use a separate --db-dir"):
        update_db(sub, db, other)  # nothing to encode: refused by id
    (sub / "ukbench01380.jpg").touch()  # something to encode: refused by the loaded model too
    with pytest.raises(DBMismatchError, match="use a separate --db-dir"):
        update_db(sub, db, other)
    # Nothing was written with the other model.
    assert dbmod.read_meta(db).model_id == tiny_model


def test_update_db_dry_run_writes_nothing(pics: Path, tmp_path: Path, tiny_model: str) -> None:
    db = tmp_path / "db"
    s = update_db(pics / "base_images", db, tiny_model, dry_run=True)
    assert not db.exists()
    assert s.encoded == 10 and len(s.in_memory) == 10


def test_copies_of_encoded_images_need_no_model(pics: Path, tmp_path: Path, tiny_model: str) -> None:
    import shutil

    from clipdedup.ingest.encode.base import LazyEncoder

    db = tmp_path / "db"
    sub = pics / "base_images"
    update_db(sub, db, tiny_model)
    shutil.copy2(sub / "ukbench01380.jpg", sub / "copy of 01380.jpg")

    def no_model():
        raise AssertionError("the model was loaded for a byte-identical copy")

    s = update_db(sub, db, encoder=LazyEncoder(no_model))
    assert s.encoded == 0
    v = np.load(db / "copy of 01380.jpg.npy")
    assert np.array_equal(v, np.load(db / "ukbench01380.jpg.npy"))
    (sub / "new.png").write_bytes(b"")  # a file that does need the model (and fails to decode)
    with pytest.raises(AssertionError, match="model was loaded"):
        update_db(sub, db, encoder=LazyEncoder(no_model))

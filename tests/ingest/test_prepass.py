"""Exact-copy pre-pass: content classes against a whole-file reference, and its use in update_db."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from clipdedup import db as dbmod
from clipdedup.ingest import prepass
from clipdedup.ingest.prepass import PROBE_BYTES, identical_classes, identical_classes_ref
from clipdedup.ingest.update import update_db
from conftest import TESTDATA


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_identical_classes_match_reference(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    sizes = [0, 1, 7, PROBE_BYTES - 1, PROBE_BYTES, PROBE_BYTES + 1, 2 * PROBE_BYTES, 2 * PROBE_BYTES + 1]
    sizes += [3 * PROBE_BYTES + 5, int(rng.integers(1, 5 * PROBE_BYTES))]
    paths = []
    for k, n in enumerate(sizes):
        base = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        paths.append(_write(tmp_path / f"{k}-a", base))
        for c in range(int(rng.integers(0, 3))):  # 0..2 exact copies
            paths.append(_write(tmp_path / f"{k}-copy{c}", base))
        if n > 2 * PROBE_BYTES:
            # Same size, head and tail as `base`, one byte different in the middle: only the full
            # hash tells them apart.
            mid = bytearray(base)
            mid[n // 2] ^= 0xFF
            paths.append(_write(tmp_path / f"{k}-mid", bytes(mid)))
        if n > 0:
            other = rng.integers(0, 256, n, dtype=np.uint8).tobytes()  # same size, other bytes
            paths.append(_write(tmp_path / f"{k}-other", other))
    order = rng.permutation(len(paths))
    paths = [paths[k] for k in order]
    sizes_now = [os.path.getsize(p) for p in paths]
    for workers in (1, 3):
        assert identical_classes(paths, sizes_now, workers=workers) == identical_classes_ref(paths)


def test_identical_classes_edge_cases(tmp_path: Path) -> None:
    assert identical_classes([], []) == []
    one = _write(tmp_path / "one", b"x")
    assert identical_classes([one], [1]) == [None]
    # A file that vanished after the scan is unreadable: no class, no exception.
    a, b = _write(tmp_path / "a", b"same"), _write(tmp_path / "b", b"same")
    gone = _write(tmp_path / "gone", b"same")
    os.unlink(gone)
    assert identical_classes([a, gone, b], [4, 4, 4]) == [0, None, 0]


def test_only_equal_sizes_are_read(tmp_path: Path, monkeypatch) -> None:
    read: list[str] = []
    real = prepass.probe_file
    monkeypatch.setattr(prepass, "probe_file", lambda p, n: read.append(os.path.basename(p)) or real(p, n))
    paths = [_write(tmp_path / "u1", b"1"), _write(tmp_path / "u22", b"22"), _write(tmp_path / "x", b"abc")]
    paths.append(_write(tmp_path / "y", b"abd"))
    assert identical_classes(paths, [1, 2, 3, 3]) == [None, None, None, None]
    assert sorted(read) == ["x", "y"]


def _exact_groups(root: Path, bad: set[str]) -> list[list[str]]:
    by_hash: dict[str, list[str]] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in bad and not rel.endswith((".json", ".md")):
            by_hash.setdefault(hashlib.sha256(p.read_bytes()).hexdigest(), []).append(rel)
    return [g for g in by_hash.values() if len(g) > 1]


def test_update_reuses_embeddings_of_exact_copies(pics: Path, tmp_path: Path, tiny_model: str) -> None:
    gt = json.loads((TESTDATA / "ground_truth.json").read_text())
    bad = {b["path"] for b in gt["bad_files"]}
    groups = _exact_groups(pics, bad)
    assert groups, "the test images hold exact copies"
    db = tmp_path / "db"
    s = update_db(pics, db, tiny_model, batch_size=4, log=lambda line: None)
    n_images = len(gt["images"])
    assert s.scanned == n_images
    extra = sum(len(g) - 1 for g in groups) + 1  # copies of readable images, and the 2nd corrupt file
    assert s.copied == extra - 1
    assert s.encoded == n_images - extra - 1  # minus the copies and the one corrupt file encoded once
    # Both corrupt byte-identical files are reported as skipped and get no embedding.
    failed = {Path(p).relative_to(pics).as_posix() if os.path.isabs(p) else p for p, _ in s.failed}
    assert failed == bad
    paths, x = dbmod.load_db(db)
    assert set(paths) == set(gt["images"]) - bad
    row = {p: x[k] for k, p in enumerate(paths)}
    for g in groups:
        for rel in g[1:]:
            assert np.array_equal(row[rel], row[g[0]]), (rel, g[0])


def test_new_copy_takes_db_vector_without_encoding(pics: Path, tmp_path: Path, tiny_model: str) -> None:
    db = tmp_path / "db"
    update_db(pics, db, tiny_model, log=lambda line: None)
    src = "base_images/ukbench01380.jpg"
    shutil.copy(pics / src, pics / "new-copy.jpg")
    s = update_db(pics, db, tiny_model, log=lambda line: None)
    assert (s.encoded, s.copied) == (0, 1)
    paths, x = dbmod.load_db(db)
    assert np.array_equal(x[paths.index("new-copy.jpg")], x[paths.index(src)])

    # Dry run: the copy's vector is in memory only.
    shutil.copy(pics / src, pics / "dry-copy.jpg")
    s = update_db(pics, db, tiny_model, dry_run=True, log=lambda line: None)
    assert (s.encoded, s.copied) == (0, 1)
    assert np.array_equal(s.in_memory["dry-copy.jpg"], x[paths.index(src)])
    assert not os.path.exists(dbmod.npy_path(db, "dry-copy.jpg"))


def test_unreadable_db_twin_means_encoding(pics: Path, tmp_path: Path, tiny_model: str) -> None:
    db = tmp_path / "db"
    update_db(pics, db, tiny_model, log=lambda line: None)
    src = "base_images/ukbench01380.jpg"
    npy = dbmod.npy_path(db, src)
    st = os.stat(npy)
    # Same size and mtime (so still "up to date"), but a broken header: the copy must be encoded.
    data = bytearray(Path(npy).read_bytes())
    data[:6] = b"garbag"
    Path(npy).write_bytes(bytes(data))
    os.utime(npy, ns=(st.st_atime_ns, st.st_mtime_ns))
    shutil.copy(pics / src, pics / "new-copy.jpg")
    s = update_db(pics, db, tiny_model, log=lambda line: None)
    assert (s.encoded, s.copied) == (1, 0)
    assert os.path.exists(dbmod.npy_path(db, "new-copy.jpg"))

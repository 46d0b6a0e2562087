"""End to end: the real CLI commands on a copy of the real test images, with a tiny open_clip model."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clipdedup.cli import dedup_cmd, import_cmd
from clipdedup.db import META_NAME, load_db, read_meta
from conftest import TESTDATA
from helpers import run_cli_json as run_json
from helpers import tree_hashes as files_under

_GT_FILE = TESTDATA / "ground_truth.json"
GT = json.loads(_GT_FILE.read_text()) if _GT_FILE.exists() else {"images": [], "bad_files": []}
BAD = {b["path"] for b in GT["bad_files"]}


def exact_copy_groups() -> list[set[str]]:
    """Ground-truth sets of byte-identical readable images (hashes computed from the shared data)."""
    by_hash: dict[str, set[str]] = {}
    for rel in GT["images"]:
        if rel in BAD:
            continue
        h = hashlib.sha256((TESTDATA / rel).read_bytes()).hexdigest()
        by_hash.setdefault(h, set()).add(rel)
    return [g for g in by_hash.values() if len(g) > 1]


def test_dedup_end_to_end(pics: Path, tmp_path: Path, tiny_model: str, capsys) -> None:
    db, trash = tmp_path / "db", tmp_path / "trash"
    before = files_under(pics)
    args = ["-i", str(pics), "-d", str(db), "-t", str(trash), "-m", tiny_model, "-th", "1e-4"]
    s = run_json(dedup_cmd, args, capsys)

    # Nothing lost: every file is either still in place or in the trash, byte for byte.
    after, trashed = files_under(pics), files_under(trash)
    assert sorted(list(after.values()) + list(trashed.values())) == sorted(before.values())
    assert set(after) | set(trashed) == set(before)
    assert not set(after) & set(trashed)

    # Byte-identical copies are grouped. The threshold is tiny but not 0: the same image encoded in
    # batches of different sizes may differ in the last bits (BLAS blocking).
    groups = [set(g["members"]) for g in s["groups"]]
    for want in exact_copy_groups():
        assert any(want <= g for g in groups), (want, groups)
    # Every group keeps exactly one file in place and moves the rest.
    for g in s["groups"]:
        assert g["kept"] in after
        assert {m["path"] for m in g["moves"]} == set(g["members"]) - {g["kept"]}
    # Bad files are reported, not grouped; named as group members are, relative to the image dir.
    skipped = {d["path"] for d in s["skipped"]}
    assert BAD <= skipped
    assert not any(BAD & g for g in groups)

    # The DB mirrors the tree: one .npy per readable image that was there at encode time.
    meta = read_meta(db)
    assert meta is not None and meta.model_id == tiny_model and meta.dim == 32
    npys = {p.relative_to(db).as_posix()[: -len(".npy")] for p in db.rglob("*.npy")}
    assert npys == set(before) - BAD
    assert (db / META_NAME).exists()

    # A second run encodes nothing (and cleans the orphans of the moved files).
    s2 = run_json(dedup_cmd, args, capsys)
    assert s2["encoded"] == 0
    assert s2["orphans_removed"] == len(trashed)
    assert s2["moved"] == 0
    npys = {p.relative_to(db).as_posix()[: -len(".npy")] for p in db.rglob("*.npy")}
    assert npys == set(after) - BAD

    # A touched file is re-encoded, and only that one.
    victim = pics / "base_images" / "ukbench01380.jpg"
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    s3 = run_json(dedup_cmd, args, capsys)
    assert s3["encoded"] == 1
    paths, x = load_db(db)
    assert x.shape == (len(paths), 32) and np.isfinite(x).all()
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


def test_dry_run_changes_nothing(pics: Path, tmp_path: Path, tiny_model: str, capsys) -> None:
    db, trash = tmp_path / "db", tmp_path / "trash"
    before = files_under(pics)
    args = ["-i", str(pics), "-d", str(db), "-t", str(trash), "-m", tiny_model, "-th", "1e-4", "-n"]
    s = run_json(dedup_cmd, args, capsys)
    assert files_under(pics) == before
    assert not db.exists() and not trash.exists()
    assert s["dry_run"] and s["moved"] > 0
    assert all(m["to"] and m["to"].startswith(str(trash)) for g in s["groups"] for m in g["moves"])


def test_no_trash_dir_moves_nothing(pics: Path, tmp_path: Path, tiny_model: str, capsys) -> None:
    before = files_under(pics)
    s = run_json(
        dedup_cmd, ["-i", str(pics), "-d", str(tmp_path / "db"), "-m", tiny_model, "-th", "1e-4"], capsys
    )
    assert files_under(pics) == before
    assert s["groups"] and s["moved"] == 0


def test_corrupt_snapshot_is_one_line_and_rebuilt(
    pics: Path, tmp_path: Path, tiny_model: str, capsys
) -> None:
    from clipdedup.cli import run_cli
    from clipdedup.db.snapshot import SNAPSHOT_NAME

    db = tmp_path / "db"
    args = ["-i", str(pics), "-d", str(db), "-m", tiny_model, "-th", "1e-4", "--json"]
    assert run_cli(dedup_cmd, "test", args) == 0
    first = json.loads(capsys.readouterr().out)
    snap = db / SNAPSHOT_NAME
    snap.write_bytes(b"\0" * snap.stat().st_size)
    assert run_cli(dedup_cmd, "test", args) == 0
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if "packed snapshot" in line]
    assert len(lines) == 1 and "corrupt" in lines[0] and "a new one was written" in lines[0], err
    assert json.loads(out)["groups"] == first["groups"]
    assert run_cli(dedup_cmd, "test", args) == 0  # rebuilt: nothing more to say
    assert "packed snapshot" not in capsys.readouterr().err


def test_import_dedup_moves_only_import_files(
    testdata: Path, tmp_path: Path, tiny_model: str, capsys
) -> None:
    import shutil

    base, imp = tmp_path / "base", tmp_path / "import"
    shutil.copytree(testdata / "base_images", base)
    shutil.copytree(testdata / "mixed_images", imp)
    for p in list(base.rglob("*")) + list(imp.rglob("*")):
        os.chmod(p, 0o644)
    base_before = files_under(base)
    imp_before = files_under(imp)
    args = [
        "-bi",
        str(base),
        "-bd",
        str(tmp_path / "bdb"),
        "-ii",
        str(imp),
        "-id",
        str(tmp_path / "idb"),
        "-t",
        str(tmp_path / "trash"),
        "-m",
        tiny_model,
        "-th",
        "1e-4",
    ]
    s = run_json(import_cmd, args, capsys)
    assert files_under(base) == base_before
    moved = {m["path"] for g in s["groups"] for m in g["moves"] if m["to"]}
    # Byte-identical copies of base images in the import dir are exactly what moves at a tiny threshold.
    base_hashes = set(base_before.values())
    want = {rel for rel, h in imp_before.items() if h in base_hashes and not rel.endswith("_corrupt.jpg")}
    assert moved == want
    assert set(files_under(tmp_path / "trash")) == want


def test_console_scripts_installed(tmp_path: Path) -> None:
    bindir = Path(sys.executable).parent
    for name in [
        "clip-image-deduper",
        "clip-image-import-deduper",
        "clip-image-deduper-db-test",
        "clip-image-encoding-test",
    ]:
        exe = bindir / name
        assert exe.exists(), name
        r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "Usage" in r.stdout, r.stderr


@pytest.mark.parametrize("cmd_name", ["clip-image-deduper", "clip-image-import-deduper"])
def test_wrong_flag_is_one_line_exit_2(cmd_name: str) -> None:
    exe = Path(sys.executable).parent / cmd_name
    r = subprocess.run([str(exe), "--no-such-flag"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "no-such-flag" in r.stderr


def test_missing_dir_is_one_line_exit_2(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "clip-image-deduper"
    r = subprocess.run(
        [str(exe), "-i", str(tmp_path / "nope"), "-d", str(tmp_path / "db")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "nope" in r.stderr, r.stderr


def test_db_test_and_encoding_test_commands(pics: Path, tmp_path: Path, tiny_model: str) -> None:
    bindir = Path(sys.executable).parent
    r = subprocess.run(
        [
            str(bindir / "clip-image-deduper-db-test"),
            "-i",
            str(pics / "base_images"),
            "-d",
            str(tmp_path / "db"),
            "-m",
            tiny_model,
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "encoded 10" in r.stdout and "load: 10 embeddings of dim 32" in r.stdout
    imgs = [
        str(pics / "base_images" / "ukbench00120.jpg"),
        str(pics / "mixed_images" / "ukbench00120.jpg"),
        str(pics / "base_images" / "ukbench01380.jpg"),
    ]
    r = subprocess.run(
        [str(bindir / "clip-image-encoding-test"), "-m", tiny_model, "-p", "fp32", *imgs],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    rows = [line.split()[2:] for line in r.stdout.strip().splitlines()]
    d = np.array(rows, dtype=float)
    assert d.shape == (3, 3)
    assert np.allclose(np.diag(d), 0) and np.allclose(d, d.T)
    assert d[0, 1] == 0.0  # byte-identical files
    assert d[0, 2] > 0.0

"""Fault injection: real processes killed with SIGKILL at random points, and writes that fail for
lack of space. Afterwards a rerun completes, every .npy is whole and right, and undo puts every
moved file back byte for byte.

Each kill point is drawn from a seeded random generator; the seed is in every assertion message,
and CLIPDEDUP_FAULT_SEED=<n> replays one. The default suite runs one kill of each kind; the
`slow` variants loop over many.
"""

from __future__ import annotations

import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from clipdedup.db import TMP_MARK, load_db, npy_file_size
from clipdedup.ingest.update import update_db
from clipdedup.trash import journal as jm
from clipdedup.trash.undo import undo
from helpers import distinct_images, dup_tree, mounted_tmpfs, tree_hashes

EXE = Path(sys.executable).parent / "clip-image-deduper"
SEED = int(os.environ.get("CLIPDEDUP_FAULT_SEED", random.randrange(1 << 30)))


def kill_when(proc: subprocess.Popen, ready, delay: float, timeout: float = 240.0) -> bool:
    """SIGKILLs `proc` `delay` seconds after `ready()` first holds; True if it was still running."""
    end = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            return False
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("the process never reached the kill window")
        time.sleep(0.002)
    time.sleep(delay)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return alive and proc.returncode == -signal.SIGKILL


def count_npy(db: Path) -> int:
    return sum(1 for _ in db.rglob("*.npy")) if db.exists() else 0


def check_db_against_fresh_encode(img: Path, db: Path, fresh: Path, model: str, why: str) -> None:
    assert not [p for p in db.rglob("*") if p.name.endswith(TMP_MARK)], why
    size = npy_file_size(32)
    for p in db.rglob("*.npy"):
        assert p.stat().st_size == size, f"{why}: {p} has {p.stat().st_size} bytes"
        np.load(p, allow_pickle=False)  # every file is a whole, loadable .npy
    errors: list[tuple[str, str]] = []
    paths, x = load_db(str(db), errors=errors)
    assert not errors, f"{why}: {errors}"
    if not fresh.exists():
        update_db(str(img), str(fresh), model, log=lambda line: None)
    fpaths, fx = load_db(str(fresh))
    assert paths == fpaths, why
    np.testing.assert_allclose(x, fx, atol=2e-5, err_msg=why)


def _kill_during_update(testdata: Path, tmp_path: Path, model: str, rounds: int) -> None:
    rng = random.Random(SEED)
    img = tmp_path / "img"
    distinct_images(testdata, img / "a", 4)
    distinct_images(testdata, img / "b" / "c", 2)
    db, fresh = tmp_path / "db", tmp_path / "fresh"
    killed = 0
    for r in range(rounds):
        shutil.rmtree(db, ignore_errors=True)
        if r % 2 == 1:  # every other round: a DB half full from an earlier, finished run
            update_db(str(img / "a"), str(db), model, log=lambda line: None)
        start = count_npy(db)
        delay = rng.uniform(0.0, 0.4)
        why = f"seed {SEED} round {r}: kill {delay:.3f}s after the first new .npy"
        cmd = [str(EXE), "-i", str(img), "-d", str(db), "-m", model, "-b", "1", "-q", "--no-clean-orphans"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        killed += kill_when(proc, lambda s=start: count_npy(db) > s, delay)
        lines: list[str] = []
        u = update_db(str(img), str(db), model, log=lines.append)  # the rerun completes
        assert not u.failed, why
        check_db_against_fresh_encode(img, db, fresh, model, why)
    assert killed >= (rounds + 1) // 2, f"seed {SEED}: only {killed} of {rounds} runs were killed mid-update"


def test_kill_during_db_update(testdata: Path, tmp_path: Path, tiny_model: str) -> None:
    _kill_during_update(testdata, tmp_path, tiny_model, rounds=1)


@pytest.mark.slow
def test_kill_during_db_update_many(testdata: Path, tmp_path: Path, tiny_model: str) -> None:
    _kill_during_update(testdata, tmp_path, tiny_model, rounds=8)


def journal_moves(trash: Path) -> int:
    try:
        with open(jm.journal_path(trash), "rb") as f:
            return f.read().count(b'"t": "move"')
    except FileNotFoundError:
        return 0


def _kill_during_moves(testdata: Path, tmp_path: Path, model: str, rounds: int) -> None:
    rng = random.Random(SEED + 1)
    for r in range(rounds):
        img, db, trash = tmp_path / f"img{r}", tmp_path / f"db{r}", tmp_path / f"trash{r}"
        dup_tree(testdata, img, copies=6)
        before = tree_hashes(img)
        total_moves = len(before) - len(before) // 6
        k = rng.randrange(1, total_moves // 2)
        why = f"seed {SEED} round {r}: kill after journal move record {k} of {total_moves}"
        cmd = [str(EXE), "-i", str(img), "-d", str(db), "-t", str(trash), "-m", model, "-th", "1e-4", "-q"]
        for _attempt in range(3):
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if kill_when(proc, lambda t=trash, k=k: journal_moves(t) >= k, 0.0):
                break
            undo(str(trash))  # finished before the kill: put back and try again
            k = max(1, k // 2)
        else:
            raise AssertionError(f"{why}: the run always finished before the kill")
        assert tree_hashes(img) != before, why  # some files did move
        if r % 2 == 1:
            # Kill an undo too, part way, then finish it.
            ucmd = [str(EXE), "undo", "-t", str(trash), "-q"]
            n = journal_moves(trash)
            proc = subprocess.Popen(ucmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            kill_when(proc, lambda t=trash, n=n: _undone(t) >= max(1, n // 3), 0.0)
        res = undo(str(trash))
        assert all(x.status in ("restored", "nothing-to-do") for x in res), (why, [x.line() for x in res])
        assert tree_hashes(img) == before, why
        assert tree_hashes(trash) == {}, why
        infos, bad = jm.runs(trash)
        assert not bad and all(m.state in ("undone", "failed") for i in infos for m in i.moves), why


def _undone(trash: Path) -> int:
    with open(jm.journal_path(trash), "rb") as f:
        return f.read().count(b'"t": "undone"')


def test_kill_during_moves_then_undo(testdata: Path, tmp_path: Path, tiny_model: str) -> None:
    _kill_during_moves(testdata, tmp_path, tiny_model, rounds=1)


@pytest.mark.slow
def test_kill_during_moves_then_undo_many(testdata: Path, tmp_path: Path, tiny_model: str) -> None:
    _kill_during_moves(testdata, tmp_path, tiny_model, rounds=6)


def _limit_file_size(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_write_beyond_file_size_limit(testdata: Path, tmp_path: Path, tiny_model: str) -> None:
    img, db = tmp_path / "img", tmp_path / "db"
    img.mkdir()
    update_db(str(img), str(db), tiny_model, log=lambda line: None)  # an empty DB: metadata only
    distinct_images(testdata, img, 1)
    limit = npy_file_size(32) - 1  # every .npy write fails; smaller files (the lock) still fit
    cmd = [str(EXE), "-i", str(img), "-d", str(db), "-m", tiny_model, "-q"]
    r = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_limit_file_size(limit), timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and ".npy" in err[0] and "File too large" in err[0], err
    assert "Traceback" not in r.stderr
    assert count_npy(db) == 0 and not [p for p in db.rglob("*") if p.name.endswith(TMP_MARK)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # the limit lifted
    assert r.returncode == 0, r.stderr[-3000:]
    check_db_against_fresh_encode(img, db, tmp_path / "fresh", tiny_model, "after the limit")


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):
    with mounted_tmpfs(tmp_path / "small", "size=96k,nr_inodes=64") as mnt:
        yield mnt


def test_disk_full_on_a_tiny_tmpfs(testdata: Path, tmp_path: Path, tiny_model: str, tiny_tmpfs: Path) -> None:
    img, db = tmp_path / "img", tiny_tmpfs / "db"
    img.mkdir()
    update_db(str(img), str(db), tiny_model, log=lambda line: None)  # metadata fits
    distinct_images(testdata, img, 4)  # 40 embeddings: more than 96 KiB of 4 KiB pages
    cmd = [str(EXE), "-i", str(img), "-d", str(db), "-m", tiny_model, "-q"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and "No space left" in err[0], err
    written = count_npy(db)
    assert 0 < written < 40
    assert not [p for p in db.rglob("*") if p.name.endswith(TMP_MARK)]
    for p in db.rglob("*.npy"):
        assert np.load(p).shape == (32,)  # what was written is whole
    # Room again (the DB moved to a roomy disk): the rerun completes, with the same embeddings.
    big = tmp_path / "db_big"
    shutil.copytree(db, big)
    r = subprocess.run(
        [str(EXE), "-i", str(img), "-d", str(big), "-m", tiny_model, "-q"], capture_output=True
    )
    assert r.returncode == 0, r.stderr[-3000:]
    check_db_against_fresh_encode(img, big, tmp_path / "fresh", tiny_model, "after the disk was full")

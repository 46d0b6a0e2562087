"""The locks are held while a run works, not only taken at its start (issue 25): a spy in the
mover, called for each move, finds the DB dir's and the trash dir's lock taken, for dedup, import
and `apply`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from clipdedup.errors import UserError
from clipdedup.pipeline import Group, RunOptions, RunSummary, run_dedup, run_import
from clipdedup.report import apply as report_apply
from clipdedup.report import core as report
from clipdedup.trash.move import Mover
from clipdedup.util.lock import DirLock, db_lock, trash_lock

IMAGE = "ukbench00120.jpg"


def held(lock: DirLock) -> bool:
    """Whether another holder has `lock` (a second flock in this process conflicts too)."""
    try:
        lock.acquire()
    except UserError as e:
        return "in use by another run" in str(e)
    lock.release()
    return False


def spy_moves(monkeypatch: pytest.MonkeyPatch, locks: list[DirLock]) -> list[list[bool]]:
    seen: list[list[bool]] = []
    real = Mover.move

    def move(self: Mover, *a, **kw):
        seen.append([held(lock) for lock in locks])
        return real(self, *a, **kw)

    monkeypatch.setattr(Mover, "move", move)
    return seen


def _opts() -> RunOptions:
    return RunOptions(model_id="builtin:dct", log=lambda line: None)


def test_dedup_holds_its_locks_while_it_moves(testdata: Path, tmp_path: Path, monkeypatch) -> None:
    img, db, trash = tmp_path / "img", tmp_path / "db", tmp_path / "trash"
    img.mkdir()
    for name in ("a.jpg", "b.jpg"):
        shutil.copy2(testdata / "base_images" / IMAGE, img / name)
    seen = spy_moves(monkeypatch, [db_lock(str(db)), trash_lock(str(trash))])
    s = run_dedup(str(img), str(db), str(trash), _opts())
    assert len(s.moved) == 1 and seen == [[True, True]]


def test_import_holds_its_locks_while_it_moves(testdata: Path, tmp_path: Path, monkeypatch) -> None:
    base, imp, idb, trash = tmp_path / "base", tmp_path / "imp", tmp_path / "idb", tmp_path / "trash"
    base.mkdir()
    imp.mkdir()
    shutil.copy2(testdata / "base_images" / IMAGE, base / "a.jpg")
    shutil.copy2(testdata / "base_images" / IMAGE, imp / "a.jpg")
    seen = spy_moves(monkeypatch, [db_lock(str(idb)), trash_lock(str(trash))])
    s = run_import(str(base), str(tmp_path / "bdb"), str(imp), str(idb), str(trash), _opts())
    assert len(s.moved) == 1 and seen == [[True, True]]


def test_apply_holds_the_trash_lock_while_it_moves(tmp_path: Path, monkeypatch) -> None:
    root, rep, trash = tmp_path / "pics", tmp_path / "rep", tmp_path / "trash"
    root.mkdir()
    for name in ("a.bin", "b.bin"):
        (root / name).write_bytes(b"same bytes")
    s = RunSummary(threshold=0.1, backend="reference")
    s.groups.append(Group(["a.bin", "b.bin"], "a.bin", [], [("a.bin", "b.bin", 0.0)]))
    report.write_report(s, str(rep), {"": str(root)}, strategy="largest", dry_run=True)
    seen = spy_moves(monkeypatch, [trash_lock(str(trash))])
    res = report_apply.apply_report(str(rep), str(trash))
    assert res.moved("tool") == 1 and seen == [[True]]

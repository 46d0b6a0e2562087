"""A move's journal record is on stable storage (fsynced) before the file moves: a power cut
right after a move can lose the file's old name, never the record that says where it went."""

from __future__ import annotations

import os
from pathlib import Path

from clipdedup.scan import FileEntry
from clipdedup.trash import journal as jm
from clipdedup.trash import move as mv


def test_every_move_record_is_fsynced_before_its_move(tmp_path: Path, monkeypatch) -> None:
    img, trash = tmp_path / "img", tmp_path / "trash"
    img.mkdir()
    (img / "keep.jpg").write_bytes(b"K" * 100)
    for k in range(3):
        (img / f"d{k}.jpg").write_bytes(os.urandom(200 + k))
    synced: dict[int, int] = {}  # inode -> its size at its last fsync
    real_fsync, real_move = os.fsync, mv.move_exact

    def fsync(fd: int) -> None:
        real_fsync(fd)
        st = os.fstat(fd)
        synced[st.st_ino] = st.st_size

    moves: list[tuple[int, int]] = []  # (journal size now, journal size at its last fsync)

    def move_exact(src: str, dst: str, **kw) -> None:
        st = os.stat(jm.journal_path(trash))
        recs, _ = jm.read_records(trash)
        assert recs[-1]["t"] == "move" and recs[-1]["source"] == src
        moves.append((st.st_size, synced.get(st.st_ino, -1)))
        real_move(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(mv, "move_exact", move_exact)
    header = jm.run_header(str(img), str(trash), "largest", "dedup")
    with jm.Journal(str(trash), "r1", header) as j:
        for k in range(3):
            st = os.stat(img / f"d{k}.jpg")
            entry = FileEntry(f"d{k}.jpg", st.st_mtime_ns, st.st_size)
            r = mv.move_duplicate(str(img), str(trash), entry, str(img / "keep.jpg"), journal=j, group=0)
            assert r.dest is not None, r.reason
    assert len(moves) == 3
    assert all(now == at_fsync for now, at_fsync in moves), moves  # every byte, the record included

"""Undo writes only below the image dir its run's header records (issue 25): a forged or damaged
move+done record, with a matching file in the trash, is refused with a reason and counted, and no
directory is made outside the image dir."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from clipdedup.cli import dedup_cmd, run_cli
from clipdedup.records import FileEntry
from clipdedup.trash import journal as jm
from clipdedup.trash.move import move_duplicate
from clipdedup.trash.undo import undo


@pytest.fixture
def moved(tmp_path: Path) -> tuple[Path, Path]:
    """img/ with one duplicate moved to trash/ by a journaled run r1."""
    img, trash = tmp_path / "img", tmp_path / "trash"
    img.mkdir()
    (img / "keep.jpg").write_bytes(b"K" * 100)
    (img / "dup.jpg").write_bytes(b"K" * 100)
    st = os.stat(img / "dup.jpg")
    header = jm.run_header(str(img), str(trash), "largest", "dedup")
    with jm.Journal(str(trash), "r1", header) as j:
        e = FileEntry("dup.jpg", st.st_mtime_ns, st.st_size)
        r = move_duplicate(str(img), str(trash), e, str(img / "keep.jpg"), journal=j, group=0)
    assert r.dest is not None
    return img, trash


def forge(trash: Path, run: str, source: str, name: str = "evil.jpg") -> None:
    """A file in the trash and a move+done pair that says it came from `source`."""
    (trash / "forged").mkdir(exist_ok=True)
    (trash / "forged" / name).write_bytes(b"payload " + name.encode())
    digest = jm.content_hash(trash / "forged" / name)
    rec = {"t": "move", "run": run, "seq": 90 + len(name), "source": source, "dest": f"forged/{name}"}
    rec |= {"size": 8, "mtime_ns": 0, "hash": digest, "group": 0, "kept": source, "strategy": "largest"}
    with open(jm.journal_path(trash), "a") as f:
        f.write(json.dumps(rec) + "\n" + json.dumps({"t": "done", "run": run, "seq": rec["seq"]}) + "\n")


def test_forged_records_are_refused_and_counted(moved, tmp_path: Path, capsys, monkeypatch) -> None:
    img, trash = moved
    monkeypatch.chdir(tmp_path)  # where a relative source would land
    outside = tmp_path / "outside"
    os.symlink(outside, img / "link")  # a symlinked subdir of the image dir that leads out
    outside.mkdir()
    cases = {
        str(tmp_path / "elsewhere" / "deep" / "a.jpg"): "outside its run's image dir",
        f"{img}/../elsewhere/b.jpg": "outside its run's image dir",
        "relative/c.jpg": "outside its run's image dir",
        str(img / "link" / "new" / "d.jpg"): "its place leads outside its run's image dir",
    }
    for k, source in enumerate(cases):
        forge(trash, "r1", source, f"{k}.jpg")
    forge(trash, "ghost", str(img / "ghost.jpg"), "ghost.jpg")  # a run with no header
    capsys.readouterr()
    code = run_cli(dedup_cmd, "t", ["undo", "-t", str(trash)])
    out, err = capsys.readouterr()
    assert code == 1 and "restored 1, already in place 0, refused 5, missing 0" in err
    lines = {line.split(": ", 2)[1]: line for line in out.splitlines()}
    for source, why in cases.items():
        assert lines[source].startswith("refused: ") and why in lines[source]
    assert "no header naming its image dir" in lines[str(img / "ghost.jpg")]
    assert (img / "dup.jpg").read_bytes() == b"K" * 100  # the real move is undone
    assert not (tmp_path / "elsewhere").exists() and os.listdir(outside) == []
    assert not (img / "ghost.jpg").exists() and not (tmp_path / "relative").exists()
    assert sorted(os.listdir(trash / "forged")) == ["0.jpg", "1.jpg", "2.jpg", "3.jpg", "ghost.jpg"]


def test_a_gone_image_dir_is_not_made_again(moved, tmp_path: Path) -> None:
    img, trash = moved
    os.rename(img, tmp_path / "img.moved")
    res = undo(str(trash))
    assert [r.status for r in res] == ["refused"] and "is gone" in res[0].message
    assert not img.exists()
    os.rename(tmp_path / "img.moved", img)
    assert [r.status for r in undo(str(trash))] == ["restored"]

"""The move journal and undo: every crash state a move can be cut in is put back, nothing overwritten."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from clipdedup.cli import dedup_cmd, run_cli
from clipdedup.errors import UserError
from clipdedup.records import FileEntry
from clipdedup.trash import journal as jm
from clipdedup.trash.move import move_duplicate
from clipdedup.trash.undo import undo
from clipdedup.util.lock import trash_lock
from helpers import tree_hashes


def entry(root: Path, rel: str) -> FileEntry:
    st = os.stat(root / rel)
    return FileEntry(rel, st.st_mtime_ns, st.st_size)


@pytest.fixture
def setup(tmp_path: Path):
    img, trash = tmp_path / "img", tmp_path / "trash"
    (img / "sub").mkdir(parents=True)
    (img / "keep.jpg").write_bytes(b"K" * 1000)
    for k in range(4):
        (img / "sub" / f"d{k}.jpg").write_bytes(os.urandom(500 + k))
    return img, trash


def journal_of(trash: Path, run: str = "r1") -> jm.Journal:
    # The image dir beside the trash dir, as `setup` makes them: undo restores only below it.
    header = jm.run_header(str(trash.parent / "img"), str(trash), "largest", "dedup")
    return jm.Journal(str(trash), run, header)


def move_all(img: Path, trash: Path, run: str = "r1") -> list[str]:
    dests = []
    with journal_of(trash, run) as j:
        for k in range(4):
            rel = f"sub/d{k}.jpg"
            r = move_duplicate(
                str(img), str(trash), entry(img, rel), str(img / "keep.jpg"), journal=j, group=0
            )
            assert r.dest is not None, r.reason
            dests.append(r.dest)
    return dests


def test_records_are_written_before_the_move(setup, monkeypatch) -> None:
    img, trash = setup
    from clipdedup.trash import move as act

    seen = []
    real = act.move_exact

    def spy(src: str, dst: str, **kw) -> None:
        recs, _ = jm.read_records(trash)
        seen.append(recs[-1])  # what is on disk at the moment of the move
        real(src, dst, **kw)

    monkeypatch.setattr(act, "move_exact", spy)
    move_all(img, trash)
    assert [r["t"] for r in seen] == ["move"] * 4
    assert [r["source"] for r in seen] == [str(img / f"sub/d{k}.jpg") for k in range(4)]
    recs, bad = jm.read_records(trash)
    assert not bad
    assert [r["t"] for r in recs] == ["run"] + ["move", "done"] * 4
    m = recs[1]
    assert m["dest"] == "sub/d0.jpg" and m["group"] == 0 and m["kept"] == str(img / "keep.jpg")
    assert m["size"] == 500 and m["hash"] == jm.content_hash(trash / "sub" / "d0.jpg")
    assert {"mtime_ns", "strategy", "run", "seq"} <= set(m)


def test_undo_restores_byte_identical_and_is_idempotent(setup) -> None:
    img, trash = setup
    before = tree_hashes(img)
    move_all(img, trash)
    assert set(tree_hashes(img)) == {"keep.jpg"}
    res = undo(str(trash))
    assert [r.status for r in res] == ["restored"] * 4
    assert tree_hashes(img) == before and tree_hashes(trash) == {}
    assert undo(str(trash)) == []  # everything already undone


def test_undo_never_overwrites_a_file_that_reappeared(setup) -> None:
    img, trash = setup
    move_all(img, trash)
    (img / "sub" / "d1.jpg").write_bytes(b"new file")
    res = {Path(r.source).name: r for r in undo(str(trash))}
    assert res["d1.jpg"].status == "refused" and "reappeared" in res["d1.jpg"].message
    assert (img / "sub" / "d1.jpg").read_bytes() == b"new file"
    assert (trash / "sub" / "d1.jpg").exists()
    assert all(res[f"d{k}.jpg"].status == "restored" for k in (0, 2, 3))
    # A second undo reports the same refusal (the move stays open) and still overwrites nothing.
    again = undo(str(trash))
    assert [r.status for r in again] == ["refused"]


def test_undo_checks_the_content_hash(setup) -> None:
    img, trash = setup
    move_all(img, trash)
    (trash / "sub" / "d2.jpg").write_bytes(b"edited in the trash")
    res = {Path(r.source).name: r for r in undo(str(trash))}
    assert res["d2.jpg"].status == "refused" and "content" in res["d2.jpg"].message
    assert not (img / "sub" / "d2.jpg").exists()


def _intent_only(img: Path, trash: Path, rel: str) -> dict:
    """Writes the move record of img/rel, as a run would right before moving it, and nothing else."""
    src = img / rel
    with journal_of(trash) as j:
        j.intend(
            {
                "source": str(src),
                "dest": rel,
                "size": src.stat().st_size,
                "mtime_ns": src.stat().st_mtime_ns,
                "hash": jm.content_hash(src),
                "group": 0,
                "kept": str(img / "keep.jpg"),
                "strategy": "largest",
            }
        )
    (trash / rel).parent.mkdir(parents=True, exist_ok=True)
    return {"src": src, "dst": trash / rel, "data": src.read_bytes()}


@pytest.mark.parametrize(
    "state, status",
    [
        ("before-link", "nothing-to-do"),  # killed after the journal write, before the link
        ("both-names", "restored"),  # killed between link and unlink
        ("moved", "restored"),  # killed after the unlink, before the done record
        ("full-copy", "restored"),  # cross-device copy finished, source not yet unlinked
        ("partial-copy", "nothing-to-do"),  # cross-device copy cut short
    ],
)
def test_undo_after_a_crash_mid_move(setup, state: str, status: str) -> None:
    img, trash = setup
    before = tree_hashes(img)
    f = _intent_only(img, trash, "sub/d0.jpg")
    if state == "both-names":
        os.link(f["src"], f["dst"])
    elif state == "moved":
        os.rename(f["src"], f["dst"])
    elif state == "full-copy":
        f["dst"].write_bytes(f["data"])
    elif state == "partial-copy":
        f["dst"].write_bytes(f["data"][:100])
    (r,) = undo(str(trash))
    assert r.status == status, r.message
    assert tree_hashes(img) == before
    if state == "partial-copy":
        assert "incomplete copy" in r.message and f["dst"].exists()  # reported, never deleted
    else:
        assert not f["dst"].exists()
    assert undo(str(trash)) == []


def test_undo_after_a_crash_mid_undo(setup, monkeypatch) -> None:
    img, trash = setup
    before = tree_hashes(img)
    move_all(img, trash)
    from clipdedup.trash import move as act

    real_unlink = os.unlink
    calls = []

    def crash_on_second_unlink(p, *a, **k):
        # A kill between the link back and the unlink in the trash: from then on the "dead"
        # process does nothing more, not even its rollback.
        calls.append(p)
        if len(calls) >= 2:
            raise KeyboardInterrupt
        return real_unlink(p, *a, **k)

    monkeypatch.setattr(act.os, "unlink", crash_on_second_unlink)
    with pytest.raises(KeyboardInterrupt):
        undo(str(trash))
    monkeypatch.setattr(act.os, "unlink", real_unlink)
    half = [p for p in (img / "sub").iterdir()]
    assert any(
        (trash / "sub" / p.name).exists() and os.path.samefile(p, trash / "sub" / p.name) for p in half
    )
    res = undo(str(trash))
    assert all(r.status == "restored" for r in res) and len(res) == 3
    assert tree_hashes(img) == before and tree_hashes(trash) == {}


def test_undo_one_run_only(setup) -> None:
    img, trash = setup
    move_all(img, trash, run="r1")
    (img / "sub" / "d0.jpg").write_bytes(b"a new d0, moved by the second run")
    with journal_of(trash, "r2") as j:
        r = move_duplicate(str(img), str(trash), entry(img, "sub/d0.jpg"), str(img / "keep.jpg"), journal=j)
    assert r.dest == str(trash / "sub" / "d0 (1).jpg")
    infos, _ = jm.runs(trash)
    assert [(i.run, i.count("done")) for i in infos] == [("r1", 4), ("r2", 1)]
    res = undo(str(trash), "r2")
    assert [x.status for x in res] == ["restored"]
    assert (img / "sub" / "d0.jpg").read_bytes() == b"a new d0, moved by the second run"
    assert not (img / "sub" / "d1.jpg").exists()
    with pytest.raises(UserError, match="no run 'r3'"):
        undo(str(trash), "r3")


def test_torn_last_line_is_skipped_and_not_glued(setup) -> None:
    img, trash = setup
    move_all(img, trash)
    with open(jm.journal_path(trash), "ab") as f:
        f.write(b'{"t": "move", "run": "r1", "seq": 99, "sou')  # a write cut by a crash
    with journal_of(trash, "r2") as j:
        (img / "x.jpg").write_bytes(b"x")
        move_duplicate(str(img), str(trash), entry(img, "x.jpg"), str(img / "keep.jpg"), journal=j)
    recs, bad = jm.read_records(trash)
    assert len(bad) == 1 and "unreadable journal line" in bad[0]
    assert [r["t"] for r in recs if r["run"] == "r2"] == ["run", "move", "done"]
    assert sorted(r.status for r in undo(str(trash))) == ["restored"] * 5


def test_non_utf8_names_round_trip(tmp_path: Path) -> None:
    img, trash = tmp_path / "img", tmp_path / "trash"
    img.mkdir()
    name = os.fsdecode(b"caf\xe9 \xff.jpg")
    raw = os.path.join(os.fsencode(img), b"caf\xe9 \xff.jpg")
    with open(raw, "wb") as f:
        f.write(b"bytes")
    (img / "keep.jpg").write_bytes(b"k")
    with journal_of(trash) as j:
        r = move_duplicate(str(img), str(trash), entry(img, name), str(img / "keep.jpg"), journal=j)
    assert r.dest is not None and not os.path.exists(raw)
    json.loads(Path(jm.journal_path(trash)).read_text("ascii").splitlines()[1])  # plain ASCII JSON
    (res,) = undo(str(trash))
    assert res.status == "restored"
    with open(raw, "rb") as f:
        assert f.read() == b"bytes"


def test_undo_waits_for_no_one_and_refuses_during_a_run(setup) -> None:
    img, trash = setup
    move_all(img, trash)
    with trash_lock(str(trash)):
        with pytest.raises(UserError, match="in use by another run"):
            undo(str(trash))
    assert len(undo(str(trash))) == 4


def test_undo_cli(setup, capsys) -> None:
    img, trash = setup
    move_all(img, trash)
    (img / "sub" / "d3.jpg").write_bytes(b"reappeared")
    assert run_cli(dedup_cmd, "t", ["undo", "-t", str(trash), "--list"]) == 0
    assert "r1" in capsys.readouterr().out
    assert run_cli(dedup_cmd, "t", ["undo", "-t", str(trash), "-n"]) == 1
    out = capsys.readouterr()
    assert "would restore 3" in out.err and not (img / "sub" / "d0.jpg").exists()
    assert run_cli(dedup_cmd, "t", ["undo", "-t", str(trash)]) == 1  # one refused
    out = capsys.readouterr()
    assert "restored 3" in out.err and "refused 1" in out.err
    assert "refused: " + str(img / "sub" / "d3.jpg") in out.out
    assert run_cli(dedup_cmd, "t", ["undo", "-t", str(trash), "--run", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no run 'nope'" in err
    empty = img.parent / "empty"
    empty.mkdir()
    assert run_cli(dedup_cmd, "t", ["undo", "-t", str(empty)]) == 2
    assert "nothing to undo" in capsys.readouterr().err

"""The trash stage under attack: undo killed mid-copy, a file replaced right before its move, a
symlink planted in the trash, a full or unwritable trash, hostile names. Each test pins one
promise of docs/guarantees.md ("Moves and undo under attack")."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clipdedup.records import FileEntry, MoveResult
from clipdedup.trash import journal as jm
from clipdedup.trash import move as act
from clipdedup.trash.move import REPLACED, Mover, move_duplicate
from clipdedup.trash.undo import undo
from helpers import dup_tree, fill_up, mounted_tmpfs, tree_hashes

EXE = Path(sys.executable).parent / "clip-image-deduper"
SEED = int(os.environ.get("CLIPDEDUP_FAULT_SEED", random.randrange(1 << 30)))


def entry(root: Path, rel: str) -> FileEntry:
    st = os.stat(root / rel)
    return FileEntry(rel, st.st_mtime_ns, st.st_size)


def journaled_move(img: Path, trash: Path, rel: str, run: str = "r1") -> MoveResult:
    with jm.Journal(str(trash), run, jm.run_header(str(img), str(trash), "largest", "dedup")) as j:
        return move_duplicate(
            str(img), str(trash), entry(img, rel), str(img / "keep.jpg"), journal=j, group=0
        )


def stage_files(d: Path) -> list[Path]:
    return [p for p in d.rglob(".clipdedup-undo-*")]


# 1. An undo killed mid-copy never leaves a partial file at the original path.


def test_undo_killed_mid_copy_is_finished_by_the_next_undo(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    img = tmp_path / "img"
    img.mkdir()
    (img / "keep.jpg").write_bytes(b"K")
    with mounted_tmpfs(tmp_path / "trash", "size=200m") as trash:
        for r in range(3):
            big = img / "sub" / "big.jpg"
            big.parent.mkdir(exist_ok=True)
            big.write_bytes(rng.randbytes(96 << 20))  # copying it back takes a while
            os.chmod(big, 0o640)
            os.utime(big, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
            want = (hashlib.sha256(big.read_bytes()).hexdigest(), big.stat().st_mtime_ns, 0o640)
            assert journaled_move(img, trash, "sub/big.jpg", run=f"r{r}").dest is not None
            assert not big.exists()
            delay = rng.uniform(0.0, 0.08)
            why = f"seed {SEED} round {r}: undo killed {delay:.3f}s after the copy back began"
            proc = subprocess.Popen([str(EXE), "undo", "-t", str(trash), "-q"], stderr=subprocess.PIPE)
            deadline = time.monotonic() + 120
            while not (os.path.lexists(big) or stage_files(img)) and proc.poll() is None:
                assert time.monotonic() < deadline, why
                time.sleep(0.001)
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            if os.path.lexists(big):  # whatever is at the original path is the whole file
                st = big.stat()
                assert (hashlib.sha256(big.read_bytes()).hexdigest(), st.st_mtime_ns) == want[:2], why
            res = undo(str(trash))
            assert [x.status for x in res] in (["restored"], ["nothing-to-do"]), (
                why,
                [x.line() for x in res],
            )
            st = big.stat()
            got = (hashlib.sha256(big.read_bytes()).hexdigest(), st.st_mtime_ns, st.st_mode & 0o777)
            assert got == want, why
            assert tree_hashes(trash) == {} and stage_files(img) == [], why


# 2. A file replaced after its last check is not moved: the move is rolled back.


@pytest.mark.parametrize("how", ["link", "copy"])
def test_file_replaced_after_the_last_check_is_not_moved(tmp_path: Path, monkeypatch, how: str) -> None:
    img, trash = tmp_path / "img", tmp_path / "trash"
    (img / "sub").mkdir(parents=True)
    (img / "keep.jpg").write_bytes(b"K" * 100)
    (img / "sub" / "d.jpg").write_bytes(b"checked" * 100)
    e = entry(img, "sub/d.jpg")
    real_intend = jm.Journal.intend

    def intend_then_replace(self, rec):
        seq = real_intend(self, rec)
        # The moment the intent record is on disk, another program swaps the file atomically.
        new = img / "sub" / "new.tmp"
        new.write_bytes(b"never scanned" * 100)
        os.utime(new, ns=(e.mtime_ns, e.mtime_ns))
        os.replace(new, img / "sub" / "d.jpg")
        return seq

    monkeypatch.setattr(jm.Journal, "intend", intend_then_replace)
    if how == "copy":
        real_link = os.link

        def no_cross_device_link(src, dst, **kw):
            if str(trash) in os.fspath(dst):
                raise OSError(18, "Invalid cross-device link")  # EXDEV: the copy path
            return real_link(src, dst, **kw)

        monkeypatch.setattr(act.os, "link", no_cross_device_link)
    with jm.Journal(str(trash), "r1", jm.run_header(str(img), str(trash), "largest", "dedup")) as j:
        r = move_duplicate(str(img), str(trash), e, str(img / "keep.jpg"), journal=j, group=0)
    monkeypatch.undo()
    assert r.dest is None and r.reason == REPLACED
    assert (img / "sub" / "d.jpg").read_bytes() == b"never scanned" * 100
    assert tree_hashes(trash) == {}
    infos, bad = jm.runs(trash)
    assert not bad and [m.state for m in infos[0].moves] == ["failed"]
    assert undo(str(trash)) == []


def test_file_replaced_after_its_trash_name_is_made_is_put_back(tmp_path: Path, monkeypatch) -> None:
    img, trash = tmp_path / "img", tmp_path / "trash"
    (img / "sub").mkdir(parents=True)
    (img / "keep.jpg").write_bytes(b"K" * 100)
    (img / "sub" / "d.jpg").write_bytes(b"checked" * 100)
    real_link = os.link

    def link_then_replace(src, dst, **kw):
        real_link(src, dst, **kw)
        if str(trash) in os.fspath(dst):  # the last instant: after the link, before the unlink
            new = img / "sub" / "new.tmp"
            new.write_bytes(b"newcomer" * 100)
            os.replace(new, img / "sub" / "d.jpg")

    monkeypatch.setattr(act.os, "link", link_then_replace)
    r = journaled_move(img, trash, "sub/d.jpg")
    monkeypatch.undo()
    assert r.dest is not None  # the checked file was moved ...
    assert Path(r.dest).read_bytes() == b"checked" * 100
    assert (img / "sub" / "d.jpg").read_bytes() == b"newcomer" * 100  # ... and the newcomer kept
    assert sorted(p.name for p in (img / "sub").iterdir()) == ["d.jpg"]


@pytest.mark.parametrize("how", ["link", "copy"])
def test_undo_drops_the_name_a_killed_move_left_beside_the_source(tmp_path: Path, how: str) -> None:
    img, trash = tmp_path / "img", tmp_path / "trash"
    (img / "sub").mkdir(parents=True)
    (img / "keep.jpg").write_bytes(b"K")
    (img / "sub" / "d.jpg").write_bytes(b"D" * 50)
    before = tree_hashes(img)
    r = journaled_move(img, trash, "sub/d.jpg")
    infos, _ = jm.runs(trash)
    grab = jm.move_grab_path(str(img / "sub" / "d.jpg"), infos[0].run, infos[0].moves[0].seq)
    # As left by a kill between the rename and the unlink: another name of the trash copy, or
    # (across file systems) the original whose copy is in the trash.
    if how == "link":
        os.link(r.dest, grab)
    else:
        Path(grab).write_bytes(Path(r.dest).read_bytes())
    assert [x.status for x in undo(str(trash))] == ["restored"]
    assert tree_hashes(img) == before and tree_hashes(trash) == {}


# 3. Undo never follows a symlink planted inside the trash dir.


def test_undo_refuses_a_trash_path_through_a_symlink(tmp_path: Path) -> None:
    img, trash, other = tmp_path / "img", tmp_path / "trash", tmp_path / "other"
    (img / "sub").mkdir(parents=True)
    (img / "keep.jpg").write_bytes(b"K")
    for k in range(3):
        (img / "sub" / f"d{k}.jpg").write_bytes(os.urandom(300))
        assert journaled_move(img, trash, f"sub/d{k}.jpg").dest is not None
    # Someone moves the trashed dir away and leaves a symlink to another tree with the same files.
    os.rename(trash / "sub", trash / "sub.real")
    other.mkdir()
    for p in (trash / "sub.real").iterdir():
        (other / p.name).write_bytes(p.read_bytes())
    os.symlink(other, trash / "sub")
    other_before = tree_hashes(other)
    res = undo(str(trash))
    assert [x.status for x in res] == ["refused"] * 3, [x.line() for x in res]
    assert all("leads outside the trash dir" in x.message for x in res)
    assert tree_hashes(other) == other_before and not list((img / "sub").iterdir())


def test_forward_run_creates_nothing_through_a_symlinked_trash_subdir(tmp_path: Path) -> None:
    img, trash, outside = tmp_path / "img", tmp_path / "trash", tmp_path / "outside"
    (img / "a" / "b").mkdir(parents=True)
    (img / "keep.jpg").write_bytes(b"K")
    (img / "a" / "b" / "d.jpg").write_bytes(b"D")
    trash.mkdir()
    outside.mkdir()
    os.symlink(outside, trash / "a")
    r = move_duplicate(str(img), str(trash), entry(img, "a/b/d.jpg"), str(img / "keep.jpg"))
    assert r.dest is None and "outside the trash dir" in (r.reason or "")
    assert list(outside.iterdir()) == []  # not even an empty b/


# 5 and 6. A full or unwritable trash: the run stops, says so in one line, exits 2; undo works.


def _dedup_cmd(img: Path, db: Path, trash: Path, model: str, *extra: str) -> list[str]:
    return [str(EXE), "-i", str(img), "-d", str(db), "-t", str(trash), "-m", model, "-th", "1e-4", *extra]


def test_full_trash_stops_the_run_and_undo_still_works(
    testdata: Path, tmp_path: Path, tiny_model: str
) -> None:
    img, db = tmp_path / "img", tmp_path / "db"
    dup_tree(testdata, img, copies=4)
    before = tree_hashes(img)
    with mounted_tmpfs(tmp_path / "small", "size=256k") as mnt:
        trash = mnt / "trash"
        r = subprocess.run(
            _dedup_cmd(img, db, trash, tiny_model), capture_output=True, text=True, timeout=300
        )
        assert r.returncode == 2, r.stderr[-3000:]
        nospace = [line for line in r.stderr.splitlines() + r.stdout.splitlines() if "No space left" in line]
        assert len(nospace) <= 2, nospace  # the one failed move's line and the closing count
        assert any(line.startswith("error:") and "moves failed" in line for line in nospace), r.stderr[-2000:]
        assert tree_hashes(img) != before
        infos, bad = jm.runs(trash)
        assert not bad
        fill_up(mnt)  # not a byte left: undo must need no new space to start
        u = subprocess.run([str(EXE), "undo", "-t", str(trash)], capture_output=True, text=True, timeout=300)
        assert u.returncode == 0, u.stdout[-2000:] + u.stderr[-2000:]
        assert tree_hashes(img) == before
        assert tree_hashes(trash) == {}


def test_every_move_failing_exits_2_with_a_count_even_when_quiet(
    testdata: Path, tmp_path: Path, tiny_model: str
) -> None:
    img, db, trash = tmp_path / "img", tmp_path / "db", tmp_path / "trash"
    dup_tree(testdata, img, copies=3)
    trash.mkdir()
    for k in range(3):
        (trash / f"dir{k}").write_bytes(b"")  # a file where each move needs a directory
    before = tree_hashes(img)
    cmd = _dedup_cmd(img, db, trash, tiny_model, "--json", "-q")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "moves failed" in lines[0], lines
    assert tree_hashes(img) == before
    d = json.loads(r.stdout)
    due = [m for g in d["groups"] for m in g["moves"]]
    assert d["moves_failed"] == len(due) > 0 and d["moved"] == 0


# 9. Names with a newline stay one line; a symlink whose target moved says so.


def test_a_newline_in_a_name_is_escaped_in_the_moved_line(tmp_path: Path) -> None:
    from clipdedup.records import Group, RunSummary
    from clipdedup.report.core import move_lines

    s = RunSummary.__new__(RunSummary)
    s.groups = [
        Group(["k.jpg", "a\nb.jpg"], "k.jpg", [MoveResult("a\nb.jpg", "/i/a\nb.jpg", "/t/a\nb.jpg")], [])
    ]
    lines = move_lines(s, dry_run=False)
    assert lines == ["moved /i/a\\nb.jpg -> /t/a\\nb.jpg (kept k.jpg)"]


def test_a_dangling_symlink_says_its_target_is_gone(tmp_path: Path) -> None:
    img = tmp_path / "img"
    img.mkdir()
    (img / "t.jpg").write_bytes(b"T")
    os.symlink("t.jpg", img / "l.jpg")
    e = FileEntry("l.jpg", os.stat(img / "t.jpg").st_mtime_ns, 1)
    os.rename(img / "t.jpg", img / "moved.jpg")
    why = act.verify_unchanged(str(img / "l.jpg"), e)
    assert why is not None and "symlink whose target is gone" in why


def test_mover_stops_after_the_first_full_disk(tmp_path: Path, monkeypatch) -> None:
    img, trash = tmp_path / "img", tmp_path / "trash"
    img.mkdir()
    (img / "keep.jpg").write_bytes(b"K")
    for k in range(4):
        (img / f"d{k}.jpg").write_bytes(b"D%d" % k)
    calls = []

    def full(src, dst, **kw):
        calls.append(src)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(act, "move_exact", full)
    m = Mover(str(img), str(trash), dry_run=False, strategy="largest", mode="dedup")
    keep = entry(img, "keep.jpg")
    rs = [m.move(entry(img, f"d{k}.jpg"), str(img / "keep.jpg"), keep, 0) for k in range(4)]
    m.close()
    assert len(calls) == 1 and [r.tried for r in rs] == [True, False, False, False]
    assert all(r.failed and r.dest is None for r in rs)


def test_apply_whose_moves_fail_exits_2_with_one_line(tmp_path: Path, capsys) -> None:
    from clipdedup.cli import dedup_cmd, run_cli
    from clipdedup.records import Group, RunSummary
    from clipdedup.report import core as report

    root, rep, trash = tmp_path / "pics", tmp_path / "rep", tmp_path / "trash"
    (root / "sub").mkdir(parents=True)
    names = [f"sub/{n}.bin" for n in "abc"]
    for k, n in enumerate(names):
        (root / n).write_bytes(os.urandom(100 + k))
    s = RunSummary(threshold=0.1, backend="reference")
    s.groups.append(Group(names, names[0], [], [(names[0], x, 0.01) for x in names[1:]]))
    report.write_report(s, str(rep), {"": str(root)}, strategy="largest", dry_run=True)
    trash.mkdir()
    (trash / "sub").write_bytes(b"")  # a file where the moves need a directory
    before = tree_hashes(root)
    capsys.readouterr()
    assert run_cli(dedup_cmd, "test", ["apply", str(rep), "-t", str(trash), "-q"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "2 moves failed" in err[0], err
    assert tree_hashes(root) == before

"""Moves: never overwrite, never lose a name, verify right before, symlinks never kept over targets."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest

from clipdedup.records import FileEntry
from clipdedup.trash import move as act
from clipdedup.trash.keep import Candidate
from clipdedup.trash.move import (
    check_before_move,
    choose_keep_safe,
    depends_on,
    free_destination,
    is_inside,
    link_chain,
    move_duplicate,
    move_exact,
    move_no_replace,
    safe_members,
    safe_members_ref,
)


def entry_of(root: Path, rel: str) -> FileEntry:
    st = os.stat(root / rel, follow_symlinks=False)
    if os.path.islink(root / rel):
        st = os.stat(root / rel)
    return FileEntry(rel, st.st_mtime_ns, st.st_size)


def write(p: Path, data: bytes) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def test_move_exact_moves_and_never_replaces(tmp_path: Path) -> None:
    src, dst = write(tmp_path / "a.jpg", b"A" * 100), tmp_path / "t" / "a.jpg"
    dst.parent.mkdir()
    move_exact(str(src), str(dst))
    assert not src.exists() and dst.read_bytes() == b"A" * 100
    src2 = write(tmp_path / "a.jpg", b"B")
    with pytest.raises(FileExistsError):
        move_exact(str(src2), str(dst))
    assert src2.read_bytes() == b"B" and dst.read_bytes() == b"A" * 100


def test_move_exact_keeps_source_when_unlink_fails(tmp_path: Path, monkeypatch) -> None:
    src, dst = write(tmp_path / "a.jpg", b"data"), tmp_path / "b.jpg"
    real_unlink = os.unlink

    def failing_unlink(p, *a, **k):
        if os.fspath(p) == str(src):
            raise PermissionError(errno.EACCES, "denied")
        return real_unlink(p, *a, **k)

    monkeypatch.setattr(act.os, "unlink", failing_unlink)
    with pytest.raises(PermissionError):
        move_exact(str(src), str(dst))
    assert src.read_bytes() == b"data" and not dst.exists()


def test_cross_device_copy_keeps_content_and_mtime(tmp_path: Path, monkeypatch) -> None:
    src = write(tmp_path / "a.jpg", os.urandom(3 << 20))
    os.utime(src, ns=(1_000_000_000, 1_234_567_890_123))
    data = src.read_bytes()

    def no_link(*a, **k):
        raise OSError(errno.EXDEV, "cross-device link")

    monkeypatch.setattr(act.os, "link", no_link)
    dst = tmp_path / "b.jpg"
    move_exact(str(src), str(dst))
    assert not src.exists() and dst.read_bytes() == data
    assert dst.stat().st_mtime_ns == 1_234_567_890_123


def test_free_destination_and_no_replace(tmp_path: Path) -> None:
    write(tmp_path / "t" / "a.jpg", b"old")
    write(tmp_path / "t" / "a (1).jpg", b"old1")
    assert free_destination(str(tmp_path / "t" / "a.jpg")) == str(tmp_path / "t" / "a (2).jpg")
    src = write(tmp_path / "a.jpg", b"new")
    got = move_no_replace(str(src), str(tmp_path / "t" / "a.jpg"))
    assert got == str(tmp_path / "t" / "a (2).jpg") and Path(got).read_bytes() == b"new"
    assert (tmp_path / "t" / "a.jpg").read_bytes() == b"old"


def test_is_inside(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "ab").mkdir()
    os.symlink(tmp_path / "ab", tmp_path / "a" / "link")
    assert is_inside(str(tmp_path / "a" / "b"), str(tmp_path / "a"))
    assert is_inside(str(tmp_path / "a"), str(tmp_path / "a"))
    assert not is_inside(str(tmp_path / "ab"), str(tmp_path / "a"))  # a prefix is not a parent
    assert not is_inside(str(tmp_path / "a" / "link"), str(tmp_path / "a"))


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, FileEntry, FileEntry]:
    img = tmp_path / "img"
    write(img / "dup.jpg", b"x" * 50)
    write(img / "keep.jpg", b"x" * 60)
    return img, entry_of(img, "dup.jpg"), entry_of(img, "keep.jpg")


def test_check_before_move_passes_when_nothing_changed(pair) -> None:
    img, dup, keep = pair
    assert check_before_move(str(img), dup, str(img / "keep.jpg"), keep) is None


@pytest.mark.parametrize(
    "change, why",
    [
        ("grow", "changed since it was scanned"),
        ("touch", "changed since it was scanned"),
        ("delete", "gone since the scan"),
        ("delete-kept", "is gone"),
        ("touch-kept", "changed since the scan"),
    ],
)
def test_check_before_move_refuses_stale_information(pair, tmp_path: Path, change: str, why: str) -> None:
    img, dup, keep = pair
    target = img / ("keep.jpg" if change.endswith("kept") else "dup.jpg")
    if change.startswith("grow"):
        target.write_bytes(b"x" * 51)
    elif change.startswith("touch"):
        st = target.stat()
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    else:
        target.unlink()
    trash = tmp_path / "trash"
    r = move_duplicate(str(img), str(trash), dup, str(img / "keep.jpg"), kept_entry=keep)
    assert r.dest is None and why in r.reason
    assert "\n" not in r.reason
    assert not trash.exists()
    if change != "delete":
        assert (img / "dup.jpg").exists()


def test_never_moves_the_target_of_a_kept_symlink(tmp_path: Path) -> None:
    img = tmp_path / "img"
    write(img / "real.jpg", b"content")
    os.symlink("real.jpg", img / "link.jpg")
    os.symlink("link.jpg", img / "link2.jpg")
    real = entry_of(img, "real.jpg")
    for kept in ("link.jpg", "link2.jpg"):
        r = move_duplicate(
            str(img), str(tmp_path / "t"), real, str(img / kept), kept_entry=entry_of(img, kept)
        )
        assert r.dest is None and "symlink to it" in r.reason
    # link2 -> link -> real: moving link would break link2.
    r = move_duplicate(str(img), str(tmp_path / "t"), entry_of(img, "link.jpg"), str(img / "link2.jpg"))
    assert r.dest is None and "symlink to it" in r.reason
    assert (img / "real.jpg").read_bytes() == b"content"


def test_link_chain_and_depends_on(tmp_path: Path) -> None:
    write(tmp_path / "t.jpg", b"x")
    os.symlink("t.jpg", tmp_path / "l1.jpg")
    os.symlink(str(tmp_path / "l1.jpg"), tmp_path / "l2.jpg")
    os.symlink("loop_b", tmp_path / "loop_a")
    os.symlink("loop_a", tmp_path / "loop_b")
    assert link_chain(str(tmp_path / "l2.jpg")) == [str(tmp_path / "l2.jpg"), str(tmp_path / "l1.jpg")]
    assert link_chain(str(tmp_path / "t.jpg")) == []
    assert len(link_chain(str(tmp_path / "loop_a"))) == 2  # a loop stops, never hangs
    assert depends_on(str(tmp_path / "l2.jpg"), str(tmp_path / "t.jpg"))
    assert depends_on(str(tmp_path / "l2.jpg"), str(tmp_path / "l1.jpg"))
    assert not depends_on(str(tmp_path / "l1.jpg"), str(tmp_path / "l2.jpg"))
    assert not depends_on(str(tmp_path / "t.jpg"), str(tmp_path / "l1.jpg"))
    assert not depends_on(str(tmp_path / "t.jpg"), str(tmp_path / "t.jpg"))


def test_choose_keep_never_picks_a_symlink_over_its_target(tmp_path: Path) -> None:
    write(tmp_path / "z_real.jpg", b"x" * 10)
    os.symlink("z_real.jpg", tmp_path / "a_link.jpg")  # sorts first: plain tie-breaking would keep it
    os.symlink("a_link.jpg", tmp_path / "a_link2.jpg")
    write(tmp_path / "other.jpg", b"y" * 5)
    names = ("a_link.jpg", "a_link2.jpg", "z_real.jpg")
    cands = [Candidate(n, str(tmp_path / n), 10, 7) for n in names]
    cands.append(Candidate("other.jpg", str(tmp_path / "other.jpg"), 5, 5))
    root = str(tmp_path)
    for strategy in ("largest", "newest"):
        assert cands[choose_keep_safe(root, cands, strategy)].rel == "z_real.jpg"
    # Without its target in the group, a symlink may be kept, but a direct file comes first.
    pair = [cands[0], cands[3]]
    assert pair[choose_keep_safe(root, pair, "largest")].rel == "other.jpg"
    # Only links: the one that the other passes through is kept (a_link2 -> a_link -> z_real).
    links = [cands[1], cands[0]]
    assert links[choose_keep_safe(root, links, "newest")].rel == "a_link.jpg"


def test_same_file_through_a_symlinked_dir_is_never_moved(tmp_path: Path) -> None:
    img = tmp_path / "img"
    write(img / "a" / "x.jpg", b"the only copy")
    os.symlink("a", img / "b")  # img/b/x.jpg is img/a/x.jpg by another route
    cands = [Candidate(r, str(img / r), 13, 7) for r in ("b/x.jpg", "a/x.jpg")]
    assert cands[choose_keep_safe(str(img), cands, "largest")].rel == "a/x.jpg"  # b/x.jpg sorts first
    for src, kept in (("a/x.jpg", "b/x.jpg"), ("b/x.jpg", "a/x.jpg")):
        r = move_duplicate(str(img), str(tmp_path / "t"), entry_of(img, src), str(img / kept))
        assert r.dest is None and "this very file" in r.reason
    assert (img / "a" / "x.jpg").read_bytes() == b"the only copy"


def test_hard_links_are_separate_copies(tmp_path: Path) -> None:
    img = tmp_path / "img"
    write(img / "x.jpg", b"data")
    os.link(img / "x.jpg", img / "y.jpg")
    assert not depends_on(str(img / "x.jpg"), str(img / "y.jpg"))
    r = move_duplicate(str(img), str(tmp_path / "t"), entry_of(img, "y.jpg"), str(img / "x.jpg"))
    assert r.dest is not None and (img / "x.jpg").read_bytes() == b"data"


def test_moved_symlink_stays_a_symlink(tmp_path: Path) -> None:
    img = tmp_path / "img"
    write(img / "real.jpg", b"content")
    os.symlink("real.jpg", img / "link.jpg")
    write(img / "other.jpg", b"other")
    e = entry_of(img, "link.jpg")
    r = move_duplicate(str(img), str(tmp_path / "t"), e, str(img / "other.jpg"))
    assert r.dest is not None and os.path.islink(r.dest) and os.readlink(r.dest) == "real.jpg"
    assert (img / "real.jpg").read_bytes() == b"content"


def test_nothing_is_moved_out_of_a_linked_dir_outside(tmp_path: Path) -> None:
    img, outside = tmp_path / "img", tmp_path / "outside"
    write(outside / "x.jpg", b"x")
    write(img / "keep.jpg", b"x")
    os.symlink(outside, img / "linked")
    e = entry_of(img, "linked/x.jpg")
    r = move_duplicate(str(img), str(tmp_path / "t"), e, str(img / "keep.jpg"))
    assert r.dest is None and "outside the image dir" in r.reason
    assert (outside / "x.jpg").exists()


def test_trash_path_through_a_symlink_is_refused(tmp_path: Path) -> None:
    img, trash, elsewhere = tmp_path / "img", tmp_path / "trash", tmp_path / "elsewhere"
    write(img / "sub" / "d.jpg", b"d")
    write(img / "keep.jpg", b"d")
    trash.mkdir()
    elsewhere.mkdir()
    os.symlink(elsewhere, trash / "sub")
    r = move_duplicate(str(img), str(trash), entry_of(img, "sub/d.jpg"), str(img / "keep.jpg"))
    assert r.dest is None and "outside the trash dir" in r.reason
    assert (img / "sub" / "d.jpg").exists() and not any(elsewhere.iterdir())


def test_dry_run_touches_nothing(pair, tmp_path: Path) -> None:
    img, dup, keep = pair
    r = move_duplicate(str(img), str(tmp_path / "trash"), dup, str(img / "keep.jpg"), dry_run=True)
    assert r.dest == str(tmp_path / "trash" / "dup.jpg")
    assert (img / "dup.jpg").exists() and not (tmp_path / "trash").exists()


def _symlink_tree(testdata: Path, tmp_path: Path) -> tuple[Path, Path]:
    img, outside = tmp_path / "img", tmp_path / "outside"
    src = (testdata / "base_images" / "ukbench00120.jpg").read_bytes()
    write(img / "real.jpg", src)
    write(img / "sub" / "copy.jpg", src)
    write(outside / "x.jpg", src)
    write(img / "other.jpg", (testdata / "base_images" / "ukbench09380.jpg").read_bytes())
    for k, p in enumerate((img / "real.jpg", img / "sub" / "copy.jpg", outside / "x.jpg")):
        os.utime(p, ns=(10**18, 10**18 + k * 10**9))  # the file outside is the newest
    os.symlink("real.jpg", img / "link.jpg")
    os.symlink("..", img / "sub" / "loop")  # a directory loop
    os.symlink(outside, img / "outside_link")
    return img, outside


def test_symlinks_not_followed_by_default(testdata: Path, tmp_path: Path, tiny_model: str) -> None:
    from clipdedup.pipeline import RunOptions, run_dedup

    img, outside = _symlink_tree(testdata, tmp_path)
    opts = RunOptions(model_id=tiny_model, threshold=1e-4, log=lambda line: None)
    s = run_dedup(str(img), str(tmp_path / "db"), str(tmp_path / "trash"), opts)
    assert [g.members for g in s.groups] == [["real.jpg", "sub/copy.jpg"]]
    assert [m.rel for m in s.moved] == ["real.jpg"]
    assert os.path.islink(img / "link.jpg") and (outside / "x.jpg").exists()


def test_follow_symlinks_loops_links_and_outside_dirs(
    testdata: Path, tmp_path: Path, tiny_model: str
) -> None:
    from clipdedup.pipeline import RunOptions, run_dedup
    from clipdedup.trash.undo import undo

    img, outside = _symlink_tree(testdata, tmp_path)
    before = {p: (img / p).read_bytes() for p in ("real.jpg", "sub/copy.jpg", "other.jpg")}
    opts = RunOptions(model_id=tiny_model, threshold=1e-4, log=lambda line: None, follow_symlinks=True)
    s = run_dedup(str(img), str(tmp_path / "db"), str(tmp_path / "trash"), opts)  # returns: no hang
    (g,) = s.groups
    assert set(g.members) >= {"real.jpg", "link.jpg", "sub/copy.jpg", "outside_link/x.jpg"}
    # Kept: the newest file reached directly (not the newer one outside, not the link).
    assert g.kept == "sub/copy.jpg"
    moves = {m.rel: m for m in g.moved}
    assert (
        moves["outside_link/x.jpg"].dest is None
        and "outside the image dir" in moves["outside_link/x.jpg"].reason
    )
    assert moves["real.jpg"].dest is not None and moves["link.jpg"].dest is not None
    assert os.path.islink(moves["link.jpg"].dest)  # the link moved as a link
    assert (outside / "x.jpg").exists() and (img / "sub" / "copy.jpg").exists()
    res = undo(str(tmp_path / "trash"))
    assert {r.status for r in res} == {"restored"}
    assert {p: (img / p).read_bytes() for p in before} == before and os.path.islink(img / "link.jpg")


def test_follow_symlinks_cli_flag(tmp_path: Path, monkeypatch) -> None:
    from clipdedup import pipeline as dedup
    from clipdedup.cli import dedup_cmd, import_cmd, run_cli

    seen = []
    monkeypatch.setattr(
        dedup, "run_dedup", lambda i, d, t, opts: seen.append(opts.follow_symlinks) or dedup.RunSummary()
    )
    monkeypatch.setattr(
        dedup, "run_import", lambda *a: seen.append(a[-1].follow_symlinks) or dedup.RunSummary()
    )
    (tmp_path / "i").mkdir()
    base = ["-i", str(tmp_path / "i"), "-d", str(tmp_path / "d"), "-q", "-m", "builtin:x"]
    assert run_cli(dedup_cmd, "t", base) == 0
    assert run_cli(dedup_cmd, "t", base + ["--follow-symlinks"]) == 0
    imp = ["-bi", str(tmp_path / "i"), "-bd", str(tmp_path / "a"), "-ii", str(tmp_path / "i")]
    imp += ["-id", str(tmp_path / "b"), "-q", "--follow-symlinks", "-m", "builtin:x"]
    assert run_cli(import_cmd, "t", imp) == 0
    assert seen == [False, True, True]


def test_kept_file_gone_mid_run_leaves_the_whole_group(
    testdata: Path, tmp_path: Path, tiny_model: str, monkeypatch
) -> None:
    from clipdedup.pipeline import RunOptions, run_dedup
    from clipdedup.trash import chains as dedup  # where a dedup run chooses its kept files

    img, outside = _symlink_tree(testdata, tmp_path)
    write(img / "third.jpg", (img / "real.jpg").read_bytes())
    os.utime(img / "third.jpg", ns=(10**18, 10**18 - 10**9))  # older than sub/copy.jpg, which is kept
    real_choose = dedup.choose_keep_safe

    def choose_then_lose(image_dir, cands, strategy, dirs=None):
        best = real_choose(image_dir, cands, strategy, dirs)
        os.unlink(cands[best].path)  # the kept file vanishes right after the decision
        return best

    monkeypatch.setattr(dedup, "choose_keep_safe", choose_then_lose)
    before = {p.name: p.read_bytes() for p in (img / "real.jpg", img / "third.jpg")}
    opts = RunOptions(model_id=tiny_model, threshold=1e-4, log=lambda line: None)
    s = run_dedup(str(img), str(tmp_path / "db"), str(tmp_path / "trash"), opts)
    (g,) = s.groups
    assert g.kept == "sub/copy.jpg" and s.moved == []
    assert all("is gone" in m.reason for m in g.moved) and len(g.moved) == 2
    assert {n: (img / n).read_bytes() for n in before} == before  # the last copies stay


def test_skip_update_never_acts_on_a_stale_embedding(testdata: Path, tmp_path: Path, tiny_model: str) -> None:
    from clipdedup.pipeline import RunOptions, run_dedup

    img, db = tmp_path / "img", tmp_path / "db"
    src = (testdata / "base_images" / "ukbench00120.jpg").read_bytes()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        write(img / name, src)
    opts = RunOptions(model_id=tiny_model, threshold=1e-4, log=lambda line: None)
    run_dedup(str(img), str(db), None, opts)  # the DB now holds all three
    # b.jpg becomes another picture after it was encoded; the DB is not updated.
    write(img / "b.jpg", (testdata / "base_images" / "ukbench09380.jpg").read_bytes())
    st = (img / "b.jpg").stat()
    os.utime(img / "b.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    opts.skip_update = True
    s = run_dedup(str(img), str(db), str(tmp_path / "trash"), opts)
    assert [g.members for g in s.groups] == [["a.jpg", "c.jpg"]]
    assert s.updates["images"].failed == [
        (str(img / "b.jpg"), "changed since it was encoded; left out (--skip-update)")
    ]
    assert (img / "b.jpg").exists() and len(s.moved) == 1


def test_safe_members_equal_the_pairwise_definition(tmp_path: Path) -> None:
    """Files, links to them and to links, a symlinked dir, a loop and a dangling link: random groups
    get the same safe members from the one-pass version as from `depends_on` on every pair."""
    img = tmp_path / "img"
    for n in range(4):
        write(img / "a" / f"f{n}.jpg", bytes([n]))
    os.symlink("a", img / "b")
    os.symlink("f0.jpg", img / "a" / "l0.jpg")
    os.symlink(str(img / "a" / "l0.jpg"), img / "a" / "l00.jpg")
    os.symlink("../b/f1.jpg", img / "a" / "l1.jpg")
    os.symlink("loop_b", img / "loop_a")
    os.symlink("loop_a", img / "loop_b")
    os.symlink("gone.jpg", img / "dangling.jpg")
    rels = [str(p.relative_to(img)) for p in img.rglob("*") if p.is_symlink() or p.is_file()]
    rels += ["b/f0.jpg", "b/f1.jpg", "b/l0.jpg", "a/../a/f2.jpg"]
    rng = np.random.default_rng(0)
    for _ in range(200):
        pick = rng.choice(len(rels), int(rng.integers(1, 8)), replace=True)
        cands = [Candidate(rels[i], str(img / rels[i]), 1, 1) for i in pick]
        assert safe_members(cands) == safe_members_ref(cands), [c.rel for c in cands]


def test_keep_choice_with_the_run_s_dir_cache_equals_resolving_each_path(tmp_path: Path) -> None:
    """The real paths a run's groups share (`dirs`) give the keep choice that resolving every path
    in full gives, on random groups of files, links, symlinked dirs, a loop and a dangling link."""
    img = tmp_path / "img"
    for n in range(4):
        write(img / "a" / f"f{n}.jpg", bytes([n]) * (n + 1))
        write(img / "c" / "d" / f"g{n}.jpg", bytes([n]) * (4 - n))
    os.symlink("a", img / "b")
    os.symlink("c/d", img / "e")
    os.symlink("f0.jpg", img / "a" / "l0.jpg")
    os.symlink("../b/f1.jpg", img / "a" / "l1.jpg")
    os.symlink("loop_b", img / "loop_a")
    os.symlink("loop_a", img / "loop_b")
    os.symlink("gone.jpg", img / "dangling.jpg")
    rels = [str(p.relative_to(img)) for p in img.rglob("*") if p.is_symlink() or p.is_file()]
    rels += ["b/f0.jpg", "b/f1.jpg", "b/l0.jpg", "e/g2.jpg", "a/../a/f2.jpg"]
    rng = np.random.default_rng(1)
    dirs: dict[str, str] = {}
    for _ in range(300):
        pick = rng.choice(len(rels), int(rng.integers(1, 8)), replace=True)
        cands = [Candidate(rels[i], str(img / rels[i]), int(rng.integers(1, 4)), 1) for i in pick]
        for strategy in ("largest", "newest"):
            want = choose_keep_safe(str(img), cands, strategy)
            assert choose_keep_safe(str(img), cands, strategy, dirs) == want, [c.rel for c in cands]
    assert set(dirs) <= {str(img), *(os.path.dirname(str(img / r)) for r in rels)}

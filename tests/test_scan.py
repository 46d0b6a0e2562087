"""The native scanner against the Python reference walker and os.walk."""

from __future__ import annotations

import os
import pickle
import random
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from clipdedup import native
from clipdedup.records import FileEntry, ScanResult
from clipdedup.scan import IMAGE_EXTENSIONS, LOOP_REASON, scan_table, scan_tree, scan_tree_ref

NAMES = [
    "a.jpg",
    "B.JPG",
    "c.JpEg",
    "d.png",
    "e.txt",
    "f",
    ".jpg",  # no suffix for splitext: leading dots belong to the name
    "..jpg",
    ".hidden.png",
    "x.tar.PNG",
    "space name.webp",
    "new\nline.gif",
    "ünïcødé.jpg",
    "日本語.png",
    "trailing.",
    "a.jpg.npy",
]


def _tree(root: Path, rng: random.Random, n_files: int = 120) -> None:
    """Random nested dirs with awkward names; some empty dirs."""
    dirs = [root]
    for k in range(12):
        parent = rng.choice(dirs)
        d = parent / rng.choice([f"d{k}", f"dir {k}", f"ü{k}", f"x.jpg{k}"])
        d.mkdir(exist_ok=True)
        dirs.append(d)
    for k in range(n_files):
        d = rng.choice(dirs)
        name = rng.choice(NAMES)
        p = d / (f"{k}_{name}" if rng.random() < 0.7 else name)
        p.write_bytes(b"x" * rng.randrange(0, 50))
        os.utime(p, ns=(rng.randrange(10**18), rng.randrange(10**18)))


def _walk(root: Path, suffixes=IMAGE_EXTENSIONS) -> list[FileEntry]:
    """What os.walk + lstat sees: regular files only, symlinks not followed."""
    out = []
    for d, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(d, name)
            st = os.lstat(p)
            if not stat.S_ISREG(st.st_mode):
                continue
            if suffixes is not None and os.path.splitext(name)[1].lower() not in suffixes:
                continue
            out.append(FileEntry(os.path.relpath(p, root).replace(os.sep, "/"), st.st_mtime_ns, st.st_size))
    return sorted(out, key=lambda e: os.fsencode(e.rel))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_random_tree_matches_reference_and_os_walk(tmp_path: Path, seed: int, threads: int) -> None:
    _tree(tmp_path, random.Random(seed))
    got = scan_tree(tmp_path, threads=threads)
    ref = scan_tree_ref(tmp_path)
    assert got == ref
    # ctime is left out of FileEntry's equality; the DB's staleness test reads it (issue #25, item 7).
    assert [e.ctime_ns for e in got.entries] == [e.ctime_ns for e in ref.entries]
    assert [e.ctime_ns for e in got.entries] == [os.stat(tmp_path / e.rel).st_ctime_ns for e in got.entries]
    assert got.entries == _walk(tmp_path)
    assert got.errors == []
    assert len(got.entries) > 20  # the tree really had images


def test_all_files_and_custom_suffixes(tmp_path: Path) -> None:
    _tree(tmp_path, random.Random(5))
    for sfx in (None, frozenset({".txt"}), frozenset({".npy", ".JPG"}), frozenset()):
        got = scan_tree(tmp_path, suffixes=sfx, threads=2)
        assert got == scan_tree_ref(tmp_path, suffixes=sfx)
        assert got.entries == _walk(tmp_path, sfx)


def test_empty_tree_and_missing_root(tmp_path: Path) -> None:
    assert scan_tree(tmp_path) == ScanResult([], [])
    missing = tmp_path / "nope"
    got = scan_tree(missing)
    assert got == scan_tree_ref(missing)
    assert got.entries == []
    assert got.errors == [(str(missing), "cannot list directory: No such file or directory")]


def test_non_utf8_names_round_trip(tmp_path: Path) -> None:
    root = os.fsencode(tmp_path)
    os.mkdir(root + b"/d\xff\xfe")
    for name in (b"/d\xff\xfe/p\xe9.jpg", b"/\xc3(.png", b"/ok.jpg"):
        with open(root + name, "wb") as f:
            f.write(b"12")
    got = scan_tree(tmp_path, threads=2)
    assert got == scan_tree_ref(tmp_path)
    raw = sorted(os.fsencode(e.rel) for e in got.entries)
    assert raw == sorted([b"d\xff\xfe/p\xe9.jpg", b"\xc3(.png", b"ok.jpg"])
    assert [os.fsencode(e.rel) for e in got.entries] == raw  # sorted by bytes


def test_non_ascii_suffixes_follow_str_lower(tmp_path: Path) -> None:
    # The Kelvin sign lowercases to ASCII "k": the native side flags it and Python decides.
    for name in ("a.\u212a", "b.K", "c.JPÉ", "d.jpé", "e.jpe\u0301"):
        (tmp_path / name).write_bytes(b"")
    for sfx in (frozenset({".k"}), frozenset({".jpé"}), frozenset({".K"}), IMAGE_EXTENSIONS):
        assert scan_tree(tmp_path, suffixes=sfx) == scan_tree_ref(tmp_path, suffixes=sfx)
    assert [e.rel for e in scan_tree(tmp_path, suffixes=frozenset({".k"})).entries] == ["a.\u212a", "b.K"]


def _links(root: Path) -> Path:
    (root / "real").mkdir()
    (root / "real" / "r.jpg").write_bytes(b"abc")
    outside = Path(tempfile.mkdtemp(dir=root.parent))
    (outside / "o.png").write_bytes(b"12345")
    (root / "file_link.jpg").symlink_to(root / "real" / "r.jpg")
    (root / "dir_link").symlink_to(root / "real")
    (root / "out_link").symlink_to(outside)
    (root / "dangling.jpg").symlink_to(root / "nothing")
    (root / "real" / "loop").symlink_to(root)  # real/loop/real/loop/... never ends without a check
    (root / "self").symlink_to(".")
    return outside


@pytest.mark.parametrize("threads", [1, 4])
def test_symlinks_skipped_by_default(tmp_path: Path, threads: int) -> None:
    root = tmp_path / "root"
    root.mkdir()
    _links(root)
    got = scan_tree(root, threads=threads)
    assert got == scan_tree_ref(root)
    assert [e.rel for e in got.entries] == ["real/r.jpg"]
    assert got.entries == _walk(root)
    assert got.errors == []


@pytest.mark.parametrize("threads", [1, 4])
def test_follow_symlinks_lists_targets_and_stops_loops(tmp_path: Path, threads: int) -> None:
    root = tmp_path / "root"
    root.mkdir()
    _links(root)
    got = scan_tree(root, follow_symlinks=True, threads=threads)
    assert got == scan_tree_ref(root, follow_symlinks=True)
    rels = [e.rel for e in got.entries]
    assert rels == ["dir_link/r.jpg", "file_link.jpg", "out_link/o.png", "real/r.jpg"]
    assert got.entries[1].size == 3  # the target's size, not the link's
    assert (str(root / "dangling.jpg"), "cannot stat: No such file or directory") in got.errors
    loops = sorted(p for p, r in got.errors if r == LOOP_REASON)
    assert loops == [str(root / "dir_link" / "loop"), str(root / "real" / "loop"), str(root / "self")]


def test_exclude_skips_nested_dirs(tmp_path: Path) -> None:
    _tree(tmp_path, random.Random(3))
    (tmp_path / "trash" / "sub").mkdir(parents=True)
    (tmp_path / "trash" / "sub" / "t.jpg").write_bytes(b"")
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "t.jpg").write_bytes(b"")
    ex = [tmp_path / "trash", str(tmp_path / "db"), tmp_path / "missing"]
    got = scan_tree(tmp_path, exclude=ex, threads=2)
    assert got == scan_tree_ref(tmp_path, exclude=ex)
    assert not any(e.rel.startswith(("trash/", "db/")) for e in got.entries)
    assert any(e.rel.startswith("db/") for e in scan_tree(tmp_path).entries)


def test_scan_table_columns_match_stat(tmp_path: Path) -> None:
    _tree(tmp_path, random.Random(4), n_files=30)
    t = scan_table(tmp_path, suffixes=None)
    assert len(t.rels) == len(t.mtime_ns) == len(t.ctime_ns) == len(t.size) == len(t.ino) > 0
    for k, rel in enumerate(t.rels):
        st = os.lstat(tmp_path / rel)
        assert (t.mtime_ns[k], t.ctime_ns[k], t.size[k], t.ino[k]) == (
            st.st_mtime_ns,
            st.st_ctime_ns,
            st.st_size,
            st.st_ino,
        )


def test_construct_equals_calling_the_class() -> None:
    rng = random.Random(0)
    cols = [[f"r{i}" for i in range(1000)], [rng.randrange(10**19) for _ in range(1000)], list(range(1000))]
    got = native.construct(FileEntry, ["rel", "mtime_ns", "size"], cols)
    assert got == [FileEntry(*row) for row in zip(*cols)]
    assert hash(got[5]) == hash(FileEntry("r5", cols[1][5], 5))
    assert native.construct(FileEntry, ["rel", "mtime_ns", "size"], [[], [], []]) == []
    with pytest.raises(ValueError):
        native.construct(FileEntry, ["rel", "mtime_ns", "size"], [["a"], [1], []])


_NO_PRIVILEGE_DROP = 3  # the child's exit code when it could not become nobody: the only skip


def _scan_unprivileged(root: str) -> tuple[ScanResult, ScanResult]:
    """Both walkers run where a mode-000 directory really is unreadable.

    Root reads any directory whatever its mode, so as root the scans run in a forked child that
    has dropped to uid/gid 65534 (nobody); the child sends its results back through a pipe. Only a
    failure to drop privileges skips; anything the walkers raise fails the test.
    """
    if os.geteuid() != 0:
        return scan_tree(root, threads=2), scan_tree_ref(root)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 0
        try:
            os.close(r)
            try:
                os.setgid(65534)
                os.setuid(65534)
            except OSError as e:
                data, code = pickle.dumps(repr(e)), _NO_PRIVILEGE_DROP
            else:
                data = pickle.dumps((scan_tree(root, threads=2), scan_tree_ref(root)))
        except BaseException as e:  # reported to the parent, which fails the test
            data, code = pickle.dumps(repr(e)), 1
        with os.fdopen(w, "wb") as f:
            f.write(data)
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    result = pickle.loads(data)
    code = os.waitstatus_to_exitcode(status)
    if code == _NO_PRIVILEGE_DROP:
        pytest.skip(f"cannot drop root privileges here to make a directory unreadable: {result}")
    assert code == 0, f"the scan of a tree with an unreadable directory raised: {result}"
    return result


def test_unreadable_directory_is_reported_not_fatal() -> None:
    base = tempfile.mkdtemp(prefix="clipdedup-scan-")  # not under pytest's root-only tmp dir
    try:
        os.chmod(base, 0o755)
        for d in ("ok", "locked", "locked/inner"):
            os.mkdir(os.path.join(base, d))
        for f in ("ok/a.jpg", "locked/inner/b.jpg", "c.png"):
            Path(base, f).write_bytes(b"1")
        os.chmod(os.path.join(base, "locked"), 0)
        got, ref = _scan_unprivileged(base)
    finally:
        os.chmod(os.path.join(base, "locked"), 0o755)
        shutil.rmtree(base)
    assert got == ref
    assert [e.rel for e in got.entries] == ["c.png", "ok/a.jpg"]
    assert got.errors == [(os.path.join(base, "locked"), "cannot list directory: Permission denied")]


def test_sorted_by_bytes_equals_fsencode_order() -> None:
    from clipdedup.scan import sorted_by_bytes

    rng = random.Random(7)
    alphabet = ["a", "B", "/", ".", " ", "é", "\ue000", "\U0001f600", "\udcff", "\udc80", "z", "\x7f"]
    for with_escapes in (False, True):
        pool = alphabet if with_escapes else [c for c in alphabet if not 0xDC80 <= ord(c) <= 0xDCFF]
        names = ["".join(rng.choice(pool) for _ in range(rng.randrange(1, 6))) for _ in range(300)]
        assert sorted_by_bytes(names) == sorted(names, key=os.fsencode)

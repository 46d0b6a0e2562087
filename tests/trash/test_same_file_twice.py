"""One directory reached twice (a bind mount) must not lose a group's every copy (issue 25).

`realpath` cannot tell a bind-mounted dir from its source, so file identity is also compared by
directory entry ((st_dev, st_ino) of the directory, and the name), and each group's kept file must
still be the inode it was before each move of the group. The real bind mount needs root; the same
guarantee is also tested everywhere with a monkeypatched identity.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from clipdedup.pipeline import RunOptions, run_dedup, run_import
from clipdedup.records import FileEntry
from clipdedup.trash import move
from clipdedup.trash.move import Mover, depends_on, move_duplicate
from helpers import tree_hashes

IMAGES = ("ukbench00120.jpg", "ukbench01380.jpg")  # two different photographs


def entry_of(path: Path, rel: str) -> FileEntry:
    st = os.stat(path)
    return FileEntry(rel, st.st_mtime_ns, st.st_size)


def _photos(testdata: Path, d: Path) -> dict[str, str]:
    d.mkdir(parents=True)
    for name in IMAGES:
        shutil.copy2(testdata / "base_images" / name, d / name)
    return tree_hashes(d)


@contextmanager
def bind_mounted(src: Path, at: Path) -> Iterator[None]:
    at.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "--bind", str(src), str(at)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {r.stderr.decode(errors='replace').strip()[:200]}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(at)], capture_output=True)


def _dedup(top: Path, tmp_path: Path):
    opts = RunOptions(model_id="builtin:dct", log=lambda line: None)
    return run_dedup(str(top), str(tmp_path / "db"), str(tmp_path / "trash"), opts)


def test_bind_mounted_dir_keeps_every_file(testdata: Path, tmp_path: Path) -> None:
    top = tmp_path / "P"
    before = _photos(testdata, top / "photos")
    with bind_mounted(top / "photos", top / "mnt"):
        s = _dedup(top, tmp_path)
        assert len(s.groups) == 2  # each photo seen twice: photos/x and mnt/x
        assert tree_hashes(top / "photos") == before  # nothing moved, so both routes still hold it
        assert s.moved == [] and all("this very file" in (m.reason or "") for m in s.move_skipped)


def test_bind_mounted_import_dir_is_the_base_dir(testdata: Path, tmp_path: Path) -> None:
    from clipdedup.errors import UserError

    base = tmp_path / "base"
    _photos(testdata, base)
    with bind_mounted(base, tmp_path / "imp"):
        with pytest.raises(UserError, match="base and import image dirs must differ"):
            opts = RunOptions(model_id="builtin:dct", log=lambda line: None)
            run_import(
                str(base), str(tmp_path / "bdb"), str(tmp_path / "imp"), str(tmp_path / "idb"), None, opts
            )


def _seen_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes P/mnt/ and P/photos/ one directory as far as file identity goes, as a bind mount does."""
    real = move.entry_id

    def twice(path: str):
        return real(path.replace(f"{os.sep}mnt{os.sep}", f"{os.sep}photos{os.sep}"))

    # raising=False: where the function is missing (no identity check), the test fails on its asserts
    monkeypatch.setattr(move, "entry_id", twice, raising=False)


def test_dir_seen_twice_without_a_mount(testdata: Path, tmp_path: Path, monkeypatch) -> None:
    top = tmp_path / "P"
    before = _photos(testdata, top / "photos")
    shutil.copytree(top / "photos", top / "mnt")  # the same names; identity says: the same files
    _seen_twice(monkeypatch)
    assert depends_on(str(top / "mnt" / IMAGES[0]), str(top / "photos" / IMAGES[0]))
    s = _dedup(top, tmp_path)
    assert len(s.groups) == 2 and s.moved == []
    assert all("this very file" in (m.reason or "") for m in s.move_skipped)
    assert tree_hashes(top / "photos") == before and tree_hashes(top / "mnt") == before


def test_hard_links_in_two_dirs_are_separate_entries(tmp_path: Path) -> None:
    a, b = tmp_path / "img/a/x.jpg", tmp_path / "img/b/x.jpg"
    a.parent.mkdir(parents=True)
    b.parent.mkdir()
    a.write_bytes(b"data")
    os.link(a, b)
    assert not depends_on(str(a), str(b)) and not depends_on(str(b), str(a))
    r = move_duplicate(str(tmp_path / "img"), str(tmp_path / "t"), entry_of(b, "b/x.jpg"), str(a))
    assert r.dest is not None and a.read_bytes() == b"data"


def test_kept_file_replaced_mid_group_stops_the_group(tmp_path: Path) -> None:
    img = tmp_path / "img"
    img.mkdir()
    for name in ("k.bin", "x.bin", "y.bin"):
        (img / name).write_bytes(b"same bytes")
        os.utime(img / name, ns=(5, 5))
    kept, entry = str(img / "k.bin"), entry_of(img / "k.bin", "k.bin")
    mover = Mover(str(img), str(tmp_path / "trash"), dry_run=False, strategy="largest", mode="dedup")
    try:
        assert mover.move(entry_of(img / "x.bin", "x.bin"), kept, entry, 1).dest is not None
        # Another inode now stands at the kept name, with its size and mtime: only identity tells.
        (img / "k.new").write_bytes(b"same bytes")
        os.utime(img / "k.new", ns=(5, 5))
        os.replace(img / "k.new", img / "k.bin")
        r = mover.move(entry_of(img / "y.bin", "y.bin"), kept, entry, 1)
    finally:
        mover.close()
    assert r.dest is None and "was replaced since its group began moving" in (r.reason or "")
    assert (img / "y.bin").exists()

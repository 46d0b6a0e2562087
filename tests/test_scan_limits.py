"""--follow-symlinks under attack: a link to `/`, to /proc, /sys or /dev, or onto another file
system. The walk stays on the image dir's file system unless asked, never enters the system
directories, ends quickly, and shows it is alive while it runs. Native walker and reference agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from clipdedup.scan import OTHER_FS_REASON, SYSTEM_REASON, scan_tree, scan_tree_ref, system_devices
from helpers import mounted_tmpfs

WALK = (
    "import json, sys\n"
    "from clipdedup.scan import scan_tree\n"
    "r = scan_tree(sys.argv[1], follow_symlinks=True, cross_devices=sys.argv[2] == '1')\n"
    "print(json.dumps({'entries': [e.rel for e in r.entries], 'errors': r.errors}))\n"
)


def walk_in_a_process(root: Path, cross: bool, timeout: float = 60) -> dict:
    """The walk in a child process, so a walk that never ends fails the test instead of hanging it."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run(
        [sys.executable, "-c", WALK, str(root), "1" if cross else "0"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def test_a_link_to_root_stays_on_the_image_dirs_file_system(tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "img", "size=1m") as img:
        (img / "a.jpg").write_bytes(b"A")
        os.symlink("/", img / "root")
        out = walk_in_a_process(img, cross=False)
        assert out["entries"] == ["a.jpg"]
        assert out["errors"] == [[str(img / "root"), OTHER_FS_REASON]]
        ref = scan_tree_ref(img, follow_symlinks=True)
        assert [e.rel for e in ref.entries] == ["a.jpg"] and ref.errors == [
            (str(img / "root"), OTHER_FS_REASON)
        ]


@pytest.mark.parametrize("target", ["/proc", "/sys", "/dev"])
def test_system_directories_are_never_entered(tmp_path: Path, target: str) -> None:
    if os.stat(target).st_dev not in system_devices():
        pytest.skip(f"{target} is not a mount of its own here")
    img = tmp_path / "img"
    img.mkdir()
    (img / "a.jpg").write_bytes(b"A")
    os.symlink(target, img / "sys")
    out = walk_in_a_process(img, cross=True, timeout=30)  # even when crossing file systems is allowed
    assert out["entries"] == ["a.jpg"] and out["errors"] == [[str(img / "sys"), SYSTEM_REASON]]
    ref = scan_tree_ref(img, follow_symlinks=True, cross_devices=True)
    assert ref.errors == [(str(img / "sys"), SYSTEM_REASON)]


def test_another_file_system_only_when_asked(tmp_path: Path) -> None:
    img = tmp_path / "img"
    (img / "sub").mkdir(parents=True)
    (img / "sub" / "a.jpg").write_bytes(b"A")
    with mounted_tmpfs(tmp_path / "other", "size=1m") as other:
        (other / "deep").mkdir()
        (other / "deep" / "b.jpg").write_bytes(b"B")
        os.symlink(other, img / "sub" / "link")
        for cross, want, errors in (
            (False, ["sub/a.jpg"], [(str(img / "sub" / "link"), OTHER_FS_REASON)]),
            (True, ["sub/a.jpg", "sub/link/deep/b.jpg"], []),
        ):
            got = scan_tree(img, follow_symlinks=True, cross_devices=cross)
            ref = scan_tree_ref(img, follow_symlinks=True, cross_devices=cross)
            assert [e.rel for e in got.entries] == want and got.errors == errors
            assert got == ref
        # A mount point that is a plain directory of the tree (no link on the way) is entered.
        os.unlink(img / "sub" / "link")
        with mounted_tmpfs(img / "mnt", "size=1m") as mnt:
            (mnt / "c.jpg").write_bytes(b"C")
            got = scan_tree(img, follow_symlinks=True)
            assert [e.rel for e in got.entries] == ["mnt/c.jpg", "sub/a.jpg"] and got == scan_tree_ref(
                img, follow_symlinks=True
            )


def test_the_walk_reports_progress_while_it_runs(tmp_path: Path) -> None:
    img = tmp_path / "img"
    for d in range(300):
        sub = img / f"d{d}"
        sub.mkdir(parents=True)
        for k in range(20):
            (sub / f"{k}.jpg").write_bytes(b"")
    seen: list[int] = []
    res = scan_tree(img, threads=1, progress=seen.append)
    assert len(res.entries) == 6000
    assert seen == sorted(seen) and seen[-1] == 6000 + 300  # every file and every directory


def test_progress_is_reported_during_the_walk_not_only_after() -> None:
    from clipdedup.scan import _with_progress

    counter = np.zeros(1, np.int64)
    calls: list[int] = []
    release = threading.Event()

    def walk() -> str:
        counter[0] = 5
        assert release.wait(10)  # the walk only ends once progress was seen while it ran
        counter[0] = 9
        return "done"

    def progress(n: int) -> None:
        calls.append(n)
        if len(calls) >= 3:
            release.set()

    assert _with_progress(walk, counter, progress, 0.01) == "done"
    assert calls[:3] == [5, 5, 5] and calls[-1] == 9

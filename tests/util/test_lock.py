"""Locks: one run per DB dir and per trash dir; a lock left by a killed run is taken over."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from clipdedup.errors import UserError
from clipdedup.pipeline import RunOptions, run_dedup, run_import
from clipdedup.util import lock as lockmod
from clipdedup.util.lock import DB_LOCK_NAME, DirLock, db_lock

HOLD = (
    "import sys, time\n"
    "from clipdedup.util.lock import DirLock\n"
    "DirLock(sys.argv[1], 'test').acquire()\n"
    "print('locked', flush=True)\n"
    "time.sleep(120)\n"
)


def holder(path: Path) -> subprocess.Popen:
    """A separate process that takes the lock at `path` and keeps it until killed."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "locked"
    return p


def test_lock_excludes_a_second_holder_and_releases(tmp_path: Path) -> None:
    path = tmp_path / "db" / DB_LOCK_NAME
    lines: list[str] = []
    with DirLock(str(path), "DB dir db", lines.append):
        info = json.loads(path.read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        with pytest.raises(UserError, match=f"in use by another run \\(pid {os.getpid()} on"):
            DirLock(str(path), "DB dir db").acquire()
    assert path.read_text() == ""  # a clean release leaves an empty file: not stale
    with DirLock(str(path), "DB dir db", lines.append):
        pass
    assert lines == []


def test_lock_held_by_another_live_process(tmp_path: Path) -> None:
    path = tmp_path / DB_LOCK_NAME
    p = holder(path)
    try:
        with pytest.raises(UserError) as e:
            DirLock(str(path), "DB dir x").acquire()
        msg = str(e.value)
        assert f"pid {p.pid} on {socket.gethostname()}" in msg and "\n" not in msg
    finally:
        p.kill()
        p.wait()


def test_stale_lock_of_a_killed_run_is_taken_over(tmp_path: Path) -> None:
    path = tmp_path / DB_LOCK_NAME
    p = holder(path)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert json.loads(path.read_text())["pid"] == p.pid  # the dead run's record is still there
    lines: list[str] = []
    with DirLock(str(path), "DB dir x", lines.append):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert len(lines) == 1 and "taking over a stale lock" in lines[0] and f"pid {p.pid}" in lines[0]


def test_without_flock_the_pid_decides(tmp_path: Path, monkeypatch) -> None:
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lockmod.fcntl, "flock", no_flock)
    path = tmp_path / DB_LOCK_NAME
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        path.write_text(json.dumps({"pid": p.pid, "host": socket.gethostname()}))
        with pytest.raises(UserError, match="if that run is gone, remove this file"):
            DirLock(str(path), "x").acquire()
    finally:
        p.kill()
        p.wait()
    lines: list[str] = []
    with DirLock(str(path), "x", lines.append):  # that pid is dead now
        pass
    assert "taking over a stale lock" in lines[0]
    path.write_text(json.dumps({"pid": 1, "host": "some-other-host"}))
    with pytest.raises(UserError):  # another host's pid cannot be checked: refuse
        DirLock(str(path), "x").acquire()


def test_a_child_spawned_while_locked_does_not_hold_the_lock(tmp_path: Path) -> None:
    """A process a run starts (a decoder, a browser) must not keep the run's lock after the run
    is gone. The child is spawned with close_fds=False, so only the descriptor's close-on-exec
    flag keeps it out; the run then vanishes without unlocking (its descriptor closed as a kill
    would close it), and a new run must get the lock while the child still lives."""
    path = tmp_path / DB_LOCK_NAME
    lk = DirLock(str(path), "x").acquire()
    assert lk._fd is not None
    code = "import time; print('running', flush=True); time.sleep(120)"
    child = subprocess.Popen([sys.executable, "-c", code], close_fds=False, stdout=subprocess.PIPE, text=True)
    try:
        # Popen may return before the kernel has closed the child's close-on-exec descriptors
        # (the vfork parent wakes early in execve): wait until the new program runs.
        assert child.stdout is not None and child.stdout.readline().strip() == "running"
        os.close(lk._fd)  # the holder dies: no LOCK_UN, no truncate
        lk._fd = None
        lines: list[str] = []
        with DirLock(str(path), "x", lines.append):  # raises "in use" if the child kept the lock
            assert child.poll() is None
        assert len(lines) == 1 and "taking over a stale lock" in lines[0]
    finally:
        child.kill()
        child.wait()


def _opts(**kw) -> RunOptions:
    # Empty image dirs and no model: these runs only take and release locks.
    return RunOptions(model_id="unused", skip_update=True, log=lambda line: None, **kw)


def test_a_second_run_on_the_same_db_is_refused(tmp_path: Path) -> None:
    img, db = tmp_path / "img", tmp_path / "db"
    img.mkdir()
    p = holder(db / DB_LOCK_NAME)
    try:
        with pytest.raises(UserError, match="in use by another run"):
            run_dedup(str(img), str(db), None, _opts())
        # A dry run writes nothing, so it takes no lock and may run beside another run.
        s = run_dedup(str(img), str(db), None, _opts(dry_run=True))
        assert s.groups == []
    finally:
        p.kill()
        p.wait()


def test_a_second_run_on_the_same_trash_is_refused(tmp_path: Path) -> None:
    img, trash = tmp_path / "img", tmp_path / "trash"
    img.mkdir()
    with lockmod.trash_lock(str(trash)):
        with pytest.raises(UserError, match="trash dir"):
            run_dedup(str(img), str(tmp_path / "db"), str(trash), _opts())


def test_import_locks_the_import_db_and_not_the_base_db(tmp_path: Path) -> None:
    base, imp, bdb, idb = (tmp_path / n for n in ("base", "imp", "bdb", "idb"))
    base.mkdir()
    imp.mkdir()
    bdb.mkdir()
    with db_lock(str(bdb)):  # another run busy on the base DB does not stop an import
        run_import(str(base), str(bdb), str(imp), str(idb), None, _opts())
    assert sorted(os.listdir(bdb)) == [DB_LOCK_NAME]  # only the lock this test took
    with db_lock(str(idb)):
        with pytest.raises(UserError, match="in use by another run"):
            run_import(str(base), str(bdb), str(imp), str(idb), None, _opts())


def test_db_lock_file_name_is_the_released_one() -> None:
    """Two versions of the tool on one DB must exclude each other: the name is part of the format."""
    assert lockmod.DB_LOCK_NAME == ".clipdedup.lock"


STARTING = (
    "import fcntl, json, os, sys, time\n"
    "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
    "fcntl.flock(fd, fcntl.LOCK_EX)\n"
    "print('locked', flush=True)\n"
    "time.sleep(0.3)\n"  # a run that has the lock but has not written its note yet
    "os.pwrite(fd, json.dumps({'pid': os.getpid(), 'host': 'h'}).encode(), 0)\n"
    "time.sleep(120)\n"
)


def test_a_run_that_is_just_starting_is_named_not_pid_question_mark(tmp_path: Path) -> None:
    path = tmp_path / DB_LOCK_NAME
    p = subprocess.Popen([sys.executable, "-c", STARTING, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "locked"
        with pytest.raises(UserError) as e:
            DirLock(str(path), "DB dir x").acquire()
        assert f"pid {p.pid} on h" in str(e.value) and "?" not in str(e.value)
    finally:
        p.kill()
        p.wait()


def test_the_lock_is_taken_on_a_full_disk(tmp_path: Path) -> None:
    from helpers import fill_up, mounted_tmpfs

    with mounted_tmpfs(tmp_path / "m", "size=64k") as mnt:
        path = mnt / "lock"
        path.touch()
        fill_up(mnt)
        with DirLock(str(path), "trash dir m"):
            with pytest.raises(UserError, match="in use by another run"):
                DirLock(str(path), "trash dir m").acquire()

"""Import mode only reads the base image dir and the base DB, even when the base DB is stale.

Tests run as root, and root writes through any file mode, so read-only-ness is proved two ways: a
full snapshot (every path, mode, size, mtime and content hash, directories included) before and
after a plain run must be equal; and where this machine allows it, a CLI run is made with both
trees bind-mounted read-only, so that a write the run depended on would fail it with EROFS.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from clipdedup.cli import dedup_cmd, import_cmd, run_cli
from clipdedup.errors import UserError
from clipdedup.pipeline import RunOptions, run_import


def snapshot(root: Path) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in ["."] + dirnames + filenames:
            p = os.path.normpath(os.path.join(dirpath, name))
            st = os.lstat(p)
            digest = hashlib.sha256(Path(p).read_bytes()).hexdigest() if os.path.isfile(p) else ""
            # the inode too: a file rewritten atomically with the same bytes and mtime is a write
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino, digest)
    return out


@contextlib.contextmanager
def read_only(*dirs: Path) -> Iterator[bool]:
    """Bind-mounts each dir read-only onto itself while the block runs; yields whether it could."""
    done: list[Path] = []
    try:
        for d in dirs:
            r = subprocess.run(["mount", "--bind", str(d), str(d)], capture_output=True)
            if r.returncode != 0:
                break
            done.append(d)
            r = subprocess.run(["mount", "-o", "remount,bind,ro", str(d)], capture_output=True)
            if r.returncode != 0:
                break
        ok = len(done) == len(dirs) and all(not os.access(d, os.W_OK) or _probe_ro(d) for d in dirs)
        yield ok
    finally:
        for d in reversed(done):
            subprocess.run(["umount", str(d)], capture_output=True)


def _probe_ro(d: Path) -> bool:
    try:
        (d / ".probe").write_bytes(b"")
    except OSError:
        return True
    (d / ".probe").unlink()
    return False


@pytest.fixture
def stale_base(testdata: Path, tmp_path: Path, tiny_model: str, capsys) -> tuple[Path, Path, Path]:
    """A base dir with a base DB that lacks one image, holds a stale entry and an orphan; an import dir."""
    base, bdb, imp = tmp_path / "base", tmp_path / "bdb", tmp_path / "import"
    shutil.copytree(testdata / "base_images", base)
    for p in base.iterdir():
        os.chmod(p, 0o644)
    assert run_cli(dedup_cmd, "t", ["-i", str(base), "-d", str(bdb), "-m", tiny_model, "-q"]) == 0
    # Made stale after the fact: a new base image, a touched one, and a removed one.
    shutil.copyfile(testdata / "formats_images" / "baboon.pgm", base / "new_in_base.pgm")
    st = os.stat(base / "ukbench01380.jpg")
    os.utime(base / "ukbench01380.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    os.unlink(base / "ukbench08976.jpg")
    imp.mkdir()
    for name in ("ukbench00120.jpg", "ukbench01380.jpg", "ukbench09040.jpg"):
        shutil.copyfile(base / name, imp / f"copy_{name}")
    shutil.copyfile(base / "new_in_base.pgm", imp / "copy_new.pgm")  # only an in-memory match
    shutil.copyfile(testdata / "formats_images" / "marbles.pbm", imp / "unique.pbm")
    capsys.readouterr()
    return base, bdb, imp


@pytest.mark.parametrize("state", ["stale", "cache-gone"])
def test_import_never_writes_the_base_dir_or_base_db(
    stale_base, tmp_path: Path, tiny_model: str, state: str
) -> None:
    """`stale`: base images missing from the base DB or newer are encoded in memory only.
    `cache-gone`: the base DB is up to date but its packed snapshot is gone, so a load that was
    free to write would write one there (a refresh that changes no vector, only files)."""
    base, bdb, imp = stale_base
    if state == "cache-gone":
        assert run_cli(dedup_cmd, "t", ["-i", str(base), "-d", str(bdb), "-m", tiny_model, "-q"]) == 0
        for p in bdb.iterdir():
            if p.is_file() and not p.name.endswith((".npy", ".json", ".lock")):
                p.unlink()
    before = snapshot(base), snapshot(bdb)
    lines: list[str] = []
    opts = RunOptions(model_id=tiny_model, threshold=1e-4, log=lines.append)
    # Plain snapshots, no read-only mount: a mount would turn a write that the code tolerates
    # failing (a cache refresh) into no change at all. The CLI test below uses the mount.
    s = run_import(str(base), str(bdb), str(imp), str(tmp_path / "idb"), str(tmp_path / "trash"), opts)
    assert (snapshot(base), snapshot(bdb)) == before
    moved = sorted(m.rel for m in s.moved)
    copies = ["copy_ukbench00120.jpg", "copy_ukbench01380.jpg", "copy_ukbench09040.jpg"]
    assert moved == ["copy_new.pgm"] + copies
    assert sorted(os.listdir(imp)) == ["unique.pbm"]
    assert s.updates["base"].removed == []  # the orphan stays in the base DB
    assert (tmp_path / "idb" / ".clipdedup.lock").exists()  # the import DB is the one locked
    if state == "cache-gone":
        assert s.updates["base"].encoded == 0
        return
    assert s.updates["base"].encoded == 2 and len(s.updates["base"].in_memory) == 2  # new + touched
    assert any("encoded in memory only" in line for line in lines)


def test_import_cli_on_read_only_mounts(stale_base, tmp_path: Path, tiny_model: str, capsys) -> None:
    base, bdb, imp = stale_base
    before = snapshot(base), snapshot(bdb)
    args = ["-bi", str(base), "-bd", str(bdb), "-ii", str(imp), "-id", str(tmp_path / "idb")]
    args += ["-t", str(tmp_path / "trash"), "-m", tiny_model, "-th", "1e-4", "-q"]
    with read_only(base, bdb) as mounted:
        if not mounted:
            pytest.skip("cannot bind-mount read-only here (snapshot test above still runs)")
        assert run_cli(import_cmd, "t", args) == 0, capsys.readouterr().err
    assert (snapshot(base), snapshot(bdb)) == before
    assert len(os.listdir(imp)) == 1


@pytest.mark.parametrize(
    "layout, match",
    [
        ("trash-in-base", "trash dir must not be inside the base image dir"),
        ("trash-in-bdb", "trash dir must not be inside the base DB dir"),
        ("idb-in-base", "import DB dir must not be inside the base image dir"),
        ("idb-in-bdb", "import DB dir must not be inside the base DB dir"),
        ("same-db", "base and import DB dirs must differ"),
        ("import-in-bdb", "import image dir must not be inside the base DB dir"),
    ],
)
def test_layouts_that_would_write_into_the_base_are_refused(tmp_path: Path, layout: str, match: str) -> None:
    base, bdb = tmp_path / "base", tmp_path / "bdb"
    imp, idb, trash = tmp_path / "import", tmp_path / "idb", tmp_path / "trash"
    if layout == "trash-in-base":
        trash = base / "trash"
    elif layout == "trash-in-bdb":
        trash = bdb / "trash"
    elif layout == "idb-in-base":
        idb = base / "idb"
    elif layout == "idb-in-bdb":
        idb = bdb / "idb"
    elif layout == "same-db":
        idb = bdb
    elif layout == "import-in-bdb":
        imp = bdb / "import"
    for d in (base, bdb, imp):
        d.mkdir(parents=True, exist_ok=True)
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match=match):
        run_import(str(base), str(bdb), str(imp), str(idb), str(trash), RunOptions(model_id="unused"))
    assert snapshot(tmp_path) == before


def test_up_to_date_base_db_is_not_written_either(testdata: Path, tmp_path: Path, tiny_model: str) -> None:
    # With nothing to encode in memory, a DB load would be free to refresh caches (e.g. a packed
    # snapshot) in the DB dir: never in the base DB.
    base, bdb, imp = tmp_path / "base", tmp_path / "bdb", tmp_path / "import"
    shutil.copytree(testdata / "base_images", base)
    imp.mkdir()
    shutil.copyfile(base / "ukbench00120.jpg", imp / "copy.jpg")
    assert run_cli(dedup_cmd, "t", ["-i", str(base), "-d", str(bdb), "-m", tiny_model, "-q"]) == 0
    for p in bdb.iterdir():  # leave only what a DB must hold, so a cache written later shows
        if p.is_file() and not p.name.endswith((".npy", ".json", ".lock")):
            p.unlink()
    before = snapshot(base), snapshot(bdb)
    opts = RunOptions(model_id=tiny_model, threshold=1e-4, log=lambda line: None)
    # No read-only mount here: it would turn such a write into a silent failure, not a change.
    s = run_import(str(base), str(bdb), str(imp), str(tmp_path / "idb"), str(tmp_path / "trash"), opts)
    assert (snapshot(base), snapshot(bdb)) == before
    assert [m.rel for m in s.moved] == ["copy.jpg"] and s.updates["base"].encoded == 0


def test_builtin_dct_import_reads_row_stores_and_never_writes_the_base(
    testdata: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Screen-then-verify in import mode keeps only the screening parts in RAM (no whole matrix of
    either DB is built), finds the planted copies (one only in memory: a stale base entry), and
    leaves the base dir and base DB as they were."""
    from clipdedup.db.rowstore import RowStore
    from clipdedup.ingest.update import update_db

    base, bdb, imp = tmp_path / "base", tmp_path / "bdb", tmp_path / "import"
    shutil.copytree(testdata / "base_images", base)
    update_db(base, bdb, "builtin:dct", log=lambda line: None)
    st = os.stat(base / "ukbench01380.jpg")
    os.utime(base / "ukbench01380.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # stale entry
    imp.mkdir()
    for name in ("ukbench00120.jpg", "ukbench01380.jpg"):
        shutil.copyfile(base / name, imp / f"copy_{name}")
    shutil.copyfile(testdata / "formats_images" / "marbles.pbm", imp / "unique.pbm")
    before = snapshot(base), snapshot(bdb)
    whole = RowStore.to_matrix

    def no_matrix(self, dims=None):
        if dims is None or dims >= self.dim:
            raise AssertionError("a builtin:dct import built a whole matrix")
        return whole(self, dims)

    def no_load(*a, **kw):
        raise AssertionError("a builtin:dct import loaded a DB as a matrix")

    from clipdedup import pipeline

    monkeypatch.setattr(RowStore, "to_matrix", no_matrix)
    monkeypatch.setattr(pipeline, "load_embeddings", no_load)
    opts = RunOptions(model_id="builtin:dct", log=lambda line: None)
    s = run_import(str(base), str(bdb), str(imp), str(tmp_path / "idb"), str(tmp_path / "trash"), opts)
    monkeypatch.undo()
    assert (snapshot(base), snapshot(bdb)) == before
    assert sorted(m.rel for m in s.moved) == ["copy_ukbench00120.jpg", "copy_ukbench01380.jpg"]
    assert sorted(os.listdir(imp)) == ["unique.pbm"]
    assert s.verification is not None and all(c.b.startswith("base:") for c in s.verification.candidates)

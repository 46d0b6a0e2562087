"""Loading a DB's embeddings into one float32 matrix: native reader, packed snapshot, legacy .npz.

`load_db` / `load_files` go through the snapshot (snapshot.py) and read only what changed from the
`.npy` mirror; `load_rows` reads the files alone. The matrix comes from `native.alloc_rows` (pinned
when CUDA is present), or, on an unchanged DB without CUDA, is the snapshot itself mapped
copy-on-write; it is never copied again: failed rows are squeezed out in place.

A mapped snapshot is only ever replaced by a rename, never rewritten in place, so the mapping stays
valid for the whole run even when a new snapshot is written; a file truncated in place by some other
program while mapped would make reading it fail (SIGBUS), as with any mapped file.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from operator import attrgetter

import numpy as np

from clipdedup import native
from clipdedup.db import snapshot as snap_mod
from clipdedup.db.layout import (
    NOT_FINITE,
    NPY_SUFFIX,
    NPZ_KEY,
    NPZ_SUFFIX,
    DBFile,
    index_db,
    read_meta,
    usable_rows,
)
from clipdedup.errors import UserError
from clipdedup.records import LoadInfo, SnapshotState, SnapshotStatus
from clipdedup.scan import sorted_by_bytes


def read_legacy_ref(path: str) -> np.ndarray:
    """One original-tool .npz embedding, read with np.load (the reference of the native reader)."""
    with np.load(path, allow_pickle=False) as z:
        if NPZ_KEY not in z:
            raise ValueError(f"no key {NPZ_KEY!r}")
        return np.asarray(z[NPZ_KEY], dtype=np.float32).reshape(-1)


class SnapshotPrefetch:
    """Reads a DB's whole snapshot on a thread while the caller stats the DB.

    It bets that no embedding was added or removed since the snapshot was written, the usual case
    on a re-run: then the rows are in place when `load_files` needs them, and the snapshot read
    overlaps the DB scan instead of following it. The rows are used only when the wanted keys are
    the snapshot's, in order; otherwise they are dropped before `load_files` allocates its own
    buffer, so memory never holds two matrices. Rows still go through every check of a load.

    Without pinned memory the snapshot is mapped copy-on-write (np.memmap mode "c") rather than
    copied: its rows are the page cache's, so there is no fresh buffer to zero and fill, and a
    row that must be re-read from its .npy gets a private page. With pinned memory (CUDA) the
    rows are copied into the pinned buffer, which the GPU reads directly.
    """

    def __init__(self, db_dir: str | os.PathLike[str], dim: int | None, pinned: bool | None) -> None:
        self.snap, self.status = snap_mod.read_snapshot(db_dir)
        if self.snap is not None and dim is not None and self.snap.dim != dim:
            self.status = SnapshotStatus(SnapshotState.OTHER_DIM, f"dim {self.snap.dim}, DB holds dim {dim}")
            self.snap = None
        self.pinned = native.cuda_present() if pinned is None else pinned
        self.mat: np.ndarray | None = None
        self.fatal: str | None = None
        self.bad: list[int] = []
        self._thread = None
        if self.snap is not None and self.snap.keys:
            self._thread = threading.Thread(target=self._read, name="clipdedup-snapshot", daemon=False)
            self._thread.start()

    def _read(self) -> None:
        snap = self.snap
        assert snap is not None
        n = len(snap.keys)
        try:
            if self.pinned:
                mat = native.alloc_rows(n, snap.dim, pinned=True)
                idx = np.arange(n, dtype=np.int64)
                self.fatal, self.bad = native.gather_rows(
                    snap.path, snap_mod.DATA_OFFSET, idx, idx, snap.hashes, mat
                )
            else:
                mm = np.memmap(snap.path, np.float32, "c", snap_mod.DATA_OFFSET, (n, snap.dim))
                mat = mm.view(np.ndarray)  # keeps the mapping alive through its base
                hashes = native.row_hashes(mat, os.cpu_count() or 1)
                self.bad = np.flatnonzero(hashes != snap.hashes).tolist()
            self.mat = mat
        except Exception as e:  # reported as an unreadable snapshot, never raised from a thread
            self.fatal = f"{type(e).__name__}: {e}"

    def take(self, keys: list[str]) -> np.ndarray | None:
        """The rows, when `keys` are the snapshot's; else None (and the rows are dropped)."""
        if self._thread is not None:
            self._thread.join()
        mat, self.mat = self.mat, None
        if mat is None or self.snap is None or keys != self.snap.keys:
            return None
        return mat


def load_rows(
    files: Sequence[DBFile], dim: int | None = None, threads: int | None = None
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Loads the embeddings of `files` into one (N, D) float32 matrix, from the files alone.

    Returns:
        (matrix, ok, errors): matrix (N, D) float32, zero in a row that failed; ok (N,) bool;
        errors as (path, reason). D is `dim`, else taken from the first readable file.
    """
    r = _fill(files, dim, None, threads, False)
    _drop_nonfinite(r.mat, r.ok, files, r.errors)
    r.mat[~r.ok] = 0
    return r.mat, r.ok, r.errors


def load_files(
    db_dir: str | os.PathLike[str],
    files: Sequence[DBFile],
    dim: int | None = None,
    *,
    started_ns: int | None = None,
    use_snapshot: bool = True,
    write_snapshot: bool = True,
    threads: int | None = None,
    pinned: bool | None = None,
    info: LoadInfo | None = None,
    prefetch: SnapshotPrefetch | None = None,
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Loads the embeddings of `files` (from `index_db(db_dir)`) via the DB's packed snapshot.

    Rows of unchanged files come from the snapshot, the rest from their files (see snapshot.py).
    Afterwards, when anything was read from the files or the snapshot was missing, stale or
    damaged, a new snapshot of the readable rows is written (never when `write_snapshot` is false,
    as in a dry run) on a thread, so the load returns without waiting for it (`info.writer`;
    `info.written` waits); failing to write it is noted in `info`, not raised.

    Args:
        db_dir: the DB root.
        files: N DB files, in the row order wanted.
        dim: D; default the snapshot's, else the first readable file's.
        started_ns: the index's `started_ns`; without it no snapshot is written.
        threads: reader threads.
        pinned: see `native.alloc_rows` (None: pinned when CUDA is present).
        info: filled with what happened.
        prefetch: a `SnapshotPrefetch` of `db_dir` started before `index_db`.

    Returns:
        (matrix, ok, errors): matrix float32 (K, D), C-contiguous and writable, of the readable
        rows in file order (a view of the buffer from `native.alloc_rows`, or of the mapped
        snapshot); ok (N,) bool; errors as (path, reason).
    """
    keys, stats = file_keys(files), file_stats(files)
    snap_dir, prefetch = (db_dir, prefetch) if use_snapshot else (None, None)
    r = _fill(files, dim, snap_dir, threads, pinned, keys, stats, prefetch)
    _drop_nonfinite(r.mat, r.ok, files, r.errors)
    if info is not None:
        info.snapshot, info.snapshot_detail = r.snapshot
        info.from_snapshot = int(r.from_snap.sum())
        info.from_files = len(files) - info.from_snapshot
    k = _compact(r.mat, r.ok)
    mat = r.mat[:k]
    if not (write_snapshot and started_ns is not None and k and os.path.isdir(db_dir)):
        return mat, r.ok, r.errors
    # Rewrite only for news: rows read from files that the new snapshot can vouch for, stale or
    # unused rows in the old one, or no usable old one.
    fresh = r.ok & ~r.from_snap
    news = bool(np.any(stats["ctime_ns"][fresh] <= started_ns - snap_mod.RACY_NS))
    if r.snapshot.state is SnapshotState.USED and not news and not r.stale:
        return mat, r.ok, r.errors
    keys = [key for key, good in zip(keys, r.ok.tolist()) if good]
    stats = {name: col[r.ok] for name, col in stats.items()}
    # The checksums are taken now, before the caller can touch the matrix: a row changed while the
    # thread writes it fails its checksum at the next load and is read from its file instead.
    hashes = native.row_hashes(mat, os.cpu_count() or 1)
    writer = snap_mod.start_write(
        db_dir, lambda: _write_snapshot(db_dir, keys, stats, mat, hashes, started_ns, info)
    )
    if info is not None:
        info.writer = writer
    return mat, r.ok, r.errors


def _write_snapshot(db_dir, keys, stats, mat, hashes, started_ns, info: LoadInfo | None) -> None:
    """`snapshot.write_snapshot` on the writer thread; a failure becomes `info.write_error`."""
    try:
        snap_mod.write_snapshot(db_dir, keys, stats, mat, hashes, started_ns)
        if info is not None:
            info.done_writing(True, "")
    except OSError as e:
        if info is not None:
            info.done_writing(False, f"{snap_mod.snapshot_path(db_dir)}: not written: {e.strerror or e}")


@dataclass
class _Filled:
    mat: np.ndarray  # (N, D), rows not ok are garbage
    ok: np.ndarray  # (N,) bool
    errors: list[tuple[str, str]]
    from_snap: np.ndarray  # (N,) bool: row came from the snapshot
    snapshot: SnapshotStatus
    stale: int  # snapshot rows not reused (changed, gone, unwanted, damaged)


def file_keys(files: Sequence[DBFile]) -> list[str]:
    return [f.rel + (NPZ_SUFFIX if f.legacy else NPY_SUFFIX) for f in files]  # DBFile.key, inlined


def file_stats(files: Sequence[DBFile]) -> dict[str, np.ndarray]:
    n = len(files)
    return {
        name: np.fromiter(map(attrgetter(name), files), np.uint64 if name == "ino" else np.int64, n)
        for name in snap_mod.STAT_FIELDS
    }


def _fill(files, dim, db_dir, threads, pinned, keys=None, stats=None, prefetch=None) -> _Filled:
    n = len(files)
    mat = None
    if prefetch is not None:
        snap, status = prefetch.snap, prefetch.status
        mat = prefetch.take(keys)
    else:
        snap, status = (
            (None, SnapshotStatus(SnapshotState.NOT_USED))
            if db_dir is None
            else snap_mod.read_snapshot(db_dir)
        )
    if snap is not None and dim is not None and snap.dim != dim:
        status = SnapshotStatus(SnapshotState.OTHER_DIM, f"dim {snap.dim}, DB holds dim {dim}")
        snap, mat = None, None
    if dim is None:
        dim = snap.dim if snap is not None else probe_dim(files)
    if dim is None:
        errors = [(f.path, "unreadable embedding") for f in files]
        return _Filled(np.zeros((n, 0), np.float32), np.zeros(n, bool), errors, np.zeros(n, bool), status, 0)
    from_snap = np.zeros(n, bool)
    stale = 0
    if mat is not None:  # prefetched: every row read already, in place (keys are the snapshot's)
        src, dst, stale = snap_mod.reusable_rows(snap, keys, stats)
        fatal = prefetch.fatal
        bad = np.flatnonzero(np.isin(dst, prefetch.bad)).tolist()
    elif snap is not None and n:
        mat = native.alloc_rows(n, dim, pinned=pinned)
        src, dst, stale = snap_mod.reusable_rows(snap, keys, stats)
        fatal, bad = native.gather_rows(
            snap.path, snap_mod.DATA_OFFSET, src, dst, snap.hashes[src], mat, threads
        )
    else:
        mat = native.alloc_rows(n, dim, pinned=pinned)
    if snap is not None and n:
        if fatal is not None:
            status, stale = SnapshotStatus(SnapshotState.UNREADABLE, str(fatal)), len(snap.keys)
        else:
            from_snap[dst] = True
            from_snap[dst[bad]] = False
            stale += len(bad)
    ok, errors = read_from_files(files, np.flatnonzero(~from_snap), mat, threads)
    return _Filled(mat, ok, errors, from_snap, status, stale)


def read_from_files(files, rows: np.ndarray, mat: np.ndarray, threads) -> tuple[np.ndarray, list]:
    """Reads files[i] into mat[i] for i in rows: .npy and .npz natively, what the native .npz
    reader refuses again with np.load (`read_legacy_ref`, which also converts other dtypes)."""
    ok = np.ones(len(files), bool)
    errors: list[tuple[str, str]] = []
    for legacy, reader in ((False, native.read_npy_into), (True, native.read_npz_into)):
        which = np.array([i for i in rows.tolist() if files[i].legacy == legacy], np.int64)
        if not len(which):
            continue
        for k, reason in reader([files[i].path for i in which.tolist()], mat, threads, which):
            i = int(which[k])
            if not legacy:
                ok[i] = False
                errors.append((files[i].path, reason))
                continue
            try:
                v = read_legacy_ref(files[i].path)
                if v.shape[0] != mat.shape[1]:
                    raise ValueError(f"dim {v.shape[0]}, DB holds dim {mat.shape[1]}")
                mat[i] = v
            except Exception as e:  # a bad legacy file is a reason, not a crash
                ok[i] = False
                errors.append((files[i].path, f"{type(e).__name__}: {e}"))
    errors.sort()
    return ok, errors


def _drop_nonfinite(
    mat: np.ndarray, ok: np.ndarray, files: Sequence[DBFile], errors: list[tuple[str, str]], chunk: int = 4096
) -> None:
    """Marks the ok rows of `mat` (N, D) that are not usable (`layout.usable_rows`) as not ok, each
    with an error."""
    for s in range(0, len(ok), chunk):
        bad = np.flatnonzero(ok[s : s + chunk] & ~usable_rows(mat[s : s + chunk])) + s
        ok[bad] = False
        errors.extend((files[i].path, NOT_FINITE) for i in bad.tolist())
    errors.sort()


def _compact(mat: np.ndarray, ok: np.ndarray, chunk: int = 4096) -> int:
    """Moves the ok rows of `mat` to its front, in order, in place; returns how many.

    Rows only move towards the front, so copying runs front to back in chunks never reads a row
    that was already overwritten, and no second (N, D) buffer is needed.
    """
    k = int(ok.sum())
    if k == len(ok):
        return k
    edges = np.flatnonzero(np.diff(np.concatenate(([0], ok.astype(np.int8), [0]))))
    dst = 0
    for start, stop in zip(edges[::2].tolist(), edges[1::2].tolist()):  # runs [start, stop) of ok rows
        if start != dst:
            for a in range(start, stop, chunk):
                b = min(stop, a + chunk)
                mat[dst + a - start : dst + b - start] = mat[a:b]  # numpy buffers an overlap
        dst += stop - start
    return k


def probe_dim(files: Sequence[DBFile]) -> int | None:
    for f in files[:64]:
        if f.legacy:
            try:
                return int(read_legacy_ref(f.path).shape[0])
            except Exception:
                continue
        d, _ = native.npy_dim(f.path)
        if d:
            return d
    return None


def load_db(
    db_dir: str | os.PathLike[str],
    *,
    errors: list[tuple[str, str]] | None = None,
    write_snapshot: bool = True,
    info: LoadInfo | None = None,
) -> tuple[list[str], np.ndarray]:
    """Loads a whole DB, via its packed snapshot (see `load_files`).

    Args:
        db_dir: the DB directory.
        errors: if given, (path, reason) of each unreadable DB file is appended here.
        write_snapshot: write a fresh snapshot when the old one is missing or out of date.
        info: if given, filled with how the load went.

    Returns:
        (paths, embeddings): relative image paths, sorted, and their float32 (N, D) matrix. Files
        that cannot be read are left out.
    """
    if not os.path.isdir(db_dir):
        raise UserError(f"{db_dir}: DB directory does not exist")
    meta = read_meta(db_dir)
    dim = meta.dim if meta else None
    prefetch = SnapshotPrefetch(db_dir, dim, None)
    index = index_db(db_dir)
    files = [index.files[r] for r in sorted_by_bytes(list(index.files))]
    mat, ok, errs = load_files(
        db_dir,
        files,
        dim,
        started_ns=index.started_ns,
        write_snapshot=write_snapshot,
        info=info,
        prefetch=prefetch,
    )
    if errors is not None:
        errors.extend(errs)
    return [f.rel for f, good in zip(files, ok) if good], mat


def snapshot_lines(db_dir: str | os.PathLike[str], info: LoadInfo) -> list[str]:
    """One line when a DB's packed snapshot was unusable or could not be refreshed (the run itself
    is unaffected: the embeddings were read from the .npy files); waits for the snapshot's writer."""
    out = []
    if info.snapshot is SnapshotState.CORRUPT:
        fixed = "; a new one was written" if info.written else ""
        status = SnapshotStatus(info.snapshot, info.snapshot_detail).line()
        out.append(f"{os.fspath(db_dir)}: packed snapshot {status}; read the .npy files instead{fixed}")
    if info.write_error:
        out.append(info.write_error)
    return out

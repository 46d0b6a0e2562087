"""Opening a `RowStore` (db/rowstore.py) on a DB: what a whole run loads instead of the matrix.

`open_embeddings` takes a scan's entries and opens their rows; `open_store` does the work for any
`Rows`. Each row of the DB's packed snapshot that is still valid (same file stat, outside the racy
window, its checksum right) stays where it is; every other row is read from its `.npy` (or legacy
`.npz`) file into the store's spill file, so afterwards every row has been read and checked once.
When the snapshot was missing, stale or damaged and the run may write, a new one is written from the
store on a thread (`RowStore.writer`). The DB index is kept as columns (`index_columns`): a `DBFile`
object per image would cost about 0.7 KiB each at the peak of a large run.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from clipdedup import native
from clipdedup.db import snapshot as snap_mod
from clipdedup.db.layout import NOT_FINITE, NPY_SUFFIX, NPZ_SUFFIX, DBColumns, columns_of_scan
from clipdedup.db.load import probe_dim
from clipdedup.db.rowstore import BLOCK_ROWS, PendingWrite, Rows, RowsSeen, RowStore, spill_rows
from clipdedup.records import FileEntry, LoadInfo, SnapshotState, SnapshotStatus
from clipdedup.scan import scan_native
from clipdedup.util.fsutil import TMP_MARK

# The snapshot is rewritten when more than this share of the rows are read from their files (new or
# changed since it was written), or of its rows are no longer used: a few changed rows cost a few
# file reads per run, not a rewrite of every row.
REWRITE_SHARE = 1 / 64


def open_store(
    db_dir: str | os.PathLike[str],
    rows: Rows,
    dim: int | None = None,
    *,
    started_ns: int | None = None,
    write_snapshot: bool = True,
    threads: int | None = None,
    info: LoadInfo | None = None,
    block_rows: int = BLOCK_ROWS,
    track: bool = True,
    unchecked: bool = False,
) -> tuple[RowStore, np.ndarray, list[tuple[str, str]]]:
    """Opens `rows` as a `RowStore`, as `load.load_files` would load them.

    Args:
        db_dir: the DB root.
        rows: the N rows wanted, in order (`rows_of`, or `open_embeddings`'s columns).
        dim: D; default the snapshot's, else the first readable file's.
        started_ns: the DB index's `started_ns`; without it no snapshot is written.
        write_snapshot: refresh a missing or stale snapshot (on a thread, see `RowStore.writer`).
        threads: reader threads.
        info: filled with what happened (`written` and `write_error` wait for the writer).
        block_rows: rows per buffer while reading.
        track: keep what the opening pass sees of every row (`RowStore.seen`).
        unchecked: locate the rows the snapshot holds unchanged without reading them (ignored
            with `track`, which needs every row seen): they are checked when read, and one that
            fails its checksum there is read from its `.npy` instead (`RowStore.checked` False).
            The other rows are read from their files as always. The open costs O(N) index work
            plus the changed rows, not a read of the whole snapshot.

    Returns:
        (store, ok, errors): the store of the readable rows in order; ok (N,) bool; errors as
        (path, reason).
    """
    unchecked = unchecked and not track
    n = len(rows)
    file_at = np.flatnonzero(np.array([bool(k) for k in rows.keys], bool))
    keys = [rows.keys[i] for i in file_at.tolist()] if len(file_at) < n else rows.keys
    stats = {name: col[file_at] for name, col in rows.stats.items()}
    snap, status = snap_mod.read_snapshot(db_dir)
    if snap is not None and dim is not None and snap.dim != dim:
        status = SnapshotStatus(SnapshotState.OTHER_DIM, f"dim {snap.dim}, DB holds dim {dim}")
        snap = None
    if dim is None:
        dim = snap.dim if snap is not None else probe_dim([rows.dbfile(i) for i in file_at[:64].tolist()])
        if dim is None:
            dim = next((len(v) for v in rows.vectors.values()), 0)
    loc = np.full(n, -1, np.int64)
    hashes = np.zeros(n, np.uint64)
    # usable rows (an unusable one is a load error naming its file) and the largest norm, for
    # matching (no pass of its own there); without `track` the store keeps neither (a run answered
    # by the match cache, or builtin:dct's, never screens the store)
    seen = RowsSeen(n)
    base_fd, stale = -1, 0
    if snap is not None and len(file_at):
        src, dst, stale = snap_mod.reusable_rows(snap, keys, stats)
        try:
            base_fd = os.open(snap.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            status, stale = SnapshotStatus(SnapshotState.UNREADABLE, str(e.strerror or e)), len(snap.keys)
        else:
            dst = file_at[dst]
            loc[dst], hashes[dst] = src, snap.hashes[src]
            if unchecked:  # written from rows seen finite; the checksum vouches for that when read
                seen.finite[dst] = True
            else:
                bad = _check_snapshot_rows(base_fd, dim, loc, hashes, dst, block_rows, seen)
                loc[bad] = -1
                stale += len(bad)
    del snap
    from_snap = loc >= 0
    if info is not None:
        info.snapshot, info.snapshot_detail = status
        info.from_snapshot = int(from_snap.sum())
        info.from_files = n - info.from_snapshot
    which = np.flatnonzero(~from_snap)
    spill_fd, ok, errors = spill_rows(rows, which, dim, loc, hashes, threads, block_rows, seen)
    bad = np.flatnonzero(ok & ~seen.finite)  # every ok row was seen once (snapshot or file)
    ok[bad] = False
    errors = sorted(errors + [(rows.dbfile(i).path, NOT_FINITE) for i in bad.tolist() if rows.keys[i]])
    store = RowStore(dim, loc[ok], hashes[ok], base_fd, spill_fd, seen.subset(ok) if track else None)
    store.snapshot_path = snap_mod.snapshot_path(db_dir)
    if unchecked:
        store.checked = False
        store.files = (rows, np.flatnonzero(ok))
    if write_snapshot and started_ns is not None and store.n and os.path.isdir(db_dir) and len(file_at) == n:
        # trusted rows the snapshot lacks (outside the racy window: a rewrite would include them)
        fresh = ok & ~from_snap
        news = int(np.count_nonzero(stats["ctime_ns"][fresh] <= started_ns - snap_mod.RACY_NS))
        # rows read from files on every run until then, or snapshot rows no longer used
        if status.state is not SnapshotState.USED or max(news, stale) > REWRITE_SHARE * n:
            keep = [key for key, g in zip(keys, ok.tolist()) if g]
            _start_writer(store, db_dir, keep, {k: c[ok] for k, c in stats.items()}, started_ns, info)
    return store, ok, errors


def _check_snapshot_rows(
    fd: int,
    dim: int,
    loc: np.ndarray,
    hashes: np.ndarray,
    rows: np.ndarray,
    block_rows: int,
    seen: RowsSeen | None,
) -> np.ndarray:
    """The rows (of `rows`, sorted) whose snapshot bytes are short or fail their checksum; the
    others are recorded in `seen`."""
    rows = np.sort(rows)
    buf = np.empty((min(block_rows, max(1, len(rows))), dim), np.float32)
    bad: list[np.ndarray] = []
    for s in range(0, len(rows), block_rows):
        r = rows[s : s + block_rows]
        dst = np.arange(len(r), dtype=np.int64)
        fatal, b = native.gather_rows(fd, snap_mod.DATA_OFFSET, loc[r], dst, hashes[r], buf)
        bad.append(r if fatal else r[np.asarray(b, np.int64)])
        good = np.ones(len(r), bool)
        good[np.asarray(b, np.int64)] = False
        if not fatal and good.any() and seen is not None:
            seen.see(r[good], buf[: len(r)][good])
    return np.concatenate(bad) if bad else np.zeros(0, np.int64)


def background_priority(nice: int = 10) -> None:
    """Lowers the calling thread's CPU priority (Linux: a thread's own nice value) so that a
    background write yields the cores to the run's matching; elsewhere, or if refused, nothing."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


def _start_writer(
    store: RowStore,
    db_dir: str | os.PathLike[str],
    keys: list[str],
    stats: dict[str, np.ndarray],
    started_ns: int,
    info: LoadInfo | None,
) -> None:
    """Writes a new snapshot of the whole store on a thread (atomic: temp file, then rename)."""

    def write() -> None:
        background_priority()
        try:
            blocks = (blk for _, blk in store.blocks())
            snap_mod.write_snapshot_blocks(db_dir, keys, stats, store.dim, blocks, store.hashes, started_ns)
            if info is not None:
                info.done_writing(True, "")
        except OSError as e:
            pending.error = f"{snap_mod.snapshot_path(db_dir)}: not written: {e.strerror or e}"
            if info is not None:
                info.done_writing(False, pending.error)

    pending = store.writer = PendingWrite()  # before the thread starts: it writes into it
    pending.thread = snap_mod.start_write(db_dir, write)
    if info is not None:
        info.writer = pending.thread


def index_columns(db_dir: str | os.PathLike[str]) -> DBColumns:
    """Every embedding file under `db_dir`, as `index_db` finds them, in columns (no `DBFile` per file)."""
    started = time.time_ns()
    if not os.path.isdir(db_dir):
        return columns_of_scan(os.fspath(db_dir), None, np.zeros(0, np.int64), [], [], started)
    out, _errors = scan_native(db_dir, suffixes=None)
    picked, _temps, _shadowed = out.classify_db(TMP_MARK)
    picked = np.asarray(picked, np.int64)
    keys = out.names(picked)
    legacy = [k.endswith(NPZ_SUFFIX) for k in keys]
    rels = [k[:-4] for k in keys]  # NPY_SUFFIX and NPZ_SUFFIX: 4 characters each
    del keys
    return columns_of_scan(os.fspath(db_dir), out, picked, rels, legacy, started)


def open_embeddings(
    db_dir: str | os.PathLike[str],
    entries: Sequence[FileEntry],
    *,
    dim: int | None,
    in_memory: dict[str, np.ndarray] | None = None,
    dry_run: bool = False,
    info: LoadInfo | None = None,
    index: DBColumns | None = None,
    track: bool = True,
    unchecked: bool = False,
) -> tuple[list[FileEntry], RowStore, list[tuple[str, str]], int]:
    """`update.load_embeddings` as a `RowStore`: what a whole run uses instead of the matrix.

    The embeddings of `entries` that the DB (or `in_memory`) holds, in entry order. A dry run (or
    any `in_memory` vectors) writes nothing; otherwise a missing or stale snapshot is refreshed
    on a thread (see `RowStore.writer`).

    Args:
        index: the DB's `index_columns`, when the caller has it already.
        track: keep what the opening pass sees of every row (`RowStore.seen`: which are finite, the
            largest norm) so that a full match on the store needs no pass of its own.
        unchecked: `open_store`'s: the rows the snapshot holds unchanged are located, not read.

    Returns:
        (entries with an embedding, the store of their rows, DB read errors, count not in the DB).
    """
    in_memory = in_memory or {}
    idx = index_columns(db_dir) if index is None else index
    with_row: list[FileEntry] = []
    at: list[int] = []  # column of each row (-1: in memory)
    vectors: dict[int, np.ndarray] = {}
    for e in entries:
        if e.rel in in_memory:
            vectors[len(at)] = np.asarray(in_memory[e.rel], np.float32)
            at.append(-1)
        elif (k := idx.row.get(e.rel, -1)) >= 0:
            at.append(k)
        else:
            continue
        with_row.append(e)
    missing = len(entries) - len(with_row)
    cols = np.array(at, np.int64)
    stats = {}
    for name, c in idx.stats.items():
        col = c[np.maximum(cols, 0)] if len(c) else np.zeros(len(cols), c.dtype)
        col[cols < 0] = 0
        stats[name] = col
    keys = [
        e.rel + (NPZ_SUFFIX if idx.legacy[k] else NPY_SUFFIX) if k >= 0 else "" for e, k in zip(with_row, at)
    ]
    rows = Rows(idx.root, keys, stats, vectors)
    started = idx.started_ns
    del idx, index, at, cols
    store, ok, errors = open_store(
        db_dir,
        rows,
        dim,
        started_ns=started,
        write_snapshot=not (dry_run or in_memory),
        info=info,
        track=track,
        unchecked=unchecked,
    )
    kept = [e for e, good in zip(with_row, ok.tolist()) if good]
    return kept, store, errors, missing


def encoded_as_scanned(
    image_dir: str,
    db_dir: str | os.PathLike[str],
    entries: list[FileEntry],
    dim: int | None,
    failed: list[tuple[str, str]],
    say: Callable[[str], object],
    *,
    use_ctime: bool = True,
    index: DBColumns | None = None,
) -> list[FileEntry]:
    """With --skip-update, the images whose embedding no longer matches them (changed since it was
    made) are left out, with a reason in `failed` and a line: a run never acts on a stale embedding.
    `index`: the DB's `index_columns` when the caller has it (it is read otherwise)."""
    stale = (index or index_columns(db_dir)).stale(entries, dim, use_ctime=use_ctime)
    for rel in sorted(stale, key=os.fsencode):
        path = os.path.join(image_dir, rel)
        failed.append((path, "changed since it was encoded; left out (--skip-update)"))
        say(f"{path}: skipped: changed since it was encoded (--skip-update)")
    return [e for e in entries if e.rel not in stale]

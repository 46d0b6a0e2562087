"""The row store: a run's embeddings kept on disk, read with pread into bounded buffers.

`load_db` / `load_files` return the (N, D) float32 matrix; a whole run does not need it. The
pipeline opens a `RowStore` instead (`db.store_load.open_embeddings`): each row's bytes stay where
they are on disk, in the DB's packed snapshot when the snapshot holds the row unchanged, else in a
private spill file (an unnamed temporary file under $TMPDIR, gone when the run ends, even after
kill -9). Resident per row: its place (int64) and its checksum (uint64), 16 bytes.

Every row is read and checked once when the store opens (snapshot rows against their checksum,
failures re-read from the `.npy` mirror), so later reads see exactly the bytes that were checked:
`take` and `blocks` check each row again and raise `RowStoreError` if the disk no longer agrees.
Reads go through descriptors held open for the store's life, so a new snapshot renamed over the old
one mid-run changes nothing.

A run that will not screen every row (its match cache is likely to answer, or it is builtin:dct's,
which reads only the rows its screen needs) opens the store unchecked (`store_load.open_store`'s
`unchecked`, `checked` False): the snapshot's unchanged rows are located by its index, not read, so
the open costs O(N) index work plus the changed rows. Their reads are checked all the same, and a
row whose snapshot bytes fail their checksum is read from its `.npy` instead (`files`), whose bytes
must then have that checksum (the file's stat is the one the snapshot recorded). To find those
files an unchecked store keeps the `Rows` it opened (their keys and stats, which the open holds
anyway: about 100 bytes a row more for the rest of the run).

When the snapshot was missing, stale or damaged and the run may write (not a dry run), a new
snapshot is written from the store on a thread (`RowStore.writer`, started by db/store_load.py),
off the run's critical path, atomically as always; `RowStore.close` waits for it.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from clipdedup import native
from clipdedup.db import snapshot as snap_mod
from clipdedup.db.layout import NPZ_SUFFIX, DBFile, usable_rows
from clipdedup.db.load import file_keys, file_stats, read_from_files

BLOCK_ROWS = 4096  # rows per streamed block: 20 MiB of float32 at D = 1280


class RowsSeen:
    """What a pass over rows saw: which are usable, and a bound of their squared norms.

    Attributes:
        finite: bool (N,): the row's float32 sum of squares is finite (`layout.usable_rows`): no
            NaN or infinity, and no value too large to square (a random body).
        max_sq: >= the largest float64 sum of squares of a finite row (0.0 when none).
    """

    def __init__(self, n: int) -> None:
        self.finite = np.zeros(n, bool)
        self.max_sq = 0.0

    def see(self, rows: np.ndarray, blk: np.ndarray) -> None:
        """Records rows `rows` (int64 (k,)) whose values are `blk` (float32 (k, D))."""
        fin = usable_rows(blk)
        self.finite[rows] = fin
        if fin.any():
            sq = np.einsum("ij,ij->i", blk[fin], blk[fin])  # float32: relative error <= D 2^-24
            self.max_sq = max(self.max_sq, float(sq.max()) * (1 + 2.0**-9))

    def subset(self, keep: np.ndarray) -> RowsSeen:
        out = RowsSeen(0)
        out.finite, out.max_sq = self.finite[keep], self.max_sq
        return out


class RowStoreError(OSError):
    """A row read back from the store differs from the row checked when it opened."""


@dataclass
class PendingWrite:
    """The background snapshot write of a store."""

    thread: threading.Thread | None = None
    error: str = ""


class RowStore:
    """N float32 rows of width D on disk (see the module docstring).

    Args:
        dim: D.
        loc: int64 (N,): row r of the snapshot when >= 0, else row -1 - loc of the spill file.
        hashes: uint64 (N,) `native.row_hashes` of each row.
        base_fd: descriptor of the snapshot (or -1), rows at `snapshot.DATA_OFFSET`.
        spill_fd: descriptor of the spill file (or -1), rows from offset 0.
    """

    def __init__(
        self,
        dim: int,
        loc: np.ndarray,
        hashes: np.ndarray,
        base_fd: int,
        spill_fd: int,
        seen: RowsSeen | None = None,
    ) -> None:
        self.dim = dim
        self.loc = np.ascontiguousarray(loc, np.int64)
        self.hashes = np.ascontiguousarray(hashes, np.uint64)
        self._base_fd, self._spill_fd = base_fd, spill_fd
        self.writer: PendingWrite | None = None
        self.seen = seen  # what the opening pass saw of every row, if it kept track
        self.snapshot_path = ""  # the DB's snapshot file (db/store_load.py sets it), for `shared_rows`
        # False: the snapshot rows were located, not read when the store opened (module docstring)
        self.checked = True
        # where an unchecked store's rows came from: (the `Rows` opened, int64 (N,) each row's
        # index in them), to read a row whose snapshot bytes fail their checksum from its file
        self.files: tuple[Rows, np.ndarray] | None = None

    @property
    def n(self) -> int:
        return len(self.loc)

    def take(self, idx: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """float32 (K, D) rows `idx` (int64 (K,), any order, repeats allowed), read into `out[:K]`.

        Raises:
            RowStoreError: a row is short or fails its checksum.
        """
        idx = np.asarray(idx, np.int64)
        k = len(idx)
        if out is None:
            out = np.empty((k, self.dim), np.float32)
        view = out[:k]
        if k == 0:
            return view
        loc = self.loc[idx]
        for fd, offset, sel, src in (
            (self._base_fd, snap_mod.DATA_OFFSET, loc >= 0, loc),
            (self._spill_fd, 0, loc < 0, -1 - loc),
        ):
            dst = np.flatnonzero(sel)
            if not len(dst):
                continue
            fatal, bad = native.gather_rows(fd, offset, src[dst], dst, self.hashes[idx[dst]], view)
            if (fatal or bad) and fd == self._base_fd and self.files is not None:
                redo = dst if fatal else dst[np.asarray(bad, np.int64)]
                failed = self._from_files(idx[redo], redo, view)  # positions in view, as dst holds
                fatal, bad = None, np.searchsorted(dst, failed).tolist()
            if fatal or bad:
                rows = idx[dst[bad]][:3].tolist() if bad else []
                raise RowStoreError(
                    f"row store: rows {rows} changed on disk during the run ({fatal or 'checksum'})"
                )
        return view

    def _from_files(self, rows: np.ndarray, at: np.ndarray, view: np.ndarray) -> np.ndarray:
        """Reads store rows `rows` from their DB files into `view[at]`; returns the entries of `at`
        whose file could not be read or does not have the row's checksum (left unwritten)."""
        assert self.files is not None
        src, where = self.files
        files = [src.dbfile(int(where[r])) for r in rows.tolist()]
        buf = np.zeros((len(files), self.dim), np.float32)
        ok, _errors = read_from_files(files, np.arange(len(files), dtype=np.int64), buf, 1)
        ok &= native.row_hashes(buf, 1) == self.hashes[rows]
        view[at[ok]] = buf[ok]
        return at[~ok]

    def block(self, i0: int, i1: int, out: np.ndarray | None = None) -> np.ndarray:
        """float32 (i1 - i0, D) rows i0:i1, read into `out`."""
        return self.take(np.arange(i0, i1, dtype=np.int64), out)

    def blocks(self, rows: int = BLOCK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        """(i0, float32 (k, D) rows i0:i0+k) for consecutive blocks, through one reused buffer:
        each block is valid until the next is asked for."""
        buf = np.empty((min(rows, max(1, self.n)), self.dim), np.float32)
        for i0 in range(0, self.n, rows):
            yield i0, self.block(i0, min(self.n, i0 + rows), buf)

    def to_matrix(self, dims: int | None = None) -> np.ndarray:
        """All rows as one float32 (N, D) matrix (for backends that need it), or only their leading
        `dims` columns (N, dims), one block at a time."""
        out = np.empty((self.n, self.dim if dims is None else dims), np.float32)
        for i0, blk in self.blocks():
            out[i0 : i0 + len(blk)] = blk[:, : out.shape[1]]
        return out

    def shared_rows(self) -> tuple[str, bytes, np.ndarray] | None:
        """Where another process (a Ray task on another node) can read this store's rows: (the
        snapshot's path, its header bytes, which name that file, int64 (N,) each row's row in it or
        -1), or None when no file at that path holds them. Waits for the background write first.

        A snapshot this store's writer wrote holds every row, in order, with the same checksums.
        Otherwise the file the store opened serves as long as the path still names it (the same
        header bytes: written_ns and the index checksum differ between any two snapshots).
        """
        if not self.snapshot_path:
            return None
        error = self.wait()
        head = _snapshot_head(self.snapshot_path)
        if self.writer is not None and self.writer.thread is not None:
            if error or head is None:
                return None
            rows, dim = snap_mod.HEADER.unpack_from(head)[3:5]
            ok = (rows, dim) == (self.n, self.dim)
            return (self.snapshot_path, head, np.arange(self.n, dtype=np.int64)) if ok else None
        if self._base_fd < 0 or head is None or head != os.pread(self._base_fd, len(head), 0):
            return None
        return self.snapshot_path, head, np.where(self.loc >= 0, self.loc, -1)

    def wait(self) -> str:
        """Waits for the background snapshot write; returns its error line ('' if none or fine)."""
        if self.writer is None or self.writer.thread is None:
            return ""
        self.writer.thread.join()
        return self.writer.error

    def close(self) -> None:
        self.wait()
        for fd in (self._base_fd, self._spill_fd):
            if fd >= 0:
                os.close(fd)
        self._base_fd = self._spill_fd = -1

    def __enter__(self) -> RowStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _snapshot_head(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            head = f.read(snap_mod.HEADER.size)
    except OSError:
        return None
    return head if len(head) == snap_mod.HEADER.size else None


def store_of_matrix(mat: np.ndarray, block_rows: int = BLOCK_ROWS) -> RowStore:
    """A store holding a copy of the float32 (N, D) rows of `mat` in a spill file (tests, benchmarks,
    and callers that produce rows in pieces and want them off the heap)."""
    mat = np.asarray(mat, np.float32)
    n, dim = mat.shape
    rows = np.arange(n, dtype=np.int64)
    loc, hashes = np.full(n, -1, np.int64), np.zeros(n, np.uint64)
    seen = RowsSeen(n)
    fd, _, _ = spill_rows(mat, rows, dim, loc, hashes, None, block_rows, seen)
    return RowStore(dim, loc, hashes, -1, fd, seen)


@dataclass
class Rows:
    """The N rows `open_store` reads, as columns: each a DB file or a vector already in memory.

    Attributes:
        root: the DB root.
        keys: N DB file paths relative to the root (`DBFile.key`); '' for an in-memory row.
        stats: mtime_ns, size, ctime_ns int64 (N,) and ino uint64 (N,) of the files (0 for vectors).
        vectors: row -> float32 (D,) vector, for the in-memory rows.
    """

    root: str
    keys: list[str]
    stats: dict[str, np.ndarray]
    vectors: dict[int, np.ndarray]

    def __len__(self) -> int:
        return len(self.keys)

    def dbfile(self, i: int) -> DBFile:
        key = self.keys[i]
        st = {name: int(col[i]) for name, col in self.stats.items()}
        legacy = key.endswith(NPZ_SUFFIX)
        return DBFile(
            key[:-4],
            os.path.join(self.root, key),
            st["mtime_ns"],
            st["size"],
            legacy,
            st["ctime_ns"],
            st["ino"],
        )


def rows_of(db_dir: str | os.PathLike[str], items: Sequence[DBFile | np.ndarray]) -> Rows:
    """`Rows` of DB files (from `index_db`) and in-memory vectors, in that order."""
    files = [it for it in items if isinstance(it, DBFile)]
    at = np.array([k for k, it in enumerate(items) if isinstance(it, DBFile)], np.int64)
    keys = [""] * len(items)
    for k, key in zip(at.tolist(), file_keys(files)):
        keys[k] = key
    stats = {name: np.zeros(len(items), col.dtype) for name, col in file_stats(files).items()}
    for name, col in file_stats(files).items():
        stats[name][at] = col
    vectors = {k: np.asarray(it, np.float32) for k, it in enumerate(items) if not isinstance(it, DBFile)}
    return Rows(os.fspath(db_dir), keys, stats, vectors)


def spill_rows(
    rows: Rows | np.ndarray,
    which: np.ndarray,
    dim: int,
    loc: np.ndarray,
    hashes: np.ndarray,
    threads: int | None,
    block_rows: int,
    seen: RowsSeen | None = None,
) -> tuple[int, np.ndarray, list[tuple[str, str]]]:
    """Reads rows[which] (files, vectors, or rows of a matrix) block by block into a new spill
    file; sets their loc and hash. Returns (spill descriptor or -1, ok (N,) bool, errors)."""
    ok = np.ones(len(rows), bool)
    errors: list[tuple[str, str]] = []
    if not len(which):
        return -1, ok, errors
    spill = tempfile.TemporaryFile(prefix="clipdedup-rows-")
    fd = os.dup(spill.fileno())
    spill.close()
    written = 0
    buf = np.empty((min(block_rows, len(which)), dim), np.float32)
    try:
        for s in range(0, len(which), block_rows):
            r = which[s : s + block_rows]
            blk = buf[: len(r)]
            good = np.ones(len(r), bool)
            if isinstance(rows, np.ndarray):
                blk[:] = rows[r]
            else:
                _read_block(rows, r, blk, good, errors, threads)
            ok[r] = good
            keep = np.ascontiguousarray(blk[good])
            hashes[r[good]] = native.row_hashes(keep, os.cpu_count() or 1)
            if seen is not None:
                seen.see(r[good], keep)
            loc[r[good]] = -1 - (written + np.arange(len(keep), dtype=np.int64))
            os.pwrite(fd, memoryview(keep).cast("B"), written * dim * 4)  # type: ignore[arg-type]
            written += len(keep)
    except BaseException:
        os.close(fd)
        raise
    errors.sort()
    return fd, ok, errors


def _read_block(
    rows: Rows, r: np.ndarray, blk: np.ndarray, good: np.ndarray, errors: list, threads: int | None
) -> None:
    """blk[k] = row r[k] (a vector, or read from its file); good[k] = False where that failed."""
    at = [k for k, i in enumerate(r.tolist()) if i not in rows.vectors]
    for k, i in enumerate(r.tolist()):
        if i in rows.vectors:
            blk[k] = rows.vectors[i]
    if not at:
        return
    files = [rows.dbfile(int(r[k])) for k in at]
    sub = np.empty((len(files), blk.shape[1]), np.float32)
    f_ok, f_err = read_from_files(files, np.arange(len(files)), sub, threads)
    blk[at] = sub
    good[at] = f_ok
    errors.extend(f_err)

"""The packed snapshot of a DB: every loaded embedding in one file at the DB root.

A load that finds a valid snapshot reads the rows of unchanged `.npy` files from it with a few large
reads, instead of opening N small files, and reads only the changed or new files from the mirror.
The `.npy` mirror stays the source of truth: deleting the snapshot is always safe, and a missing,
stale or damaged one is detected and rebuilt by the next load.

Layout of `clipdedup-snapshot.bin` (little-endian):

    [0, 4096)           header: HEADER struct, zero-padded
    [4096, I)           matrix: float32 (N, D), C order, I = 4096 + N * D * 4
    [I, I + index_len)  index: int64 mtime_ns[N], int64 size[N], int64 ctime_ns[N],
                        uint64 ino[N], uint64 row_hash[N], then the N keys (the DB file's path
                        relative to the DB root, os.fsencode'd) joined by NUL bytes

The header carries a CRC-32 of itself and of the index; each row carries a checksum of its bytes
(`row_hashes_ref`), checked as the row is read. A row is reused only when its file's mtime, size,
ctime and inode all match, and when the file's ctime was at least RACY_NS older than the load that
wrote the snapshot: an .npy rewritten within the file system's timestamp granularity of that load
could otherwise keep all four values (the "racy git" problem), so such rows are left out of the
snapshot and read from the mirror until a later load can vouch for them.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from clipdedup.records import SnapshotState, SnapshotStatus
from clipdedup.util.fsutil import atomic_file

SNAPSHOT_NAME = "clipdedup-snapshot.bin"
MAGIC = b"CDSNAP\x00\x01"
VERSION = 1
DATA_OFFSET = 4096
RACY_NS = 2_000_000_000
# magic, version, flags, rows, dim, written_ns, index_offset, index_len, index_crc, header_crc
HEADER = struct.Struct("<8sIIQQqQQII")
_K1 = np.uint64(0x9E3779B97F4A7C15)
_K2 = np.uint64(0xC2B2AE3D27D4EB4F)
# The file stats kept per row (columns of the index, in this order); ino is unsigned.
STAT_FIELDS = ("mtime_ns", "size", "ctime_ns", "ino")


@dataclass
class Snapshot:
    """A snapshot's header and index (the matrix stays on disk).

    Attributes:
        path: the file.
        dim: D.
        written_ns: wall-clock ns taken before the writing load stat'ed the DB.
        keys: N DB file paths relative to the DB root.
        mtime_ns, size, ctime_ns: int64 (N,); ino, hashes: uint64 (N,).
    """

    path: str
    dim: int
    written_ns: int
    keys: list[str]
    mtime_ns: np.ndarray
    size: np.ndarray
    ctime_ns: np.ndarray
    ino: np.ndarray
    hashes: np.ndarray


def snapshot_path(db_dir: str | os.PathLike[str]) -> str:
    return os.path.join(db_dir, SNAPSHOT_NAME)


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


def row_hashes_ref(mat: np.ndarray) -> np.ndarray:
    """The row checksum of csrc/snapshot.cpp in numpy: uint64 (N,) for a float32 (N, D) matrix."""
    n, d = mat.shape
    nbytes = d * 4
    raw = np.zeros((n, -(-nbytes // 8) * 8), np.uint8)
    raw[:, :nbytes] = np.ascontiguousarray(mat, dtype="<f4").view(np.uint8).reshape(n, nbytes)
    words = raw.view("<u8")
    nb = np.uint64(nbytes)
    with np.errstate(over="ignore"):
        h = [np.full(n, v, np.uint64) for v in (_K1 ^ nb, _K2 ^ nb, _K1 + nb, _K2 - nb)]
        for i in range(words.shape[1]):
            h[i & 3] = _rotl(h[i & 3] ^ words[:, i], 31) * _K1
        x = np.full(n, nb, np.uint64)
        for lane in h:
            x = _rotl(x ^ lane, 27) * _K2
    return x ^ (x >> np.uint64(29))


_pending: dict[str, threading.Thread] = {}  # snapshot path -> this process's write under way
_pending_lock = threading.Lock()


def start_write(db_dir: str | os.PathLike[str], fn: Callable[[], None]) -> threading.Thread:
    """Runs `fn` (which writes `db_dir`'s snapshot) on a thread and returns it. Until it ends,
    `read_snapshot` of the same DB in this process waits for it, so a load that follows another
    sees the snapshot that one wrote. The thread is not a daemon: the interpreter waits for it."""
    path = os.path.realpath(snapshot_path(db_dir))
    wait_for_write(db_dir)  # one writer per DB at a time, in the order the loads ran
    t = threading.Thread(target=fn, name="clipdedup-snapshot-write", daemon=False)
    with _pending_lock:
        _pending[path] = t
    t.start()
    return t


def wait_for_write(db_dir: str | os.PathLike[str]) -> None:
    """Waits for this process's snapshot write of `db_dir`, if one is under way."""
    path = os.path.realpath(snapshot_path(db_dir))
    with _pending_lock:
        t = _pending.get(path)
    if t is None or t is threading.current_thread():
        return
    t.join()
    with _pending_lock:
        if _pending.get(path) is t:
            del _pending[path]


def read_snapshot(db_dir: str | os.PathLike[str]) -> tuple[Snapshot | None, SnapshotStatus]:
    """The snapshot at `db_dir` (status USED), or (None, why it cannot be used). A write of it that
    this process has under way (`start_write`) is waited for first."""
    wait_for_write(db_dir)
    path = snapshot_path(db_dir)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(DATA_OFFSET)
            if len(head) < HEADER.size:
                return None, SnapshotStatus(SnapshotState.CORRUPT, "shorter than its header")
            magic, version, _flags, rows, dim, written, index_at, index_len, index_crc, head_crc = (
                HEADER.unpack_from(head)
            )
            if magic != MAGIC or version != VERSION:
                return None, SnapshotStatus(SnapshotState.CORRUPT, "not a clipdedup snapshot of this version")
            if zlib.crc32(head[: HEADER.size - 4]) != head_crc:
                return None, SnapshotStatus(SnapshotState.CORRUPT, "header checksum")
            if dim == 0 or index_at != DATA_OFFSET + rows * dim * 4 or size != index_at + index_len:
                return None, SnapshotStatus(
                    SnapshotState.CORRUPT, f"{size} bytes, header says {index_at + index_len}"
                )
            f.seek(index_at)
            index = f.read(index_len)
    except FileNotFoundError:
        return None, SnapshotStatus(SnapshotState.MISSING)
    except OSError as e:
        return None, SnapshotStatus(SnapshotState.UNREADABLE, str(e.strerror or e))
    if len(index) != index_len or zlib.crc32(index) != index_crc or index_len < 40 * rows:
        return None, SnapshotStatus(SnapshotState.CORRUPT, "index checksum")
    cols = [np.frombuffer(index, "<i8" if k < 3 else "<u8", rows, 8 * rows * k) for k in range(5)]
    keys = os.fsdecode(index[40 * rows :]).split("\0") if rows else []
    if len(keys) != rows:
        return None, SnapshotStatus(SnapshotState.CORRUPT, "key count")
    return Snapshot(path, dim, written, keys, *cols), SnapshotStatus(SnapshotState.USED)


def reusable_rows(
    snap: Snapshot, keys: Sequence[str], stats: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, int]:
    """Which of the wanted rows a snapshot holds, unchanged.

    Args:
        snap: the snapshot.
        keys: K DB file paths relative to the DB root, of the rows wanted.
        stats: their current mtime_ns, size, ctime_ns (int64 (K,)) and ino (uint64 (K,)).

    Returns:
        (src, dst, unused): int64 rows of the snapshot and the matching indices into `keys`, and
        how many snapshot rows are not wanted or are stale.
    """
    if list(keys) == snap.keys:  # the usual case: nothing added or removed since
        src = np.arange(len(keys), dtype=np.int64)
        dst = src.copy()
    else:
        where = {k: j for j, k in enumerate(snap.keys)}
        pairs = [(where[k], i) for i, k in enumerate(keys) if k in where]
        src = np.array([p[0] for p in pairs], np.int64)
        dst = np.array([p[1] for p in pairs], np.int64)
    same = np.ones(len(src), bool)
    for name in STAT_FIELDS:
        same &= getattr(snap, name)[src] == stats[name][dst]
    same &= snap.ctime_ns[src] <= snap.written_ns - RACY_NS
    src, dst = src[same], dst[same]
    return src, dst, len(snap.keys) - len(src)


def write_snapshot(
    db_dir: str | os.PathLike[str],
    keys: Sequence[str],
    stats: dict[str, np.ndarray],
    mat: np.ndarray,
    hashes: np.ndarray,
    written_ns: int,
) -> None:
    """Writes the snapshot atomically (temp file in the DB root, then a rename).

    Args:
        db_dir: the DB root.
        keys: N DB file paths relative to the DB root.
        stats: their mtime_ns, size, ctime_ns (int64 (N,)) and ino (uint64 (N,)), as stat'ed
            before their rows were read.
        mat: float32 (N, D) C-contiguous rows, written straight from this buffer.
        hashes: uint64 (N,) `row_hashes` of `mat`.
        written_ns: time.time_ns() taken before those stats.
    """
    write_snapshot_blocks(db_dir, keys, stats, mat.shape[1], [mat], hashes, written_ns)


def write_snapshot_blocks(
    db_dir: str | os.PathLike[str],
    keys: Sequence[str],
    stats: dict[str, np.ndarray],
    dim: int,
    blocks: Iterable[np.ndarray],
    hashes: np.ndarray,
    written_ns: int,
) -> None:
    """As `write_snapshot`, with the N rows given as consecutive float32 (k, dim) C-contiguous
    blocks (read from a row store, say), so no (N, D) matrix is needed; each block is written
    before the next is asked for."""
    n, d = len(keys), dim
    blob = os.fsencode("\0".join(keys))
    cols = [np.ascontiguousarray(stats[k], "<i8" if k != "ino" else "<u8") for k in STAT_FIELDS]
    index = b"".join(c.tobytes() for c in cols) + np.ascontiguousarray(hashes, "<u8").tobytes() + blob
    index_at = DATA_OFFSET + n * d * 4
    fields = (MAGIC, VERSION, 0, n, d, written_ns, index_at, len(index), zlib.crc32(index))
    head = HEADER.pack(*fields, 0)[:-4]
    head += struct.pack("<I", zlib.crc32(head))
    with atomic_file(snapshot_path(db_dir)) as f:
        f.write(head.ljust(DATA_OFFSET, b"\0"))
        rows = 0
        for blk in blocks:
            if blk.dtype != np.float32 or blk.ndim != 2 or blk.shape[1] != d or not blk.flags.c_contiguous:
                raise ValueError("expected C-contiguous float32 (k, D) blocks")
            # numpy's stubs give ndarray __buffer__ only for Python >= 3.12 (mypy checks 3.11).
            f.write(memoryview(blk).cast("B"))  # type: ignore[arg-type]
            rows += blk.shape[0]
        if rows != n:
            raise ValueError(f"{rows} rows written, {n} keys")
        f.write(index)

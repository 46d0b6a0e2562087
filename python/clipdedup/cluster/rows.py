"""Row blocks for matching tasks: read by the worker from the DB's snapshot on shared storage.

The driver never gathers a matrix for the cluster. For each block of rows it puts a `RowBlock` in
Ray's object store: where each row sits in the DB's packed snapshot (`RowStore.shared_rows`) and its
checksum, 16 bytes a row, plus the float32 values of only the rows the snapshot lacks (rows encoded
after it was written, a dry run's in-memory vectors), read from the store one block at a time. A
task opens the snapshot by its path (`SnapshotRef`: the path and the header bytes that name the
file, so a node that sees another file there fails with one line instead of reading wrong rows),
reads its rows through a `RowStore` (each row checked against its checksum, as in a local run), and
checks the shipped rows' checksums too.

Where the snapshot cannot serve (no snapshot, one replaced by another process, a node that cannot
read it: `probe_snapshot`), every row of a block is shipped, still one block at a time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipdedup import native
from clipdedup.db.rowstore import RowStore, RowStoreError
from clipdedup.errors import UserError


@dataclass(frozen=True)
class SnapshotRef:
    """A snapshot file as the driver opened it: its path (the same on every node) and header."""

    path: str
    head: bytes
    dim: int


@dataclass
class RowBlock:
    """Rows i0 : i0 + len(loc) of a store, as a task reads them.

    Attributes:
        i0: first row.
        loc: int64 (k,): the row's row in the snapshot, -1 for a shipped row.
        hashes: uint64 (k,): `native.row_hashes` of each row.
        shipped: float32 (m, D): the rows with loc -1, in order (m may be 0).
    """

    i0: int
    loc: np.ndarray
    hashes: np.ndarray
    shipped: np.ndarray


def _open_snapshot(src: SnapshotRef) -> int:
    try:
        fd = os.open(src.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise UserError(f"--ray-match: cannot open {src.path} on this node ({e.strerror or e})") from None
    if os.pread(fd, len(src.head), 0) != src.head:
        os.close(fd)
        raise UserError(
            f"--ray-match: {src.path} on this node is not the snapshot the driver opened "
            "(replaced during the run, or another file at that path)"
        )
    return fd


def read_block(src: SnapshotRef | None, blk: RowBlock, dim: int) -> np.ndarray:
    """float32 (k, D): the block's rows, each checked against its checksum.

    Raises:
        RowStoreError: a row differs from the one the driver checked.
    """
    out = np.empty((len(blk.loc), dim), np.float32)
    on_disk = blk.loc >= 0
    if on_disk.any():
        assert src is not None  # the driver ships every row when it has no snapshot
        with RowStore(dim, blk.loc[on_disk], blk.hashes[on_disk], _open_snapshot(src), -1) as store:
            out[on_disk] = store.take(np.arange(int(on_disk.sum()), dtype=np.int64))
    if not on_disk.all():
        shipped = np.ascontiguousarray(blk.shipped, np.float32)
        if not np.array_equal(native.row_hashes(shipped, 1), blk.hashes[~on_disk]):
            raise RowStoreError(f"rows {blk.i0}+: a shipped row differs from the driver's")
        out[~on_disk] = shipped
    return out


def store_blocks(
    store: RowStore, block_rows: int, src: SnapshotRef | None, loc: np.ndarray | None
) -> Iterator[RowBlock]:
    """The store's rows as `RowBlock`s of `block_rows`; `loc` from `RowStore.shared_rows` (None:
    ship every row). Rows are read one block at a time."""
    for i0 in range(0, store.n, block_rows):
        i1 = min(store.n, i0 + block_rows)
        part = np.full(i1 - i0, -1, np.int64) if loc is None or src is None else loc[i0:i1]
        ids = i0 + np.flatnonzero(part < 0)
        shipped = store.take(ids) if len(ids) else np.zeros((0, store.dim), np.float32)
        yield RowBlock(i0, part, store.hashes[i0:i1].copy(), shipped)


def matrix_blocks(x: np.ndarray, block_rows: int) -> Iterator[RowBlock]:
    """A matrix's rows as shipped `RowBlock`s (callers that hold a matrix, such as a screen part)."""
    for i0 in range(0, x.shape[0], block_rows):
        blk = np.ascontiguousarray(x[i0 : i0 + block_rows], np.float32)
        yield RowBlock(i0, np.full(len(blk), -1, np.int64), native.row_hashes(blk, os.cpu_count() or 1), blk)


def _snapshot_head(path: str, n: int) -> str:
    """The first n bytes of `path` as hex, or 'error: why' (what each node's probe reports)."""
    try:
        with open(path, "rb") as f:
            return f.read(n).hex()
    except OSError as e:
        return f"error: {e.strerror or e}"


def probe_snapshot(ray: Any, src: SnapshotRef, say: Callable[[str], object]) -> bool:
    """Whether every alive node reads the driver's snapshot at its path; says which one does not."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(_snapshot_head)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    opts = [
        task.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
        for n in nodes
    ]
    got = ray.get([t.remote(src.path, len(src.head)) for t in opts])
    return _probe_verdict(nodes, got, src, say)


def _probe_verdict(nodes: Sequence[dict], got: Sequence[str], src: SnapshotRef, say: Callable) -> bool:
    for n, h in zip(nodes, got):
        if h != src.head.hex():
            why = h[len("error: ") :] if h.startswith("error: ") else "it holds another file there"
            say(
                f"--ray-match: node {n.get('NodeManagerAddress', '?')} cannot read {src.path} ({why}); "
                "the rows travel through Ray's object store instead"
            )
            return False
    return True


def share(
    ray: Any, rows: np.ndarray | RowStore, block_rows: int, say: Callable[[str], object]
) -> tuple[SnapshotRef | None, list[Any], int]:
    """(snapshot, object refs of the `RowBlock`s, rows shipped) for the rows of a store or matrix."""
    if isinstance(rows, np.ndarray):
        blocks, src = matrix_blocks(rows, block_rows), None
    else:
        where = rows.shared_rows()
        src = None if where is None else SnapshotRef(where[0], where[1], rows.dim)
        if src is not None and not probe_snapshot(ray, src, say):
            src = None
        blocks = store_blocks(rows, block_rows, src, None if where is None else where[2])
    refs, shipped = [], 0
    for blk in blocks:
        shipped += len(blk.shipped)
        refs.append(ray.put(blk))
    return src, refs, shipped

"""Matching on Ray: the tiles of the pair problem as tasks, merged on the driver.

The rows are cut into blocks of `block_rows`. The driver puts one `cluster.rows.RowBlock` per block
in Ray's object store: where the block's rows sit in the DB's snapshot on shared storage, their
checksums, and the values of only the rows the snapshot lacks; no matrix is gathered on the driver.
Self-matching runs the tiles on and above the diagonal, import mode every (x block, y block) tile.
Each task (`match_tile`) reads its two blocks through a `RowStore` on the snapshot (every row
checked) and runs `find_pairs` on them, so it screens and re-checks exactly as a local run does
(the screen's margins hold for any subset of rows, and the re-check is the float64 reference
distance): the union of the tiles is the local answer, pair for pair, equal to `find_pairs_store`'s.
A task asks for one GPU when the cluster has GPUs (the worker's best backend is then a CUDA one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from clipdedup.cluster.rows import RowBlock, SnapshotRef, read_block, share
from clipdedup.cluster.session import RaySession, block_rows_for, task_error
from clipdedup.db.rowstore import RowStore


def match_tile(
    src_a: SnapshotRef | None,
    a: RowBlock,
    src_b: SnapshotRef | None,
    b: RowBlock | None,
    dim: int,
    threshold: float,
    backend: str | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs within one tile, in tile coordinates (runs on a worker).

    Args:
        src_a, a: the row block and the snapshot it is read from; src_b, b: the column block, or
            b None for a diagonal tile (the pairs i < j within `a`).
        dim: D; threshold, backend: as `find_pairs` (the backend is resolved on the worker).

    Returns:
        int64 (P, 2) pairs (row of a, row of b) and float32 (P,) distances.
    """
    from clipdedup.match import find_pairs

    xa = read_block(src_a, a, dim)
    xb = None if b is None else read_block(src_b, b, dim)
    return find_pairs(xa, threshold, y=xb, backend=backend)


def _shape(rows: np.ndarray | RowStore) -> tuple[int, int]:
    if isinstance(rows, RowStore):
        return rows.n, rows.dim
    if rows.ndim != 2:
        raise ValueError("x must be (N, D) and y (M, D) with the same D")
    return rows.shape[0], rows.shape[1]


def find_pairs_ray(
    cluster: RaySession,
    x: np.ndarray | RowStore,
    threshold: float,
    *,
    y: np.ndarray | RowStore | None = None,
    backend: str | None = None,
    progress: Callable[[int], object] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`find_pairs` with the tiles run as Ray tasks; same arguments, same result.

    `x` and `y` may be row stores (db/store_load.py): the tasks then read the rows from the DB's
    snapshot (see `cluster.rows`). Each task asks for one GPU when the cluster has GPUs, else one CPU.
    """
    from clipdedup.match import _check_inputs, _sorted_result  # find_pairs's own checks and order

    x = x if isinstance(x, RowStore) else np.ascontiguousarray(x, np.float32)
    y = y if y is None or isinstance(y, RowStore) else np.ascontiguousarray(y, np.float32)
    (n, d), (m, dy) = _shape(x), _shape(x if y is None else y)
    _check_inputs(
        np.zeros((0, d), np.float32), None if y is None else np.zeros((0, dy), np.float32), threshold
    )
    if n == 0 or m == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    ray = cluster.connect()
    gpu = cluster.gpus() > 0
    br = max(1, cluster.block_rows or block_rows_for(max(n, m), gpu))
    say = cluster.log or (lambda line: None)
    sx, bx, shipped = share(ray, x, br, say)
    sy, by, more = (sx, bx, 0) if y is None else share(ray, y, br, say)
    cluster.shipped_rows = shipped + more
    task = ray.remote(match_tile).options(num_gpus=1 if gpu else 0, num_cpus=0 if gpu else 1)
    offsets: dict[Any, tuple[int, int]] = {}
    for p in range(len(bx)):
        for q in range(p if y is None else 0, len(by)):
            right = None if (y is None and p == q) else by[q]
            ref = task.remote(sx, bx[p], sy, right, d, float(threshold), backend)
            offsets[ref] = (p * br, q * br)
    parts_i, parts_j, parts_d = [], [], []
    pending = list(offsets)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=min(len(pending), 16), timeout=1.0)
            for ref, (pairs, dists) in zip(ready, ray.get(ready)):
                i0, j0 = offsets[ref]
                parts_i.append(pairs[:, 0] + i0)
                parts_j.append(pairs[:, 1] + j0)
                parts_d.append(dists)
            if progress and ready:
                progress(len(ready))
    except Exception as e:
        raise task_error(e) from None
    return _sorted_result(np.concatenate(parts_i), np.concatenate(parts_j), np.concatenate(parts_d))

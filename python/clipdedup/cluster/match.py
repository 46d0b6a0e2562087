"""Matching on Ray: the tiles of the pair problem as tasks, merged on the driver.

The rows are cut into blocks of `block_rows`; each block is put in Ray's object store once, and a
task gets the references of its two blocks (a node fetches only the blocks its tasks touch, once).
Self-matching runs the tiles on and above the diagonal, import mode every (x block, y block) tile.
Each task is `match_tile`: `find_pairs` on its blocks, so it screens and re-checks exactly as a
local run does (the screen's margins hold for any subset of rows, and the re-check is the float64
reference distance), and the union of the tiles is the local answer, pair for pair.

`match_tile` is the only code that runs on a worker; pointing it at another row source (a shared
row store instead of the object store) changes only where `a` and `b` come from.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from clipdedup.cluster.session import RaySession, task_error


def match_tile(
    a: np.ndarray, b: np.ndarray | None, threshold: float, backend: str | None
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs within one tile, in tile coordinates.

    Args:
        a: float32 (n, D) row block; b: (m, D) column block, or None for a diagonal tile (the
            pairs i < j within `a`).
        threshold, backend: as `find_pairs`; the backend is resolved on the worker.

    Returns:
        int64 (P, 2) pairs (row of a, row of b) and float32 (P,) distances.
    """
    from clipdedup.match import find_pairs

    return find_pairs(a, threshold, y=b, backend=backend)


def find_pairs_ray(
    cluster: RaySession,
    x: np.ndarray,
    threshold: float,
    *,
    y: np.ndarray | None = None,
    backend: str | None = None,
    progress: Callable[[int], object] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`find_pairs` with the tiles run as Ray tasks; same arguments, same result.

    Each task asks for one GPU when the cluster has GPUs (the worker's best backend is then a
    CUDA one), else for one CPU.
    """
    from clipdedup.match import _check_inputs, _sorted_result  # find_pairs's own checks and order

    x = np.ascontiguousarray(x, np.float32)
    y = None if y is None else np.ascontiguousarray(y, np.float32)
    _check_inputs(x, y, threshold)
    other = x if y is None else y
    if x.shape[0] == 0 or other.shape[0] == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    ray = cluster.connect()
    br = max(1, cluster.block_rows)
    bx = [ray.put(x[s : s + br]) for s in range(0, x.shape[0], br)]
    by = bx if y is None else [ray.put(y[s : s + br]) for s in range(0, y.shape[0], br)]
    gpu = cluster.gpus() > 0
    task = ray.remote(match_tile).options(num_gpus=1 if gpu else 0, num_cpus=0 if gpu else 1)
    offsets: dict[Any, tuple[int, int]] = {}
    for p in range(len(bx)):
        for q in range(p if y is None else 0, len(by)):
            right = None if (y is None and p == q) else by[q]
            offsets[task.remote(bx[p], right, float(threshold), backend)] = (p * br, q * br)
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

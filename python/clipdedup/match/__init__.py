"""Matching: every pair of rows closer than a euclidean threshold, exactly.

The answer is defined by `exact_distances`: sqrt(sum((float64(a_k) - float64(b_k))^2)) computed from
the float32 inputs. Fast backends screen tiles with a matmul in float32 or lower precision, keep
every pair within the threshold plus a margin derived from the screening precision's rounding-error
bound (`match.screen.bounds`), and re-check those candidates with `exact_distances`. So each backend returns
the reference's pairs, pair for pair, including pairs exactly at the threshold. Memory is
O(N*D + tile + pairs); no N x N matrix is ever built.

Backends (`MATCHERS`, best available first; `clip-image-deduper backends` lists them):
    triton      fused float16 kernel on CUDA (`kernels/pairwise.py`), `triton.py`
    torch-cuda  blocked float16 torch matmuls on CUDA in memory-budget steps, `torch_cuda.py`
    cpu-bf16    blocked bfloat16 torch matmuls on CPUs with fast bf16 (principal-subspace
                pre-screen, `project.py`), `cpu.py`
    cpu-fp32    blocked float32 torch matmuls, `cpu.py`
    reference   float64 row by row, here
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from clipdedup.match.backends import cpu, torch_cuda, triton  # noqa: F401  (register the backends)
from clipdedup.match.core import MATCHERS, exact_distances, recheck
from clipdedup.match.neighbours import nearest_by_name, nearest_within
from clipdedup.match.reference import pairs_ref

__all__ = [
    "MATCHERS",
    "exact_distances",
    "find_pairs",
    "nearest_by_name",
    "nearest_within",
    "pairs_ref",
    "recheck",
]


def _sorted_result(i: np.ndarray, j: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((j, i))
    pairs = np.stack([i[order], j[order]], axis=1).astype(np.int64, copy=False)
    return pairs.reshape(-1, 2), d[order].astype(np.float32)


def _check_inputs(x: np.ndarray, y: np.ndarray | None, threshold: float) -> None:
    if x.ndim != 2 or (y is not None and (y.ndim != 2 or y.shape[1] != x.shape[1])):
        raise ValueError("x must be (N, D) and y (M, D) with the same D")
    if not (threshold >= 0) or math.isinf(threshold):
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold}")


def find_pairs(
    x: np.ndarray,
    threshold: float,
    *,
    y: np.ndarray | None = None,
    backend: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """All pairs of rows within `threshold` (euclidean), exactly as `pairs_ref` defines them.

    Args:
        x: (N, D) embeddings; converted to float32.
        threshold: distance bound, inclusive.
        y: optional (M, D) second set; then pairs are (row of x, row of y), else i < j within x.
        backend: a name from `MATCHERS` (see `clip-image-deduper backends`); default: best
            available, or the `CLIPDEDUP_BACKEND` environment variable.
        progress: called with the number of tiles finished, for progress bars.

    Returns:
        (pairs, distances): int64 (P, 2) and float32 (P,), sorted by (i, j). Rows holding NaN or
        inf have no finite distance and take part in no pair.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = None if y is None else np.ascontiguousarray(y, dtype=np.float32)
    _check_inputs(x, y, threshold)
    threshold = float(threshold)
    fn = MATCHERS.get(backend).fn
    other = x if y is None else y
    if x.shape[0] == 0 or other.shape[0] == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    fx = np.isfinite(x).all(axis=1)
    fy = fx if y is None else np.isfinite(y).all(axis=1)
    if fx.all() and fy.all():
        i, j, d = fn(x, y, threshold, progress=progress)
    else:
        ix, iy = np.flatnonzero(fx), np.flatnonzero(fy)
        if ix.size == 0 or iy.size == 0:
            return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
        sub_y = None if y is None else np.ascontiguousarray(y[iy])
        i, j, d = fn(np.ascontiguousarray(x[ix]), sub_y, threshold, progress=progress)
        i, j = ix[i], iy[j]
    return _sorted_result(np.asarray(i, np.int64), np.asarray(j, np.int64), np.asarray(d))

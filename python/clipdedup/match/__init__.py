"""Matching: every pair of rows closer than a euclidean threshold, exactly.

The answer is defined by `exact_distances`: sqrt(sum((float64(a_k) - float64(b_k))^2)) computed from
the float32 inputs. Fast backends screen tiles with a matmul in float32 or lower precision, keep
every pair within the threshold plus a margin derived from the screening precision's rounding-error
bound (`match.bounds`), and re-check those candidates with `exact_distances`. So each backend returns
the reference's pairs, pair for pair, including pairs exactly at the threshold. Memory is
O(N*D + tile + pairs); no N x N matrix is ever built.

Backends (`MATCHERS`, best available first; `clip-image-deduper backends` lists them):
    triton      fused float16 kernel on CUDA (`kernels/pairwise.py`), `triton.py`
    torch-cuda  blocked float16 torch matmuls on CUDA, `cpu.py` / `torch_screen.py`
    cpu-bf16    blocked bfloat16 torch matmuls on CPUs with fast bf16 (principal-subspace
                pre-screen, `project.py`), `cpu.py`
    cpu-fp32    blocked float32 torch matmuls, `cpu.py`
    reference   float64 row by row, here
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from clipdedup.match import cpu as _match_backends  # noqa: F401  (registers torch backends)
from clipdedup.match import triton as _match_gpu  # noqa: F401  (registers triton)
from clipdedup.match.core import MATCHERS, RECHECK_BYTES, exact_distances, recheck

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


@MATCHERS.register("reference", priority=-100, doc="float64, row by row; slow, always present")
def pairs_ref(
    x: np.ndarray, y: np.ndarray | None, threshold: float, *, progress=None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The definition of the answer: every pair's `exact_distances` compared with the threshold."""
    other = x if y is None else y
    chunk = max(1, RECHECK_BYTES // (8 * max(1, x.shape[1])))
    out_i, out_j, out_d = [], [], []
    for r in range(x.shape[0]):
        start = r + 1 if y is None else 0
        for s in range(start, other.shape[0], chunk):
            cols = np.arange(s, min(other.shape[0], s + chunk))
            d = exact_distances(np.broadcast_to(x[r], (cols.size, x.shape[1])), other[cols])
            m = d <= threshold
            out_i.append(np.full(int(m.sum()), r, np.int64))
            out_j.append(cols[m])
            out_d.append(d[m])
        if progress:
            progress(1)
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_d)


def nearest_within(
    pairs: np.ndarray, distances: np.ndarray, n: int, k: int, *, symmetric: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest neighbours of each row among its pairs (those within the threshold).

    Args:
        pairs: int64 (P, 2) as `find_pairs` returns them; distances: float32 (P,).
        n: number of rows (of x).
        k: neighbours per row (>= 1).
        symmetric: self-matching; pair (i, j) makes j a neighbour of i and i one of j. In import
            mode (pairs of x against y) pass False: neighbours are rows of y.

    Returns:
        int64 (n, k) neighbour indices (-1 where a row has fewer than k) and float32 (n, k)
        distances (inf there), nearest first; ties broken by the smaller index.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    i, j, d = pairs[:, 0], pairs[:, 1], distances
    if symmetric:
        i, j, d = np.concatenate([i, j]), np.concatenate([j, i]), np.concatenate([d, d])
    order = np.lexsort((j, d, i))
    i, j, d = i[order], j[order], d[order]
    starts = np.searchsorted(i, i, side="left")
    rank = np.arange(i.size) - starts
    keep = rank < k
    idx = np.full((n, k), -1, np.int64)
    dist = np.full((n, k), np.inf, np.float32)
    idx[i[keep], rank[keep]] = j[keep]
    dist[i[keep], rank[keep]] = d[keep]
    return idx, dist


def nearest_by_name(
    names: list[str],
    other_names: list[str],
    pairs: np.ndarray,
    distances: np.ndarray,
    k: int,
    *,
    symmetric: bool = True,
) -> dict[str, list[list]]:
    """`nearest_within` as {name: [[neighbour name, distance], ...]} for rows that have any.

    Args:
        names: names of the rows of x; other_names: of y (import mode) or `names` again.
        pairs, distances: as `find_pairs` returns them.
        k: neighbours per row; symmetric: see `nearest_within`.
    """
    idx, dist = nearest_within(pairs, distances, len(names), k, symmetric=symmetric)
    return {
        names[r]: [[other_names[c], float(d)] for c, d in zip(idx[r].tolist(), dist[r].tolist()) if c >= 0]
        for r in np.flatnonzero(idx[:, 0] >= 0).tolist()
    }

"""The k nearest neighbours of each row among the pairs `find_pairs` found (`--top-k`)."""

from __future__ import annotations

import numpy as np


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

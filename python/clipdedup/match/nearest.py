"""Nearest neighbours of sampled rows: how close the closest other image comes (`calibrate`)."""

from __future__ import annotations

from typing import Any

import numpy as np


def nn_distances_ref(x: np.ndarray, rows: np.ndarray, *, with_index: bool = False) -> Any:
    """Reference: float64 distance from each x[rows[k]] to its nearest other row of x, row by row.

    Args:
        x: (N, D) float32 embeddings, N >= 2.
        rows: (S,) int indices into x.
        with_index: also return the nearest row of each (the first of equally near rows).

    Returns:
        (S,) float64 distances; with `with_index`, ((S,) distances, (S,) int64 nearest rows).
    """
    out = np.empty(len(rows))
    idx = np.empty(len(rows), np.int64)
    x64 = x.astype(np.float64)
    for k, r in enumerate(rows):
        d = np.sqrt(((x64 - x64[r]) ** 2).sum(axis=1))
        d[r] = np.inf
        idx[k] = int(np.argmin(d))
        out[k] = d[idx[k]]
    return (out, idx) if with_index else out


def nn_distances(
    x: np.ndarray, rows: np.ndarray, *, chunk: int = 256, shortlist: int = 4, with_index: bool = False
) -> Any:
    """Fast path of `nn_distances_ref`: float32 matmul screening in chunks of queries, then the
    `shortlist` closest candidates of each query re-measured in float64 (as the reference does), so
    rounding in the screen cannot pick a wrong neighbour unless more than `shortlist` rows tie within
    float32 error."""
    import torch

    chunk = max(1, min(chunk, (64 << 20) // max(1, x.shape[0])))  # [chunk, N] float32 <= 256 MB
    xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    sq = (xt * xt).sum(1)
    k = min(shortlist, x.shape[0] - 1)
    out = np.empty(len(rows))
    idx = np.empty(len(rows), np.int64)
    x64 = x.astype(np.float64)
    for s in range(0, len(rows), chunk):
        r = torch.from_numpy(np.asarray(rows[s : s + chunk], np.int64))
        d2 = sq[r, None] + sq[None, :] - 2.0 * (xt[r] @ xt.T)  # [chunk, N]
        d2[torch.arange(len(r)), r] = float("inf")
        cand = np.sort(torch.topk(d2, k, dim=1, largest=False).indices.numpy(), axis=1)  # [chunk, k]
        q = x64[r.numpy()][:, None, :]
        exact = np.sqrt(((x64[cand] - q) ** 2).sum(axis=2))
        best = np.argmin(exact, axis=1)  # the lowest row among equally near ones, as the reference
        out[s : s + len(r)] = exact[np.arange(len(r)), best]
        idx[s : s + len(r)] = cand[np.arange(len(r)), best]
    return (out, idx) if with_index else out

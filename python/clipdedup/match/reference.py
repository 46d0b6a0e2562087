"""The definition of the answer, registered as the `reference` backend: every pair's
`exact_distances` (float64 from the float32 inputs) compared with the threshold, row by row. Slow,
always present; every fast backend is tested against it."""

from __future__ import annotations

import numpy as np

from clipdedup.match.core import MATCHERS, RECHECK_BYTES, exact_distances


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

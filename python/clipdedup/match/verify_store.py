"""Screen-then-verify on rows that stay on disk: `match_verified`'s answer from a `RowStore`.

A model with a verifier (builtin:dct) stores [screen (S dims) | check (V dims)] per image, and only
the screening part takes part in the pair search. So a dedup or import run keeps just that part in
RAM (S floats per image instead of S + V: 143 of 4,367 for builtin:dct), and reads the check parts
of the candidates from the store(s) in bounded chunks of pairs. The pairs, distances, scores and decisions are
`match_verified`'s on the whole matrix (a test compares them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from clipdedup.db.rowstore import RowStore
from clipdedup.match.verify import Verified, Verifier

PAIR_CHUNK = 2048  # candidate pairs scored per step: at most 4,096 rows read (72 MB at 4,367 floats)


def match_verified_store(
    store: RowStore,
    threshold: float,
    verifier: Verifier,
    *,
    y: RowStore | None = None,
    find: Callable[..., tuple[np.ndarray, np.ndarray]] | None = None,
    min_score: float | None = None,
    chunk: int = PAIR_CHUNK,
    **find_kw: Any,
) -> Verified:
    """`match_verified(store.to_matrix(), ..., y=y.to_matrix())` with only the screening parts in RAM.

    Args:
        store: the rows of a model with a verifier; y: a second set (import mode), pairs (row of
            store, row of y); None: pairs within store.
        threshold: screening distance bound (inclusive); min_score: overrides `verifier.min_score`.
        chunk: candidate pairs scored per step (bounds the check rows read at once).
        find, find_kw: the pair search and its options (default `clipdedup.match.find_pairs`).
    """
    if find is None:
        from clipdedup.match import find_pairs

        find = find_pairs
    s = verifier.screen_dims
    t = time.perf_counter()
    xs = store.to_matrix(s)
    ys = None if y is None else y.to_matrix(s)
    pairs, dists = find(xs, threshold, y=ys, **find_kw)
    del xs, ys
    t1 = time.perf_counter()
    ms = verifier.min_score if min_score is None else float(min_score)
    scores = np.empty(len(pairs), np.float64)
    if y is None:
        buf = np.empty((min(2 * chunk, max(store.n, 1)), store.dim), np.float32)
        for at in range(0, len(pairs), chunk):
            part = pairs[at : at + chunk]
            need = np.unique(part)
            check = np.ascontiguousarray(store.take(need, buf)[:, s:])
            scores[at : at + len(part)] = verifier.scores(check, check, np.searchsorted(need, part))
    else:
        bufs = [np.empty((min(chunk, max(st.n, 1)), st.dim), np.float32) for st in (store, y)]
        for at in range(0, len(pairs), chunk):
            part = pairs[at : at + chunk]
            checks, local = [], np.empty_like(part)
            for side, (st, buf) in enumerate(zip((store, y), bufs)):
                need = np.unique(part[:, side])
                checks.append(np.ascontiguousarray(st.take(need, buf)[:, s:]))
                local[:, side] = np.searchsorted(need, part[:, side])
            scores[at : at + len(part)] = verifier.scores(checks[0], checks[1], local)
    t2 = time.perf_counter()
    return Verified(
        pairs, dists, scores, scores >= ms, ms, verifier.measure, {"screen": t1 - t, "verify": t2 - t1}
    )

"""Screen-then-verify on rows that stay on disk: `match_verified`'s answer from a `RowStore`.

A model with a verifier (builtin:dct) stores [screen (S dims) | check (V dims)] per image, and only
the screening part takes part in the pair search. So a dedup or import run keeps just that part in
RAM (S floats per image instead of S + V: 143 of 4,367 for builtin:dct), and reads the check parts
of the candidates from the store(s) in bounded chunks of pairs. The pairs, distances, scores and
decisions are `match_verified`'s on the whole matrix (a test compares them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from clipdedup.db.rowstore import RowStore
from clipdedup.match.verify.verifier import Verified, Verifier

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
    scores = score_pairs(store, pairs, verifier, y=y, chunk=chunk)
    t2 = time.perf_counter()
    return Verified(
        pairs, dists, scores, scores >= ms, ms, verifier.measure, {"screen": t1 - t, "verify": t2 - t1}
    )


def score_pairs(
    store: RowStore,
    pairs: np.ndarray,
    verifier: Verifier,
    *,
    y: RowStore | None = None,
    chunk: int = PAIR_CHUNK,
) -> np.ndarray:
    """float64 (P,) check scores of `pairs` (rows of store, rows of y; y None: both of store), the
    check parts read from the store(s) `chunk` pairs at a time."""
    s = verifier.screen_dims
    scores = np.empty(len(pairs), np.float64)
    # One buffer per store: within one store both sides of a chunk share one read of their rows (up to
    # 2 * chunk of them); with two, each side reads up to chunk rows from its own.
    per, sides = (2 * chunk, [store]) if y is None else (chunk, [store, y])
    bufs = [np.empty((min(per, max(st.n, 1)), st.dim), np.float32) for st in sides]
    for at in range(0, len(pairs), chunk):
        part = pairs[at : at + chunk]
        if y is None:
            check, local = _checks(store, part, bufs[0], s)
            scores[at : at + len(part)] = verifier.scores(check, check, local)
        else:
            ca, la = _checks(store, part[:, 0], bufs[0], s)
            cb, lb = _checks(y, part[:, 1], bufs[1], s)
            scores[at : at + len(part)] = verifier.scores(ca, cb, np.stack([la, lb], axis=1))
    return scores


def _checks(st: RowStore, rows: np.ndarray, buf: np.ndarray, s: int) -> tuple[np.ndarray, np.ndarray]:
    """The check parts (columns s on) of the distinct rows named in `rows`, read once each, and
    `rows` as positions in them."""
    need = np.unique(rows)
    return np.ascontiguousarray(st.take(need, buf)[:, s:]), np.searchsorted(need, rows)

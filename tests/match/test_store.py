"""Matching a row store (match/store.py) against find_pairs and the float64 reference: same pairs,
same distances bit for bit, on random inputs, awkward sizes, rows at the rounding edge, NaN/inf
rows, the full-row fallback and matching only some rows."""

from __future__ import annotations

import numpy as np
import pytest

from clipdedup.db.rowstore import store_of_matrix
from clipdedup.match import exact_distances, find_pairs
from clipdedup.match.store import find_pairs_store, match_tile, screen_store, tile_count
from helpers import bf16_edge_pairs, planted, threshold_on_a_pair


def ref(x, t):
    return find_pairs(x, t, backend="reference")


def assert_same(got, want):
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])  # distances from one function: bit for bit


def store_pairs(x, t, seen=True, **kw):
    with store_of_matrix(x) as st:
        if not seen:
            st.seen = None  # as a store opened without a pass over its rows: the screen makes its own
        pairs, d = find_pairs_store(st, t, **kw)
    assert d.dtype == np.float64
    return pairs, d.astype(np.float32)


def touching(want, rows):
    """The pairs of a full answer with an end among `rows`."""
    sel = np.isin(want[0][:, 0], rows) | np.isin(want[0][:, 1], rows)
    return want[0][sel], want[1][sel]


@pytest.mark.parametrize("recipe", ["bfloat16", "float32"])
@pytest.mark.parametrize(
    "n,d,k,block",
    [(0, 8, 4, 64), (1, 8, 4, 64), (2, 37, 8, 64), (63, 100, 16, 64), (65, 300, 32, 64), (130, 17, 4, 64)],
)
def test_store_matches_reference(recipe, n, d, k, block):
    x = planted(n, d, seed=n * 1000 + d)
    t = threshold_on_a_pair(x) if n > 1 else 1.0  # one pair exactly at the threshold
    want = ref(x, t)
    assert_same(store_pairs(x, t, recipe=recipe, k=k, block=block), want)
    assert_same(store_pairs(x, t, recipe=recipe, k=k, block=block, max_candidates=-1), want)  # full rows
    assert_same(store_pairs(x, t, recipe=recipe, k=d, block=block), want)  # no projection
    assert_same(store_pairs(x, t, recipe=recipe, k=k, block=block, seen=False), want)
    rng = np.random.default_rng(n)
    rows = np.sort(rng.choice(n, n // 3, replace=False)) if n else np.zeros(0, np.int64)
    assert_same(store_pairs(x, t, recipe=recipe, k=k, block=block, rows=rows), touching(want, rows))


@pytest.mark.parametrize("recipe", ["bfloat16", "int16", "float32"])
def test_store_matches_find_pairs_at_d1280(recipe):
    x = planted(700, 1280, seed=3, frac=0.3)
    near, _ = find_pairs(x, 0.05 * np.sqrt(1280) * 1.01)  # the planted copies, by the best backend here
    a, b = near[len(near) // 2]
    t = float(exact_distances(x[a : a + 1], x[b : b + 1])[0])  # one pair exactly at the threshold
    want = find_pairs(x, t)
    assert len(want[0]) > 50 and (a, b) in set(map(tuple, want[0].tolist()))
    assert_same(store_pairs(x, t, recipe=recipe, block=256), want)
    got = store_pairs(x, t, recipe=recipe, block=256, rows=np.arange(690, 700))
    assert_same(got, touching(want, np.arange(690, 700)))


def test_store_bf16_margin_edge():
    rows, ts = bf16_edge_pairs(300, 4, seed=8)
    for (a, b), t in zip(rows, ts):
        filler = planted(40, 300, seed=9, frac=0.0) * 3
        x = np.vstack([filler[:20], a, filler[20:], b]).astype(np.float32)
        for kw in ({}, {"max_candidates": -1}, {"k": 300}, {"rows": np.array([41])}):
            got = store_pairs(x, t, **({"k": 32, "block": 16} | kw))
            assert (20, 41) in set(map(tuple, got[0].tolist())), kw
            want = ref(x, t)
            assert_same(got, want if "rows" not in kw else touching(want, [41]))


def test_store_nan_inf_and_identical_rows():
    x = planted(90, 40, seed=5)
    x[[3, 50]] = np.nan
    x[7, 2] = np.inf
    x[60:75] = x[60]  # identical rows: every pair among them, and a crowded screen
    t = threshold_on_a_pair(np.nan_to_num(x, posinf=0), q=0.02)
    want = ref(x, t)
    for kw in (
        {},
        {"seen": False},
        {"max_candidates": -1},
        {"max_candidates": 5},
        {"rows": np.array([3, 7, 61, 89])},
    ):
        w = want if "rows" not in kw else touching(want, kw["rows"])
        assert_same(store_pairs(x, t, k=8, block=32, **kw), w)


def test_tiles_and_count():
    x = planted(100, 24, seed=1)
    t = threshold_on_a_pair(x, q=0.1)
    seen = []
    store_pairs(x, t, k=8, block=32, progress=seen.append)
    assert len(seen) == tile_count(100, None, 32) == 10
    seen.clear()
    store_pairs(x, t, k=8, block=32, rows=np.arange(40), progress=seen.append)
    assert len(seen) == tile_count(100, 40, 32) == 8


@pytest.mark.parametrize("recipe", ["bfloat16", "int16", "float32"])
def test_match_tile_is_a_unit_of_work(recipe):
    """Tiles of the upper triangle, matched one by one (as a worker would), give the whole answer."""
    x = planted(150, 48, seed=2)
    t = threshold_on_a_pair(x, q=0.05)
    with store_of_matrix(x) as st:
        scr = screen_store(st, t, recipe, k=8)
        parts = [
            match_tile(st, scr, np.arange(i0, min(150, i0 + 50)), j0, min(150, j0 + 50))
            for i0 in range(0, 150, 50)
            for j0 in range(i0, 150, 50)
        ]
    i, j, d = (np.concatenate(p) for p in zip(*parts))
    order = np.lexsort((j, i))
    assert_same((np.stack([i, j], 1)[order], d[order].astype(np.float32)), ref(x, t))


def test_bad_threshold():
    with store_of_matrix(np.zeros((3, 4), np.float32)) as st, pytest.raises(ValueError):
        find_pairs_store(st, float("nan"))

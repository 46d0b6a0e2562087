"""The integer screen (match/screen/int_screen.py, csrc/int_screen.cpp): the native kernel of every
instruction set against its int64 numpy definition, the thresholds' soundness at the rounding edge,
and `cpu-int16` / the int16 row-store recipe against the float64 reference, pair for pair."""

from __future__ import annotations

import numpy as np
import pytest

from clipdedup import native
from clipdedup.db.rowstore import store_of_matrix
from clipdedup.match import MATCHERS, find_pairs
from clipdedup.match.backends.cpu import pairs_cpu_int16
from clipdedup.match.screen import int_screen as isc
from clipdedup.match.store import find_pairs_store
from helpers import planted, threshold_on_a_pair

ISAS = native.int_screen_isas()


def ref(x, t, y=None):
    return find_pairs(x, t, y=y, backend="reference")


def as_set(r, q):
    return set(zip(np.asarray(r).tolist(), np.asarray(q).tolist()))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    "n,m,k,upper",
    [
        (0, 5, 4, False),
        (1, 1, 2, False),
        (3, 17, 6, False),
        (4, 16, 128, True),
        (5, 15, 130, True),
        (63, 65, 128, False),
        (65, 63, 34, True),
        (130, 200, 2, True),
    ],
)
def test_native_equals_definition(isa, n, m, k, upper):
    rng = np.random.default_rng(n * 7 + m + k)
    lim = 16384  # the largest |q| the scale allows
    a = rng.integers(-lim, lim + 1, (n, k)).astype(np.int16)
    b = rng.integers(-lim, lim + 1, (m, k)).astype(np.int16)
    a = (a // max(1, int(np.sqrt(k)))).astype(np.int16)  # norms <= 2^14: dots stay inside int32
    b = (b // max(1, int(np.sqrt(k)))).astype(np.int16)
    dots = a.astype(np.int64) @ b.astype(np.int64).T
    med = int(np.median(dots)) if dots.size else 0
    ta = (med // 2 + rng.integers(-(1 << 20), 1 << 20, n)).astype(np.int32)
    tb = (med // 2 + rng.integers(-(1 << 20), 1 << 20, m)).astype(np.int32)
    if n and m:  # pairs exactly at their threshold are kept (>=, not >)
        ta[0] = dots[0, 0] - tb[0]
        ta[-1] = dots[-1, -1] - tb[-1]
    kw = dict(upper=upper, row_base=3, col_base=1)
    want = isc.int16_screen_ref(a, b, ta, tb, **kw)
    got = isc.int16_screen(a, b, ta, tb, isa_name=isa, threads=2, **kw)
    assert as_set(*got) == as_set(*want)
    assert len(got[0]) == len(want[0])  # no pair twice


@pytest.mark.parametrize("isa", ISAS)
def test_native_extremes_and_giving_up(isa):
    k = 64
    a = np.full((9, k), 2047, np.int16)
    a[1::2] = -2048
    ta = np.full(9, -(1 << 30), np.int32)  # the clamp: ta + tb = -2^31, every pair is kept
    r, q = isc.int16_screen(a, a, ta, ta, isa_name=isa)
    assert len(r) == 81
    with pytest.raises(isc.TooManyHits):
        isc.int16_screen(a, a, ta, ta, isa_name=isa, max_hits=80)
    none = np.full(9, isc.TAU_NONE, np.int32)
    assert len(isc.int16_screen(a, a, none, none, isa_name=isa)[0]) == 0
    with pytest.raises(ValueError):
        native.int16_screen(
            a[:, :3], a[:, :3], ta, ta, 0, 0, False, np.empty(1, np.int64), np.empty(1, np.int64), isa, 1
        )


def test_unknown_isa_is_refused():
    a = np.zeros((1, 2), np.int16)
    t = np.zeros(1, np.int32)
    with pytest.raises(ValueError, match="not available"):
        isc.int16_screen(a, a, t, t, isa_name="sse9")


@pytest.mark.parametrize("d", [2, 33, 128])
def test_thresholds_keep_every_pair_at_the_edge(d):
    """Pairs placed exactly at the screened distance t pass the screen (the bound is not loose by
    accident: the kept fraction of far pairs is small too)."""
    rng = np.random.default_rng(d)
    a = rng.standard_normal((400, d)).astype(np.float32)
    step = rng.standard_normal((400, d)).astype(np.float32)
    b = a + 0.05 * step / np.linalg.norm(step, axis=1, keepdims=True)
    t = float(np.max(np.linalg.norm(a.astype(np.float64) - b, axis=1)))
    x = np.concatenate([a, b])
    cand = isc.int16_candidates(x, None, t)
    assert cand is not None
    got = as_set(*cand)
    assert all((i, i + 400) in got for i in range(400))
    assert len(got) < 0.05 * len(x) ** 2 / 2


def test_isa_follows_the_mask(monkeypatch):
    monkeypatch.setenv("CLIPDEDUP_CPU_MASK", "avx2")
    assert isc.isa() == "generic"
    assert "avx2" in MATCHERS.entries["cpu-int16"].unavailable_reason()


@pytest.mark.parametrize("project", [False, True])
@pytest.mark.parametrize("n,d", [(0, 8), (1, 8), (2, 37), (63, 100), (65, 300), (130, 17), (300, 256)])
def test_cpu_int16_equals_reference(n, d, project, monkeypatch):
    x = planted(n, d, seed=n + d)
    if n > 10:
        x[4] = x[2]  # identical rows
        x[8] = np.nan
    t = threshold_on_a_pair(x[np.isfinite(x).all(1)]) if n > 1 else 1.0
    want = ref(x, t)
    for isa in ISAS:
        monkeypatch.setenv("CLIPDEDUP_CPU_MASK", "" if isa == "avx2" else "avx2")
        fin = np.isfinite(x).all(1)
        xi = x[fin]
        i, j, dd = pairs_cpu_int16(xi, None, t, project=project and d > 32, project_dim=16)
        ids = np.flatnonzero(fin)
        got = sorted(zip(ids[i].tolist(), ids[j].tolist()))
        assert got == [tuple(p) for p in want[0].tolist()]
        y = planted(max(1, n // 2), d, seed=d)
        got_y = pairs_cpu_int16(xi, y, t, project=project and d > 32, project_dim=16, max_candidates=5)
        want_y = ref(xi, t, y=y)
        assert sorted(zip(got_y[0].tolist(), got_y[1].tolist())) == [tuple(p) for p in want_y[0].tolist()]


@pytest.mark.parametrize(
    "n,d,k,block",
    [(0, 8, 4, 64), (1, 8, 4, 64), (2, 37, 8, 64), (65, 300, 32, 64), (130, 17, 4, 64), (200, 33, 33, 48)],
)
def test_int16_store_recipe_equals_reference(n, d, k, block):
    x = planted(n, d, seed=n * 1000 + d)
    if n > 10:
        x[3] = np.inf
    fin = np.isfinite(x).all(1)
    t = threshold_on_a_pair(x[fin]) if n > 1 else 1.0
    want = ref(x, t)
    with store_of_matrix(x) as st:
        for kw in (dict(k=k), dict(k=k, max_candidates=-1), dict(k=d)):
            pairs, dist = find_pairs_store(st, t, recipe="int16", block=block, **kw)
            np.testing.assert_array_equal(pairs, want[0])
            np.testing.assert_array_equal(dist.astype(np.float32), want[1])
        rows = np.arange(0, n, 3)
        pairs, _ = find_pairs_store(st, t, recipe="int16", k=k, block=block, rows=rows)
        sel = np.isin(want[0][:, 0], rows) | np.isin(want[0][:, 1], rows)
        np.testing.assert_array_equal(pairs, want[0][sel])


@pytest.mark.parametrize("isa", ISAS)
def test_buffers_grow_until_the_answer_fits(isa, monkeypatch):
    """A first buffer smaller than the answer: the screen runs again with room for it (never a
    buffer of n * m pairs up front), and still gives up beyond max_hits."""
    monkeypatch.setattr(isc, "FIRST_CAP", 3)
    rng = np.random.default_rng(9)
    a = rng.integers(-100, 100, (40, 8)).astype(np.int16)
    t = np.full(40, -(1 << 30), np.int32)
    r, q = isc.int16_screen(a, a, t, t, isa_name=isa)
    assert sorted(zip(r.tolist(), q.tolist())) == [(i, j) for i in range(40) for j in range(40)]
    with pytest.raises(isc.TooManyHits):
        isc.int16_screen(a, a, t, t, isa_name=isa, max_hits=1599)
    assert len(isc.int16_screen(a, a, t, t, isa_name=isa, max_hits=1600)[0]) == 1600

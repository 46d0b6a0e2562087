"""Screen-then-verify on a row store (match/verify/store.py) gives `match_verified`'s answer on the
matrix: the same candidates, distances, scores and decisions, for any chunking of the candidates,
within one store and between two (import mode); and a builtin:dct dedup run of real images keeps
only the screening part in RAM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clipdedup.db.rowstore import store_of_matrix
from clipdedup.ingest.encode.dct import CHECK_DIM, SCREEN_DIM, VERIFIER
from clipdedup.match.verify.store import match_verified_store
from clipdedup.match.verify.verifier import match_verified
from helpers import cpu_backends


def rows(n: int, seed: int) -> np.ndarray:
    """n rows of builtin:dct's width: unit screening parts with near copies, check parts that are
    near for near rows (so scores spread around the decision)."""
    rng = np.random.default_rng(seed)
    s = VERIFIER.screen_dims
    width = SCREEN_DIM + CHECK_DIM
    x = rng.standard_normal((n, width)).astype(np.float32)
    for i in range(1, n, 3):
        x[i] = x[rng.integers(0, i)] + rng.uniform(0.01, 0.4) * rng.standard_normal(width)
    x[:, :s] /= np.linalg.norm(x[:, :s], axis=1, keepdims=True)
    return x


@pytest.mark.parametrize("backend", cpu_backends(), indirect=True)
@pytest.mark.parametrize("n,chunk", [(0, 5), (1, 5), (40, 1), (150, 7), (400, 8192)])
def test_store_answer_equals_the_matrix_answer(n: int, chunk: int, backend: str) -> None:
    x = rows(n, seed=n)
    t = 0.9
    scores = match_verified(x, t, VERIFIER).scores
    ms = float(np.median(scores)) if len(scores) else None  # a bar that splits the candidates
    want = match_verified(x, t, VERIFIER, min_score=ms, backend=backend)
    with store_of_matrix(x, block_rows=64) as st:
        np.testing.assert_array_equal(st.to_matrix(VERIFIER.screen_dims), x[:, : VERIFIER.screen_dims])
        got = match_verified_store(st, t, VERIFIER, min_score=ms, chunk=chunk, backend=backend)
    assert n < 40 or len(want.pairs) > 10 and 0 < want.confirmed.sum() < len(want.pairs)
    np.testing.assert_array_equal(got.pairs, want.pairs)
    np.testing.assert_array_equal(got.distances, want.distances)
    np.testing.assert_array_equal(got.scores, want.scores)
    np.testing.assert_array_equal(got.confirmed, want.confirmed)
    assert got.min_score == want.min_score and got.measure == want.measure


@pytest.mark.parametrize("backend", cpu_backends(), indirect=True)
@pytest.mark.parametrize("n,m,chunk", [(0, 3, 5), (3, 0, 5), (60, 45, 1), (150, 90, 7), (200, 120, 8192)])
def test_two_store_answer_equals_the_matrix_answer(n: int, m: int, chunk: int, backend: str) -> None:
    """Import mode: pairs (row of x, row of y), the check parts read from each side's store."""
    both = rows(n + m, seed=n + m)
    x, y = both[:n], both[n:]
    t = 0.9
    scores = match_verified(x, t, VERIFIER, y=y).scores
    ms = float(np.median(scores)) if len(scores) else None
    want = match_verified(x, t, VERIFIER, y=y, min_score=ms, backend=backend)
    with store_of_matrix(x, block_rows=64) as sx, store_of_matrix(y, block_rows=32) as sy:
        got = match_verified_store(sx, t, VERIFIER, y=sy, min_score=ms, chunk=chunk, backend=backend)
    assert n < 60 or len(want.pairs) > 10 and 0 < want.confirmed.sum() < len(want.pairs)
    np.testing.assert_array_equal(got.pairs, want.pairs)
    np.testing.assert_array_equal(got.distances, want.distances)
    np.testing.assert_array_equal(got.scores, want.scores)
    np.testing.assert_array_equal(got.confirmed, want.confirmed)


def test_a_dct_run_reads_the_check_parts_from_the_store(pics: Path, tmp_path: Path, monkeypatch) -> None:
    """The run never builds the matrix, and its candidates and decisions are the matrix path's."""
    from clipdedup import load_db
    from clipdedup.db.rowstore import RowStore
    from clipdedup.ingest.update import update_db
    from clipdedup.pipeline import RunOptions, run_dedup

    db = tmp_path / "db"
    update_db(pics, db, "builtin:dct", log=lambda line: None)

    whole = RowStore.to_matrix

    def no_matrix(self, dims=None):
        if dims is None or dims >= self.dim:
            raise AssertionError("a builtin:dct run built the whole matrix")
        return whole(self, dims)

    monkeypatch.setattr(RowStore, "to_matrix", no_matrix)
    s = run_dedup(str(pics), str(db), None, RunOptions(skip_update=True, dry_run=True, log=print))
    monkeypatch.undo()
    assert s.verification is not None
    got = {(c.a, c.b, c.distance, c.score, c.confirmed) for c in s.verification.candidates}
    names, x = load_db(db)
    v = match_verified(x, s.threshold, VERIFIER)
    want = {
        (names[i], names[j], float(d), float(sc), bool(ok))
        for (i, j), d, sc, ok in zip(v.pairs.tolist(), v.distances, v.scores, v.confirmed)
    }
    assert got == want and sum(c[4] for c in got) > 0

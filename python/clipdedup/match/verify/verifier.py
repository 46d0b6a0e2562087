"""Verification of screened candidates: a second, independent measure on the two images of a pair.

A model-free screening descriptor (builtin:dct) catches near-duplicates with a loose threshold, but
in a real collection many distinct images (skies, gradients, dark wallpapers, shots of one series)
come within it, and more of them the larger the collection. So its candidates are confirmed by a
second measure that looks at the images differently, and only confirmed pairs are duplicates.

Where the second measure comes from: the encoder stores it in the same embedding, after the
screening part: row = [screen (S dims) | check (V dims)], one `.npy` per image as for every model.
That keeps one file per image in the DB mirror (a second file beside `a.jpg.npy` would look like an
embedding of an image `a.jpg.<x>` to this tool's orphan clean-up and to the original tool), makes
verification cost O(candidates * V) with no image decoded again, and works with `--skip-update`, in
import mode against a read-only base DB, and on images that have since been moved to the trash.
The DB metadata records the model and the full dim, so a DB of another layout is refused, never
misread.

Contract: `Verifier.split(x)` -> (screen, check) views; the matcher sees `screen` only;
`Verifier.scores(check_a, check_b, pairs)` gives one float64 score per candidate pair (the model's
`score`, its fast path; `score_ref` is the plain definition and tests compare the two), and a pair
is confirmed when score >= `Verifier.min_score`. builtin:dct's measure is
clipdedup.match.verify.warp_check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clipdedup.records import CandidatePair, Verification

ScoreFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Verifier:
    """How a model's rows split into screening and check parts, and when a candidate is confirmed."""

    screen_dims: int  # leading dims of each row: the screening descriptor (unit norm)
    min_score: float  # a candidate is confirmed when its score >= this
    measure: str  # what the score is, for reports
    # (check_a (N, V), check_b (M, V), pairs (P, 2) rows of a and b) -> (P,) float64 scores: the fast
    # path and the plain definition it must equal.
    score: ScoreFn
    score_ref: ScoreFn

    def scores(self, a: np.ndarray, b: np.ndarray, pairs: np.ndarray) -> np.ndarray:
        """(P,) float64 scores of pairs (rows of a, rows of b) of check parts."""
        pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
        a = np.ascontiguousarray(a, np.float32)
        b = a if b is a else np.ascontiguousarray(b, np.float32)
        return np.asarray(self.score(a, b, pairs), np.float64)

    def split(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, S + V) rows -> (N, S) screening part, (N, V) check part (both float32, contiguous)."""
        x = np.asarray(x, np.float32)
        s = self.screen_dims
        return np.ascontiguousarray(x[:, :s]), np.ascontiguousarray(x[:, s:])


@dataclass
class Verified:
    """Screened candidates and what verification made of them (rows as the matcher numbered them)."""

    pairs: np.ndarray  # (P, 2) int64 candidate pairs within the screening threshold
    distances: np.ndarray  # (P,) float32 screening distances
    scores: np.ndarray  # (P,) float64 check scores
    confirmed: np.ndarray  # (P,) bool: score >= min_score
    min_score: float
    measure: str
    seconds: dict[str, float] = field(default_factory=dict)

    def record(self, name_a: Callable[[int], str], name_b: Callable[[int], str]) -> Verification:
        """The run's record of it: every candidate by name (rows named by `name_a`, `name_b`)."""
        rows = zip(
            self.pairs.tolist(), self.distances.tolist(), self.scores.tolist(), self.confirmed.tolist()
        )
        cands = [CandidatePair(name_a(a), name_b(b), d, sc, ok) for (a, b), d, sc, ok in rows]
        return Verification(self.measure, self.min_score, self.seconds.get("verify", 0.0), cands)


def match_verified(
    x: np.ndarray,
    threshold: float,
    verifier: Verifier,
    *,
    y: np.ndarray | None = None,
    find: Callable[..., tuple[np.ndarray, np.ndarray]] | None = None,
    min_score: float | None = None,
    **find_kw: Any,
) -> Verified:
    """Screens with `find` (default `clipdedup.match.find_pairs`) on the screening part of the rows,
    then scores each candidate with the check part.

    Args:
        x: (N, S + V) rows of a model with a verifier; y: optional (M, S + V) second set.
        threshold: screening distance bound (inclusive).
        min_score: overrides `verifier.min_score`.
    """
    import time

    if find is None:
        from clipdedup.match import find_pairs

        find = find_pairs
    xs, xc = verifier.split(x)
    ys, yc = (None, xc) if y is None else verifier.split(y)
    t = time.perf_counter()
    pairs, dists = find(xs, threshold, y=ys, **find_kw)
    t1 = time.perf_counter()
    ms = verifier.min_score if min_score is None else float(min_score)
    scores = verifier.scores(xc, yc, pairs)
    t2 = time.perf_counter()
    return Verified(
        pairs, dists, scores, scores >= ms, ms, verifier.measure, {"screen": t1 - t, "verify": t2 - t1}
    )

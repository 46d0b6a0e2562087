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
`verify_scores(check_a, check_b, pairs, required_dims, shift=, margin=)` gives one score per
candidate pair (float64, see `Verifier`), and a pair is confirmed when score >= `Verifier.min_score`.
`verify_scores_ref` is the plain per-pair definition; tests compare the two. `match_verified`
scores the moved windows in float32 (`fast=True`, within RECHECK of float64) and scores again in
float64 every pair within RECHECK of the minimum, so its decisions are the reference's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clipdedup.records import CandidatePair, Verification

CHUNK = 1 << 9  # candidate pairs scored per step: 2 * CHUNK * V floats gathered (cache-sized)
FLAT = 1e-6  # norm below which a (unit-norm row's) window counts as flat
# Bound on |float32 - float64| of a moved-window score: sums of <= 1,024 products of unit-norm
# segments' entries (float32 rounding ~6e-8 per term, ~1e-6 in practice); a float32 score this close
# to the minimum is scored again in float64.
RECHECK = 1e-3


@dataclass(frozen=True)
class Verifier:
    """How a model's rows split into screening and check parts, and when a candidate is confirmed.

    The check part is [required (`required_dims`) | optional (the rest)], each segment unit norm or
    all zero. The score of a pair is the smaller of the two segments' scores, where:
    - required: both zero counts 1 (the same flat image), one zero counts 0; otherwise its cosine,
      or, with `shift` > 0, the segment is an n x n image (n*n = required_dims) and the score is
      the largest normalised correlation of the first side's central window (`margin` cut from
      each edge) with the second side's window moved by dy, dx in [-shift, shift] (each window
      centred and scaled on its own; a flat window correlates 1 with a flat one, 0 otherwise):
      a crop of a few percent moves the picture by about a thumbnail pixel;
    - optional: its cosine, skipped (counts 1) when either side is zero: builtin:dct's colour
      segment is zero for a grey image, so a greyscale copy is judged on brightness alone.
    """

    screen_dims: int  # leading dims of each row: the screening descriptor (unit norm)
    required_dims: int  # first dims of the check part
    min_score: float  # a candidate is confirmed when its score >= this
    measure: str  # what the score is, for reports
    shift: int = 0  # largest window move (pixels) of the required segment; 0: plain cosine
    margin: int = 0  # pixels cut from each edge of the first side's window; >= shift

    def scores(self, a: np.ndarray, b: np.ndarray, pairs: np.ndarray, *, fast: bool = False) -> np.ndarray:
        """`verify_scores` with this verifier's segments."""
        r, shift, margin = self.required_dims, self.shift, self.margin
        return verify_scores(a, b, pairs, r, shift=shift, margin=margin, fast=fast)

    def decided_scores(self, a: np.ndarray, b: np.ndarray, pairs: np.ndarray, min_score: float) -> np.ndarray:
        """`scores` by the fast path, those within RECHECK of `min_score` scored again in float64, so
        that `>= min_score` decides as the float64 definition does."""
        scores = self.scores(a, b, pairs, fast=True)
        near = np.abs(scores - min_score) <= RECHECK
        scores[near] = self.scores(a, b, pairs[near])
        return scores

    def split(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, S + V) rows -> (N, S) screening part, (N, V) check part (both float32, contiguous)."""
        x = np.asarray(x, np.float32)
        s = self.screen_dims
        return np.ascontiguousarray(x[:, :s]), np.ascontiguousarray(x[:, s:])


def _cos_ref(u: list[float], v: list[float], *, optional: bool) -> float:
    zu, zv = not any(u), not any(v)
    if zu or zv:
        return 1.0 if (optional or (zu and zv)) else 0.0
    s = 0.0
    for p, q in zip(u, v):
        s += p * q
    return s


def _corr_ref(u: list[float], v: list[float]) -> float:
    """Normalised correlation of two windows, written out; flat windows as `Verifier` says."""
    mu, mv = sum(u) / len(u), sum(v) / len(v)
    du, dv = [t - mu for t in u], [t - mv for t in v]
    nu, nv = math.sqrt(sum(t * t for t in du)), math.sqrt(sum(t * t for t in dv))
    if nu <= FLAT or nv <= FLAT:
        return 1.0 if (nu <= FLAT and nv <= FLAT) else 0.0
    return sum(p * q for p, q in zip(du, dv)) / (nu * nv)


def _shifted_ref(u: list[float], v: list[float], shift: int, margin: int) -> float:
    if not any(u) or not any(v):
        return 1.0 if not (any(u) or any(v)) else 0.0
    n = math.isqrt(len(u))
    rows = range(margin, n - margin)
    win = [u[i * n + j] for i in rows for j in rows]
    best = -1.0
    for dy in range(-shift, shift + 1):
        for dx in range(-shift, shift + 1):
            moved = [v[(i + dy) * n + j + dx] for i in rows for j in rows]
            best = max(best, _corr_ref(win, moved))
    return best


def verify_scores_ref(
    a: np.ndarray, b: np.ndarray, pairs: np.ndarray, required_dims: int, *, shift: int = 0, margin: int = 0
) -> np.ndarray:
    """Reference: each pair's score as `Verifier` defines it, in float64, term by term.

    Args:
        a: (N, V) check parts of the first side.
        b: (M, V) check parts of the second side (b is a for pairs within one set).
        pairs: (P, 2) int row indices into a and b.
        required_dims: length of the required segment (n*n when shift > 0).
        shift, margin: `Verifier.shift`, `Verifier.margin`.

    Returns:
        (P,) float64 scores in [-1, 1].
    """
    r = required_dims
    out = np.zeros(len(pairs))
    for p, (i, j) in enumerate(np.asarray(pairs, np.int64).tolist()):
        u, v = a[i].tolist(), b[j].tolist()
        if shift > 0:
            req = _shifted_ref(u[:r], v[:r], shift, margin)
        else:
            req = _cos_ref(u[:r], v[:r], optional=False)
        out[p] = min(req, _cos_ref(u[r:], v[r:], optional=True))
    return out


def _shifted_scores(u: np.ndarray, v: np.ndarray, shift: int, margin: int) -> np.ndarray:
    """Fast path of `_shifted_ref` for a chunk: (P, n*n) sides -> (P,) float64 scores, computed in
    the sides' dtype (float64, or float32 at about twice the speed). The first side's window is
    centred once; per move, the moved window is copied contiguous (einsum on a strided view is
    several times slower) and centred before its norm is taken (a sum of squares minus the squared
    sum would cancel in float32 and make a flat window look textured)."""
    n = math.isqrt(u.shape[1])
    m, k = margin, n - 2 * margin
    if not (0 < shift <= margin and k > 0):
        raise ValueError(f"shift {shift}, margin {margin}: need 0 < shift <= margin < {n}/2")
    a, b = u.reshape(-1, n, n), v.reshape(-1, n, n)
    wa = np.ascontiguousarray(a[:, m : n - m, m : n - m]).reshape(-1, k * k)
    wa -= wa.mean(axis=1, keepdims=True)
    na = np.sqrt(np.einsum("pk,pk->p", wa, wa)).astype(np.float64)
    best = np.full(len(a), -1.0)
    for dy in range(-shift, shift + 1):
        for dx in range(-shift, shift + 1):
            wb = np.ascontiguousarray(b[:, m + dy : n - m + dy, m + dx : n - m + dx]).reshape(-1, k * k)
            wb -= wb.mean(axis=1, keepdims=True)
            nb = np.sqrt(np.einsum("pk,pk->p", wb, wb)).astype(np.float64)
            dot = np.einsum("pk,pk->p", wa, wb).astype(np.float64)
            flat_a, flat_b = na <= FLAT, nb <= FLAT
            with np.errstate(divide="ignore", invalid="ignore"):
                c = dot / (na * nb)
            best = np.maximum(best, np.where(flat_a | flat_b, np.where(flat_a & flat_b, 1.0, 0.0), c))
    zu, zv = ~u.any(axis=1), ~v.any(axis=1)
    return np.where(zu | zv, np.where(zu & zv, 1.0, 0.0), best)


def verify_scores(
    a: np.ndarray,
    b: np.ndarray,
    pairs: np.ndarray,
    required_dims: int,
    *,
    shift: int = 0,
    margin: int = 0,
    fast: bool = False,
) -> np.ndarray:
    """Fast path of `verify_scores_ref`: rows gathered in chunks, float64 einsums per chunk; with
    `fast`, the moved windows (shift > 0) in float32, within RECHECK of float64."""
    r = required_dims
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    out = np.empty(len(pairs))
    for s in range(0, len(pairs), CHUNK):
        p = pairs[s : s + CHUNK]
        ga, gb = a[p[:, 0]], b[p[:, 1]]
        if shift > 0:
            dt = np.float32 if fast else np.float64
            req = _shifted_scores(ga[:, :r].astype(dt), gb[:, :r].astype(dt), shift, margin)
        else:
            u, v = ga[:, :r].astype(np.float64), gb[:, :r].astype(np.float64)
            zu, zv = ~u.any(axis=1), ~v.any(axis=1)
            req = np.where(zu | zv, np.where(zu & zv, 1.0, 0.0), np.einsum("pk,pk->p", u, v))
        u, v = ga[:, r:].astype(np.float64), gb[:, r:].astype(np.float64)
        opt = np.where(~u.any(axis=1) | ~v.any(axis=1), 1.0, np.einsum("pk,pk->p", u, v))
        out[s : s + len(p)] = np.minimum(req, opt)
    return out


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
    scores = verifier.decided_scores(xc, yc, pairs, ms)
    t2 = time.perf_counter()
    return Verified(
        pairs, dists, scores, scores >= ms, ms, verifier.measure, {"screen": t1 - t, "verify": t2 - t1}
    )


def verifier_for(model_id: str | None) -> Verifier | None:
    """The verifier a model declares (its `EncoderFactory.verifier`), or None."""
    if not model_id:
        return None
    from clipdedup.ingest.encode.base import encoder_factory

    return encoder_factory(model_id).verifier

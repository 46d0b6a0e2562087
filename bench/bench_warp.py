"""builtin:dct's check: microseconds per candidate pair, native fast path against the reference.

Rows: 4,000 smooth random pictures (64 x 64 luma + 8 x 8 chroma, WarpCheck()) and a moved,
rescaled, re-lit and noisy copy of each, in one matrix (as the DB's check rows are). Pairs as a
screen hands them over, sorted by their first row: each picture with its copy and with 4 random
rows (most of those are refused by the gates, as most candidates of a real screen are not).

The reference (clipdedup.match.verify.warp_check.warp_scores_ref, float64 numpy, one pair at a time) is
timed on the first pairs only; the native path (warp_scores) on the same pairs, checked against it
(atol 1e-9), and on all 20,000 pairs with 1 thread and with one per core, checked on a sample
against the reference and against each other (the same bits). Rounds interleaved (common.py).
"""

from __future__ import annotations

import os
import time

import numpy as np

from clipdedup.match.verify.warp_check import WarpCheck, warp_scores, warp_scores_ref
from common import Row, interleaved, main

SHAPE = WarpCheck()


def make_rows(n: int, seed: int = 0) -> np.ndarray:
    """(2n, dims) float32: n pictures, then a copy of each (scale, offset, gain, bias, noise)."""
    rng = np.random.default_rng(seed)
    side, cc, waves = SHAPE.side, 2 * SHAPE.chroma**2, 8
    c = (side - 1) / 2.0
    k = np.arange(side) - c
    out = np.empty((2 * n, SHAPE.dims), np.float32)
    for i in range(n):
        freq = rng.uniform(-3.0, 3.0, (waves, 2)) * 2.0 * np.pi / side
        amp, phase = rng.normal(size=waves) / np.sqrt(waves), rng.uniform(0.0, 2.0 * np.pi, waves)
        chroma = rng.normal(0.0, 12.0, cc)
        for row, s, o in (
            (i, (1.0, 1.0), (0.0, 0.0)),
            (n + i, rng.uniform(0.92, 1.1, 2), rng.uniform(-4, 4, 2)),
        ):
            yy = (s[0] * k + c + o[0])[:, None, None]
            xx = (s[1] * k + c + o[1])[None, :, None]
            luma = 128.0 + 40.0 * np.sum(amp * np.cos(freq[:, 0] * yy + freq[:, 1] * xx + phase), axis=-1)
            if row >= n:
                luma = rng.uniform(0.9, 1.1) * luma + rng.uniform(-8, 8) + rng.normal(0.0, 1.5, luma.shape)
            out[row, : side * side] = luma.ravel()
            out[row, side * side :] = chroma if row < n else chroma + rng.normal(0.0, 1.0, cc)
    return out


def make_pairs(n: int, seed: int = 1) -> np.ndarray:
    """(5n, 2) int64: each picture i with its copy n + i and with 4 random rows, sorted by i."""
    rng = np.random.default_rng(seed)
    i = np.repeat(np.arange(n), 5)
    j = rng.integers(0, 2 * n, 5 * n)
    j[::5] = np.arange(n) + n
    return np.stack([i, j], 1)


def run(quick: bool) -> list[Row]:
    n, n_ref = (400, 60) if quick else (4000, 300)
    rows_m = make_rows(n)
    pairs = make_pairs(n)
    cores = os.cpu_count() or 1
    ref_part = warp_scores_ref(rows_m, rows_m, pairs[:n_ref], SHAPE)  # the answer, outside the timing
    base = "reference (numpy, per pair)"
    fns = {
        base: lambda: warp_scores_ref(rows_m, rows_m, pairs[:n_ref], SHAPE),
        "native, 1 thread": lambda: warp_scores(rows_m, rows_m, pairs[:n_ref], SHAPE, threads=1),
        f"native, {cores} threads": lambda: warp_scores(rows_m, rows_m, pairs[:n_ref], SHAPE, threads=cores),
    }

    def close(_name: str, got: np.ndarray) -> bool:
        return bool(np.allclose(got, ref_part, rtol=0, atol=1e-9))

    out = []
    for impl, tm in interleaved(fns, 3, close).items():
        out.append(_row(impl, n_ref, tm.seconds, tm.ok, None if impl == base else base, tm.rounds))

    sample = np.random.default_rng(2).choice(len(pairs), n_ref, replace=False)
    ref_sample = warp_scores_ref(rows_m, rows_m, pairs[sample], SHAPE)
    first: list[np.ndarray] = []

    def check(_name: str, got: np.ndarray) -> bool:
        if not first:
            first.append(got)
        same = bool(np.array_equal(got, first[0]))
        return same and bool(np.allclose(got[sample], ref_sample, rtol=0, atol=1e-9))

    fns = {
        "native, 1 thread": lambda: warp_scores(rows_m, rows_m, pairs, SHAPE, threads=1),
        f"native, {cores} threads": lambda: warp_scores(rows_m, rows_m, pairs, SHAPE, threads=cores),
    }
    for impl, tm in interleaved(fns, 3, check).items():
        out.append(_row(impl, len(pairs), tm.seconds, tm.ok, None, tm.rounds))
    scores = first[0]
    out[-1].extra["refused by the gates"] = round(float(np.mean(scores == -1.0)), 3)
    return out


def _row(impl: str, n: int, seconds: float, ok: bool | None, baseline: str | None, rounds: int) -> Row:
    extra = {"us/pair": round(seconds / n * 1e6, 1), "rounds": rounds}
    return Row("warp", impl, n, seconds, n / seconds, "pairs/s", correct=ok, baseline=baseline, extra=extra)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main(run, __doc__.split("\n")[0])
    print(f"{time.perf_counter() - t0:.1f}s")

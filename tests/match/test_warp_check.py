"""builtin:dct's check: the native fast path (`warp_scores`) against the float64 reference
(`warp_scores_ref`) on structured random rows, degenerate rows and awkward shapes, plus its input
checks."""

from __future__ import annotations

import numpy as np
import pytest

from clipdedup import native
from clipdedup.match.verify import warp_check as wc
from clipdedup.match.verify.warp_check import WarpCheck, warp_scores, warp_scores_ref

# Observed agreement is ~1e-12: the native sums run in another order than numpy's pairwise ones,
# and the Gauss-Newton steps carry that rounding into the warp.
ATOL = 1e-9
SHAPES = [WarpCheck(64, 8, 8), WarpCheck(32, 4, 4), WarpCheck(16, 4, 4), WarpCheck(38, 4, 3)]


class Field:
    """A smooth random picture: a sum of low-frequency waves, defined at any real coordinate, so a
    cropped, rescaled or moved copy is the same function sampled on another grid."""

    def __init__(self, rng: np.random.Generator, n: int, waves: int = 8) -> None:
        self.n = n
        self.freq = rng.uniform(-3.0, 3.0, (waves, 2)) * 2.0 * np.pi / n
        self.amp = rng.normal(size=waves) / np.sqrt(waves)
        self.phase = rng.uniform(0.0, 2.0 * np.pi, waves)

    def luma(
        self, scale: tuple[float, float] = (1.0, 1.0), offset: tuple[float, float] = (0.0, 0.0)
    ) -> np.ndarray:
        """(n, n) grey levels of the picture seen through y' = s (y - c) + c + o, per axis."""
        c = (self.n - 1) / 2.0
        k = np.arange(self.n, dtype=np.float64) - c
        yy = (scale[0] * k + c + offset[0])[:, None, None]
        xx = (scale[1] * k + c + offset[1])[None, :, None]
        f = np.sum(self.amp * np.cos(self.freq[:, 0] * yy + self.freq[:, 1] * xx + self.phase), axis=-1)
        return 128.0 + 40.0 * f


def _rows(shape: WarpCheck, luma: list[np.ndarray], chroma: list[np.ndarray]) -> np.ndarray:
    return np.stack([np.concatenate([lum.ravel(), ch.ravel()]) for lum, ch in zip(luma, chroma)]).astype(
        np.float32
    )


def _structured(rng: np.random.Generator, shape: WarpCheck, bases: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b): a holds `bases` fields; b holds for each a copy moved, rescaled (sometimes beyond the
    warp's limits), with noise and a gain/bias change, then one unrelated field."""
    n, cc = shape.side, 2 * shape.chroma * shape.chroma
    la, lb, ca, cb = [], [], [], []
    for k in range(bases):
        f = Field(rng, n)
        chroma = rng.normal(0.0, 12.0, cc)
        la.append(f.luma())
        ca.append(chroma)
        far = k % 4 == 3  # beyond SCALE_LIM / OFFSET_LIM: the clamps engage
        s = rng.uniform(1.15, 1.3, 2) if far else rng.uniform(0.92, 1.1, 2)
        o = rng.uniform(-0.2, 0.2, 2) * n if far else rng.uniform(-0.06, 0.06, 2) * n
        gain, bias = rng.uniform(0.9, 1.1), rng.uniform(-8.0, 8.0)
        lb.append(gain * f.luma(tuple(s), tuple(o)) + bias + rng.normal(0.0, 1.5, (n, n)))
        cb.append(chroma + rng.normal(0.0, 1.0, cc))
    lb.append(Field(rng, n).luma())
    cb.append(rng.normal(0.0, 12.0, cc))
    return _rows(shape, la, ca), _rows(shape, lb, cb)


def _check(a: np.ndarray, b: np.ndarray, pairs: np.ndarray, shape: WarpCheck) -> np.ndarray:
    ref = warp_scores_ref(a, b, pairs, shape)
    got = warp_scores(a, b, pairs, shape, threads=2)
    assert got.dtype == np.float64 and got.shape == (len(pairs),)
    np.testing.assert_allclose(got, ref, rtol=0, atol=ATOL)
    return ref


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s.side}-{s.margin}-{s.chroma}")
def test_native_matches_the_reference_on_moved_and_rescaled_copies(shape: WarpCheck) -> None:
    rng = np.random.default_rng(shape.side)
    bases = 40 if shape.side == 64 else 60  # more rows than a thread's cache holds
    a, b = _structured(rng, shape, bases)
    own = np.stack([np.arange(bases), np.arange(bases)], 1)
    mixed = np.stack([rng.integers(0, bases, 4 * bases), rng.integers(0, bases + 1, 4 * bases)], 1)
    ref = _check(a, b, np.concatenate([own, mixed]), shape)
    near = np.arange(bases) % 4 != 3
    if shape.side >= 32:  # copies within the warp's limits are found again (16: too few pixels)
        assert np.all(ref[:bases][near] > 0.9)
    assert np.any(ref == -1.0) and np.any((ref > -1.0) & (ref < 0.5))  # gated, and low scores


def test_the_random_copies_reach_the_warp_limits() -> None:
    """The data of the test above does drive the alignment into its clamps (else they go untested)."""
    shape = WarpCheck(32, 4, 4)
    a, b = _structured(np.random.default_rng(shape.side), shape, 40)
    n = shape.side // 2
    lim, scales = wc.OFFSET_LIM * n, (1.0 - wc.SCALE_LIM, 1.0 + wc.SCALE_LIM)
    hit = 0
    for i in range(40):
        ha = wc.smooth(wc.half(a[i, : shape.side**2].astype(np.float64).reshape(shape.side, -1)))
        hb = wc.smooth(wc.half(b[i, : shape.side**2].astype(np.float64).reshape(shape.side, -1)))
        sy, oy, sx, ox = wc.align(ha, hb, shape.margin // 2)
        hit += sy in scales or sx in scales or abs(oy) == lim or abs(ox) == lim
    assert hit >= 3


def test_alignment_improves_a_cropped_and_rescaled_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scores with the Gauss-Newton steps beat the whole-pixel start alone, in both paths."""
    shape = WarpCheck(64, 8, 8)
    rng = np.random.default_rng(7)
    f = Field(rng, shape.side)
    chroma = rng.normal(0.0, 12.0, 2 * shape.chroma**2)
    crop = f.luma((0.9, 0.93), (2.5, -3.0))  # a ~5% crop per side, rescaled to the full size
    a = _rows(shape, [f.luma()], [chroma])
    b = _rows(shape, [crop], [chroma])
    pairs = np.array([[0, 0]])
    aligned = _check(a, b, pairs, shape)[0]
    monkeypatch.setattr(wc, "ITERS", 0)
    start_only = _check(a, b, pairs, shape)[0]
    assert aligned > 0.9 and aligned > start_only + 0.05, (aligned, start_only)


@pytest.mark.parametrize("shape", [WarpCheck(64, 8, 8), WarpCheck(16, 4, 4)], ids=["64", "16"])
def test_degenerate_rows(shape: WarpCheck) -> None:
    """Flat luma (exact and inexact constants, and a whisper of noise), grey chroma, other colours,
    rows the gates refuse (darker, flatter, less colourful, NaN), each against every other."""
    rng = np.random.default_rng(3)
    n, cc = shape.side, 2 * shape.chroma**2
    f = Field(rng, n)
    colour = rng.normal(0.0, 12.0, cc)
    grey = [rng.uniform(-2.9, 2.9, cc) for _ in range(2)]
    faint = colour * 0.1
    faint[0] = 5.0
    rows = [
        (np.full((n, n), 128.0), colour),  # 0, 1: flat
        (np.full((n, n), 100.3), colour),
        (np.full((n, n), 100.3) + rng.normal(0.0, 1e-3, (n, n)), colour),  # 2: not quite flat
        (f.luma(), grey[0]),  # 3, 4: grey, the second moved
        (f.luma((1.0, 1.0), (1.0, 0.5)), grey[1]),
        (f.luma() * 0.4, colour),  # 5: darker than 6
        (f.luma(), colour),  # 6
        (128.0 + 0.2 * (f.luma() - 128.0), colour),  # 7: flatter than 6
        (f.luma(), faint),  # 8: coloured, but much less than 6
        (f.luma(), colour),  # 9: NaN below
        (f.luma(), rng.permutation(colour)),  # 10: as colourful as 6, another colour
        (f.luma(), grey[0]),  # 11: grey but for a NaN: not grey (numpy's max is NaN)
    ]
    a = _rows(shape, [r[0] for r in rows], [r[1] for r in rows])
    a[9, 5] = np.nan
    a[11, -1] = np.nan
    i, j = np.meshgrid(np.arange(len(a)), np.arange(len(a)), indexing="ij")
    pairs = np.stack([i.ravel(), j.ravel()], 1)
    ref = _check(a, a, pairs, shape).reshape(len(a), len(a))
    assert ref[0, 1] == 1.0 and ref[1, 2] == 0.0  # flat beside flat, beside not flat
    if shape.side > 16:  # grey beside grey or coloured: the luma decides (16: too few pixels)
        assert ref[3, 4] > 0.5 and ref[3, 6] > 0.9 and ref[6, 3] > 0.9
    assert ref[6, 5] == ref[6, 7] == ref[6, 8] == -1.0  # gates
    assert np.all(ref[9] == -1.0) and np.all(ref[:, 9] == -1.0)  # NaN luma
    assert ref[11, 6] == ref[6, 11] == -1.0  # NaN chroma: the colour gate refuses it
    assert -1.0 < ref[6, 10] < 0.5  # the colour term decides


def test_rows_the_reference_cannot_score_are_refused() -> None:
    """Infinite chroma, or a luma mean at or below -8 on one side only: math.log raises in the
    reference (log of 0 or of a negative ratio); the native path refuses such pairs (-1)."""
    shape = WarpCheck(16, 4, 4)
    a, b = _structured(np.random.default_rng(4), shape, 3)
    a[1:] = a[0]  # so that no earlier gate refuses the pair first
    a[1, shape.side**2 + 3] = np.inf
    a[2, : shape.side**2] -= 200.0
    pairs = np.array([[0, 1], [1, 0], [2, 0], [0, 2], [0, 0]])
    got = warp_scores(a, a, pairs, shape)
    np.testing.assert_array_equal(got[:4], -1.0)
    assert got[4] == pytest.approx(warp_scores_ref(a, a, pairs[4:], shape)[0], abs=ATOL)
    for k in (0, 2, 3):
        with pytest.raises(ValueError, match="math domain"):
            warp_scores_ref(a, a, pairs[k : k + 1], shape)


def test_same_matrix_repeated_and_swapped_pairs() -> None:
    shape = WarpCheck(32, 4, 4)
    a, b = _structured(np.random.default_rng(11), shape, 12)
    m = np.concatenate([a, b])
    rng = np.random.default_rng(12)
    base = rng.integers(0, len(m), (40, 2))
    pairs = np.concatenate([base, base[:, ::-1], base, np.stack([np.arange(len(m))] * 2, 1)])
    got = warp_scores(m, m, pairs, shape, threads=3)
    np.testing.assert_allclose(got, warp_scores_ref(m, m, pairs, shape), rtol=0, atol=ATOL)
    np.testing.assert_array_equal(got[:40], got[80:120])  # repeated: the very same bits
    assert np.all(got[-len(m) :] > 0.999)  # every row matches itself


def test_thread_counts_give_the_same_bits() -> None:
    shape = WarpCheck(32, 4, 4)
    a, b = _structured(np.random.default_rng(5), shape, 30)
    pairs = np.random.default_rng(6).integers(0, 30, (500, 2))
    one = warp_scores(a, b, pairs, shape, threads=1)
    for t in (2, 5):
        np.testing.assert_array_equal(warp_scores(a, b, pairs, shape, threads=t), one)


def test_different_matrices_and_no_pairs() -> None:
    shape = WarpCheck(16, 4, 4)
    a, b = _structured(np.random.default_rng(9), shape, 7)
    assert len(a) != len(b)
    pairs = np.array([[6, 7], [0, 0], [6, 0], [0, 7]])
    _check(a, b, pairs, shape)
    _check(b, a, pairs[:, ::-1], shape)  # a strided view
    _check(a, b, pairs.astype(np.int32), shape)
    empty = warp_scores(a, b, np.zeros((0, 2), np.int64), shape)
    assert empty.dtype == np.float64 and empty.shape == (0,)
    assert warp_scores(a[:0], b[:0], np.zeros((0, 2), np.int64), shape).shape == (0,)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy: the mean of no chroma
def test_no_chroma_counts_as_grey() -> None:
    shape = WarpCheck(32, 4, 0)
    a, b = _structured(np.random.default_rng(8), shape, 6)
    ref = _check(a, b, np.stack([np.arange(6), np.arange(6)], 1), shape)
    assert np.all(ref[np.arange(6) % 4 != 3] > 0.9)


def test_bad_input_is_one_exception() -> None:
    shape = WarpCheck(16, 4, 4)
    a, b = _structured(np.random.default_rng(1), shape, 3)
    ok = np.array([[0, 1]])
    with pytest.raises(ValueError, match="columns"):
        warp_scores(a[:, :-1].copy(), b, ok, shape)
    with pytest.raises(ValueError, match="columns"):
        warp_scores(a, b, ok, WarpCheck(16, 4, 5))
    with pytest.raises(ValueError):
        warp_scores(a.astype(np.float64), b, ok, shape)
    with pytest.raises(ValueError):
        warp_scores(a[0], b, ok, shape)
    with pytest.raises(ValueError):
        warp_scores(a, b, np.array([0, 1, 2]), shape)
    for bad in ([[3, 0]], [[0, 4]], [[-1, 0]], [[0, -1]], [[0, 0], [0, 2**40]]):
        with pytest.raises(IndexError):
            warp_scores(a, b, np.array(bad), shape)
    for side, margin in ((15, 4), (16, 3), (16, 8), (16, 0), (2, 2)):
        dims = side * side + 2 * 16
        with pytest.raises(ValueError):
            warp_scores(
                np.zeros((1, dims), np.float32),
                np.zeros((1, dims), np.float32),
                ok[:, :1].repeat(2, 1),
                WarpCheck(side, margin, 4),
            )


def test_native_wrapper_checks_its_output_and_params() -> None:
    shape = WarpCheck(16, 4, 4)
    a, b = _structured(np.random.default_rng(2), shape, 2)
    params = wc.native_params(shape)
    np.testing.assert_allclose(
        native.warp_scores(a, b, np.array([[0, 0], [1, 1]]), params),
        warp_scores_ref(a, b, np.array([[0, 0], [1, 1]]), shape),
        rtol=0,
        atol=ATOL,
    )
    with pytest.raises(ValueError, match="iters"):
        native.warp_scores(a, b, np.array([[0, 0]]), native.WarpParams(16, 4, 4, -1, 4, *([0.1] * 9)))
    with pytest.raises(ValueError, match="grid"):
        native.warp_scores(a, b, np.array([[0, 0]]), native.WarpParams(16, 4, 4, 5, 0, *([0.1] * 9)))

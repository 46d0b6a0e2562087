"""Verification of screened candidates: the fast scores against the per-pair reference, the split of
builtin:dct rows, and the verifier's decisions on real image pairs of the test data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from clipdedup.ingest.decode.base import decode_pil
from clipdedup.ingest.encode import dct
from clipdedup.ingest.encode.base import load_encoder
from clipdedup.match import pairs_ref
from clipdedup.match.verify import (
    RECHECK,
    Verifier,
    match_verified,
    verifier_for,
    verify_scores,
    verify_scores_ref,
)


def _unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
    return x


def _check_rows(rng: np.random.Generator, n: int, r: int, o: int) -> np.ndarray:
    """Rows [required (r) | optional (o)], each segment unit norm; some segments zero on purpose."""
    x = np.concatenate(
        [_unit_rows(rng, n, r), _unit_rows(rng, n, o) if o else np.zeros((n, 0), np.float32)], 1
    )
    x[rng.random(n) < 0.2, :r] = 0.0  # flat images
    x[rng.random(n) < 0.3, r:] = 0.0  # grey images
    return x


@pytest.mark.parametrize(
    ("n", "m", "r", "o", "p"), [(0, 0, 5, 2, 0), (1, 1, 1, 1, 1), (63, 65, 7, 0, 200), (65, 2, 256, 128, 129)]
)
def test_scores_match_reference(n: int, m: int, r: int, o: int, p: int) -> None:
    rng = np.random.default_rng(n * 7 + r)
    a, b = _check_rows(rng, max(n, 1), r, o), _check_rows(rng, max(m, 1), r, o)
    a[0] = b[0]  # the same row on both sides
    pairs = np.stack([rng.integers(0, len(a), p), rng.integers(0, len(b), p)], axis=1)
    got = verify_scores(a, b, pairs, r)
    assert got.shape == (p,) and got.dtype == np.float64
    np.testing.assert_allclose(got, verify_scores_ref(a, b, pairs, r), rtol=0, atol=1e-12)


def _image_rows(rng: np.random.Generator, k: int, n: int, o: int) -> np.ndarray:
    """Rows [n x n image, centred, unit norm | optional (o)], with awkward images on purpose."""
    img = rng.standard_normal((k, n, n)).cumsum(axis=1).cumsum(axis=2)  # smooth-ish pictures
    if k > 3:
        img[1] = 0.0  # flat: the zero segment
        img[2] = 0.0
        img[2, 0, :] = 1.0  # content only in the border: every window of the other side is flat
        img[3] = img[0]
        img[3, 1:, 1:] = img[0, :-1, :-1]  # moved by one pixel (right and down)
    y = img.reshape(k, n * n)
    y = y - y.mean(axis=1, keepdims=True)
    y /= np.where(np.any(y, axis=1), np.linalg.norm(y, axis=1), 1.0)[:, None]
    opt = _unit_rows(rng, k, o) if o else np.zeros((k, 0), np.float32)
    opt[:4] = opt[0]  # the same colour: the awkward ones are judged on the image segment
    return np.concatenate([y.astype(np.float32), opt], axis=1)


@pytest.mark.parametrize(("k", "n", "o", "shift", "margin", "p"), [(1, 5, 0, 1, 1, 1), (9, 7, 3, 1, 2, 90)])
def test_shifted_scores_match_reference(k: int, n: int, o: int, shift: int, margin: int, p: int) -> None:
    rng = np.random.default_rng(k + n)
    x = _image_rows(rng, k, n, o)
    pairs = np.stack([rng.integers(0, k, p), rng.integers(0, k, p)], axis=1)
    if k > 3:
        pairs[:4] = [[0, 3], [0, 1], [1, 1], [2, 0]]
    kw = {"shift": shift, "margin": margin}
    got = verify_scores(x, x, pairs, n * n, **kw)
    ref = verify_scores_ref(x, x, pairs, n * n, **kw)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9)
    fast = verify_scores(x, x, pairs, n * n, fast=True, **kw)  # float32 windows
    np.testing.assert_allclose(fast, ref, rtol=0, atol=RECHECK / 100)
    if k > 3:
        assert got[0] == pytest.approx(1.0, abs=1e-6)  # a one-pixel move is undone
        assert verify_scores(x, x, pairs[:1], n * n)[0] < 0.999  # the plain cosine does not undo it
        assert got[1] == 0.0 and got[2] == pytest.approx(1.0)  # one side flat: 0; both flat: 1
        assert got[3] == 0.0  # every window of the border-only picture is flat, the other's not


def test_match_verified_decides_as_float64_at_the_edge() -> None:
    """The float32 scores are scored again in float64 near the minimum: with the minimum set to a
    candidate's float64 score, every decision is float64's, that candidate's included (float64
    itself is within 1e-12 of the reference, checked above)."""
    rng = np.random.default_rng(5)
    n, k = 40, 9
    x = _image_rows(rng, n, k, 4)
    screen = _unit_rows(rng, n, 3) * 0.01 + 1.0  # every pair within the screening threshold
    rows = np.concatenate([screen, x], axis=1)
    v = Verifier(screen_dims=3, required_dims=k * k, min_score=0.0, measure="test", shift=1, margin=1)
    pairs = match_verified(rows, 10.0, v).pairs
    exact = verify_scores(x, x, pairs, k * k, shift=1, margin=1)
    for ms in np.sort(exact)[:: len(exact) // 12].tolist():  # candidates exactly at the minimum
        got = match_verified(rows, 10.0, v, min_score=ms)
        assert np.array_equal(got.confirmed, exact >= ms)
        edge = np.abs(exact - ms) <= RECHECK
        assert np.array_equal(got.scores[edge], exact[edge])


def test_score_segments() -> None:
    """Required segment: one side zero -> 0, both zero -> 1; optional: skipped when either is zero."""
    rows = np.array(
        [
            [1, 0, 1, 0],  # 0
            [1, 0, 0, 0],  # 1: grey copy of 0 -> luma alone: 1
            [1, 0, 0, 1],  # 2: recoloured 0 -> colour cosine 0
            [0, 0, 1, 0],  # 3: flat
            [0, 0, 0, 0],  # 4: flat and grey
        ],
        np.float32,
    )
    pairs = np.array([[0, 1], [0, 2], [0, 3], [3, 4], [4, 4]])
    want = [1.0, 0.0, 0.0, 1.0, 1.0]
    np.testing.assert_array_equal(verify_scores_ref(rows, rows, pairs, 2), want)
    np.testing.assert_array_equal(verify_scores(rows, rows, pairs, 2), want)


def test_scores_chunked(monkeypatch: pytest.MonkeyPatch) -> None:
    from clipdedup.match import verify

    rng = np.random.default_rng(3)
    a = _check_rows(rng, 50, 6, 3)
    pairs = rng.integers(0, 50, (1000, 2))
    want = verify_scores_ref(a, a, pairs, 6)
    monkeypatch.setattr(verify, "CHUNK", 7)  # chunk boundaries fall inside the pair list
    np.testing.assert_allclose(verify.verify_scores(a, a, pairs, 6), want, atol=1e-12)


def test_match_verified_is_screen_then_check() -> None:
    """Candidates are exactly the reference's pairs on the screening part; confirmed = score >= bar."""
    rng = np.random.default_rng(11)
    v = dct.VERIFIER
    screen = _unit_rows(rng, 70, v.screen_dims)
    screen[1] = screen[0]
    screen[2] = screen[0] + 0.01
    check = _check_rows(rng, 70, v.required_dims, dct.CHECK_DIM - v.required_dims)
    check[1] = check[0]  # a confirmed pair; (0, 2) and (1, 2) are candidates turned down
    x = np.concatenate([screen, check], axis=1)
    got = match_verified(x, 0.5, v)
    wi, wj, _ = pairs_ref(screen, None, 0.5)
    assert {tuple(p) for p in got.pairs.tolist()} == set(zip(wi.tolist(), wj.tolist()))
    assert {tuple(p) for p in got.pairs[got.confirmed].tolist()} == {(0, 1)}
    np.testing.assert_allclose(
        got.scores, verify_scores_ref(check, check, got.pairs, v.required_dims), atol=1e-12
    )
    # A second set (import mode): (row of x, row of y), the check taken from each side.
    y = x[[1, 2, 5]]
    both = match_verified(x, 0.5, v, y=y)
    assert {tuple(p) for p in both.pairs[both.confirmed].tolist()} == {(0, 0), (1, 0), (2, 1), (5, 2)}


def test_builtin_dct_declares_its_verifier() -> None:
    v = verifier_for("builtin:dct")
    assert v is dct.VERIFIER and v.screen_dims == dct.SCREEN_DIM
    assert verifier_for("ViT-B-32/openai") is None and verifier_for(None) is None
    enc = load_encoder("builtin:dct")
    assert enc.dim == dct.SCREEN_DIM + dct.CHECK_DIM


@pytest.mark.parametrize("batch", [0, 1, 3])
def test_check_features_match_reference(batch: int) -> None:
    rng = np.random.default_rng(batch)
    x = rng.uniform(0, 255, (batch, 32, 32, 3))
    if batch > 1:
        x[1] = 90.0  # flat and grey: the zero vector
        x[2] = x[2].mean(axis=2, keepdims=True)  # grey: luma only
    fast, ref = dct.check_features(x), dct.check_features_ref(x)
    assert fast.shape == (batch, dct.CHECK_DIM)
    np.testing.assert_allclose(fast, ref, atol=1e-6)
    if batch > 1:
        assert np.all(fast[1] == 0)
        r = dct.VERIFIER.required_dims
        assert np.all(fast[2, r:] == 0) and abs(np.linalg.norm(fast[2, :r]) - 1) < 1e-6


def _rows(images: list[Image.Image]) -> np.ndarray:
    enc = load_encoder("builtin:dct")
    return np.asarray(enc.encode_batch([enc.prepare(im) for im in images]))


def _decide(x: np.ndarray, a: int, b: int) -> tuple[float, float, bool]:
    """(screening distance, check score, duplicate at the defaults) of rows a and b."""
    s, c = dct.VERIFIER.split(x)
    d = float(np.linalg.norm(s[a].astype(np.float64) - s[b]))
    sc = float(verify_scores_ref(c, c, np.array([[a, b]]), dct.VERIFIER.required_dims)[0])
    return d, sc, d <= dct.DEFAULT_THRESHOLD and sc >= dct.MIN_SCORE


def test_decisions_on_planted_variants_of_real_photos(testdata: Path) -> None:
    """Recompression, resize, small crop, brightness and contrast are confirmed; the mirror image and
    the central 50% crop are not duplicates."""
    img = decode_pil(testdata / "base_images" / "ukbench09380.jpg", 0)
    w, h = img.size
    dups = [
        img.resize((w // 4, h // 4), Image.Resampling.LANCZOS),
        img.crop((w // 40, h // 40, w - w // 40, h - h // 40)),
        ImageEnhance.Brightness(img).enhance(1.1),
        ImageEnhance.Contrast(img).enhance(0.9),
    ]
    negs = [ImageOps.mirror(img), img.crop((w // 4, h // 4, w - w // 4, h - h // 4))]
    x = _rows([img, *dups, *negs])
    for k in range(1, 1 + len(dups)):
        assert _decide(x, 0, k)[2], (k, _decide(x, 0, k))
    for k in range(1 + len(dups), len(x)):
        assert not _decide(x, 0, k)[2], (k, _decide(x, 0, k))


def test_decisions_on_the_real_pairs_of_the_testdata(testdata: Path) -> None:
    """Every screened candidate among the test images: the check confirms the strict groups' pairs and
    turns down the rest (flips, rotations, other photos)."""
    gt = json.loads((testdata / "ground_truth.json").read_text())
    bad = {b["path"] for b in gt["bad_files"]}
    names = [n for n in gt["images"] if n not in bad]
    side = load_encoder("builtin:dct").input_size
    x = _rows([decode_pil(testdata / n, side) for n in names])
    truth = {frozenset((a, b)) for g in gt["duplicate_groups_strict"] for a in g for b in g if a != b}
    data = {n: (testdata / n).read_bytes() for n in names}
    truth |= {frozenset((a, b)) for a in names for b in names if a != b and data[a] == data[b]}
    v = match_verified(x, dct.DEFAULT_THRESHOLD, dct.VERIFIER)
    cand = [
        (frozenset((names[a], names[b])), ok) for (a, b), ok in zip(v.pairs.tolist(), v.confirmed.tolist())
    ]
    confirmed = {p for p, ok in cand if ok}
    turned_down = {p for p, ok in cand if not ok}
    assert confirmed <= truth, sorted(map(sorted, confirmed - truth))
    assert len(confirmed) >= 0.95 * len(truth), sorted(map(sorted, truth - confirmed))
    assert not (turned_down & truth) or len(turned_down & truth) <= 0.05 * len(truth)
    # With a screen so loose that it lets distinct pairs through (flips, rotations, other photos),
    # the check alone keeps the answer exact: what it confirms are true pairs.
    loose = match_verified(x, 1.3, dct.VERIFIER)
    pairs = [frozenset((names[a], names[b])) for a, b in loose.pairs.tolist()]
    distinct = [p for p in pairs if p not in truth]
    assert len(distinct) >= 10, "the loose screen let no distinct pair through: the test shows nothing"
    kept = {p for p, ok in zip(pairs, loose.confirmed.tolist()) if ok}
    assert kept <= truth, sorted(map(sorted, kept - truth))


def test_colour_of_a_mostly_grey_picture_counts(testdata: Path) -> None:
    """A grey photo with one small coloured patch is not grey (its largest block chroma decides, not
    its RMS chroma): the same picture with the patch recoloured at equal luma is turned down by the
    check, though its luma is the same; a greyscale copy of a colour photo is still confirmed."""
    photo = decode_pil(testdata / "base_images" / "ukbench09380.jpg", 0)
    grey = photo.convert("L").convert("RGB")
    w, h = grey.size
    box = (w // 2, h // 2, w // 2 + w // 16, h // 2 + h // 16)  # a quarter of one chroma block
    red, green = grey.copy(), grey.copy()
    red.paste((200, 0, 0), box)
    green.paste((0, 102, 0), box)  # luma 0.587 * 102 ~ 0.299 * 200: the same grey level
    x = _rows([red, green, photo, grey])
    c = dct.VERIFIER.split(x)[1]
    r = dct.VERIFIER.required_dims
    blocks = dct._blocks(np.stack([dct.prepare_dct(red)]).astype(np.float64) @ dct._CBCR.T, dct.CHROMA)
    assert np.sqrt(np.mean(blocks**2)) < 4.0  # grey by its RMS chroma (layout 1's rule)
    assert np.any(c[0, r:]), "the patch's colour was dropped as grey"
    assert float(c[0, :r] @ c[1, :r]) > 0.99  # the luma alone cannot tell them apart
    assert not _decide(x, 0, 1)[2], _decide(x, 0, 1)
    assert not np.any(c[3, r:])  # the greyscale copy is grey
    assert _decide(x, 2, 3)[2], _decide(x, 2, 3)

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
from clipdedup.ingest.encode.base import load_encoder, verifier_for
from clipdedup.match import pairs_ref
from clipdedup.match.verify.verifier import Verifier, match_verified
from clipdedup.match.verify.warp_check import warp_scores_ref


def _unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
    return x


def _pictures(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 64, 64, 3) smooth random colour pictures in [0, 255], some of them copies of others."""
    side = dct.CHECK
    field = rng.standard_normal((n, 8, 8, 3)).repeat(side // 8, 1).repeat(side // 8, 2)
    pic = np.clip(128 + 40 * field + rng.normal(0, 3, (n, side, side, 3)), 0, 255)
    for i in range(1, n, 3):  # a brighter, noisier copy of an earlier picture
        noise = rng.normal(0, 2, pic[i].shape)
        pic[i] = np.clip(pic[rng.integers(0, i)] * rng.uniform(0.92, 1.08) + noise, 0, 255)
    return pic


def test_scores_are_the_reference_scores() -> None:
    """The verifier's fast path (native) gives the definition's scores, within float64 rounding."""
    rng = np.random.default_rng(4)
    x = dct.embed(_pictures(rng, 40))
    _, c = dct.VERIFIER.split(x)
    pairs = rng.integers(0, 40, (300, 2))
    got = dct.VERIFIER.scores(c, c, pairs)
    assert got.shape == (300,) and got.dtype == np.float64
    ref = dct.VERIFIER.score_ref(c, c, pairs)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(ref, warp_scores_ref(c, c, pairs, dct.SHAPE))
    assert len(np.unique(np.round(got, 3))) > 20  # the scores spread: the comparison shows something
    other = c[::-1].copy()  # a second set (import mode)
    np.testing.assert_allclose(
        dct.VERIFIER.scores(c, other, pairs), warp_scores_ref(c, other, pairs, dct.SHAPE), rtol=0, atol=1e-9
    )
    assert dct.VERIFIER.scores(c, c, np.zeros((0, 2), np.int64)).shape == (0,)


def test_match_verified_is_screen_then_check() -> None:
    """Candidates are exactly the reference's pairs on the screening part; confirmed = score >= bar."""
    rng = np.random.default_rng(11)
    v = dct.VERIFIER
    pic = _pictures(rng, 30)
    x = dct.embed(pic)
    x[:, : v.screen_dims] = _unit_rows(rng, 30, v.screen_dims)
    x[1, : v.screen_dims] = x[0, : v.screen_dims]
    x[2, : v.screen_dims] = x[0, : v.screen_dims] + 0.01
    x[1, v.screen_dims :] = x[0, v.screen_dims :]  # a confirmed pair; (0, 2) and (1, 2) are turned down
    got = match_verified(x, 0.5, v)
    screen, check = v.split(x)
    wi, wj, _ = pairs_ref(screen, None, 0.5)
    assert {tuple(p) for p in got.pairs.tolist()} == set(zip(wi.tolist(), wj.tolist()))
    assert {tuple(p) for p in got.pairs[got.confirmed].tolist()} == {(0, 1)}
    np.testing.assert_allclose(got.scores, warp_scores_ref(check, check, got.pairs, dct.SHAPE), atol=1e-9)
    assert np.array_equal(got.confirmed, got.scores >= v.min_score)
    # A second set (import mode): (row of x, row of y), the check taken from each side.
    y = x[[1, 2, 5]]
    both = match_verified(x, 0.5, v, y=y)
    assert {tuple(p) for p in both.pairs[both.confirmed].tolist()} == {(0, 0), (1, 0), (2, 1), (5, 2)}
    # Any verifier: the score function decides, min_score overrides its bar.
    always = Verifier(screen_dims=v.screen_dims, min_score=0.5, measure="t", score=_half, score_ref=_half)
    assert match_verified(x, 0.5, always).confirmed.all()
    assert not match_verified(x, 0.5, always, min_score=0.6).confirmed.any()


def _half(a: np.ndarray, b: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    return np.full(len(pairs), 0.5)


def test_builtin_dct_declares_its_verifier() -> None:
    v = verifier_for("builtin:dct")
    assert v is dct.VERIFIER and v.screen_dims == dct.SCREEN_DIM
    assert verifier_for("ViT-B-32/openai") is None and verifier_for(None) is None
    enc = load_encoder("builtin:dct")
    assert enc.dim == dct.SCREEN_DIM + dct.CHECK_DIM


@pytest.mark.parametrize("batch", [0, 1, 3])
def test_check_features_match_reference(batch: int) -> None:
    rng = np.random.default_rng(batch)
    x = rng.uniform(0, 255, (batch, dct.CHECK, dct.CHECK, 3))
    if batch > 1:
        x[1] = 90.0  # flat and grey
        x[2] = x[2].mean(axis=2, keepdims=True)  # grey
    fast, ref = dct.check_features(x), dct.check_features_ref(x)
    assert fast.shape == (batch, dct.CHECK_DIM)
    np.testing.assert_allclose(fast, ref, atol=1e-4)
    if batch > 1:
        n = dct.CHECK * dct.CHECK
        assert np.allclose(fast[1, :n], 90.0, atol=1e-4) and np.abs(fast[1, n:]).max() < 1e-4
        assert np.abs(fast[2, n:]).max() < 1e-3 < np.abs(fast[0, n:]).max()


def _rows(images: list[Image.Image]) -> np.ndarray:
    enc = load_encoder("builtin:dct")
    return np.asarray(enc.encode_batch([enc.prepare(im) for im in images]))


def _decide(x: np.ndarray, a: int, b: int) -> tuple[float, float, bool]:
    """(screening distance, check score, duplicate at the defaults) of rows a and b."""
    s, c = dct.VERIFIER.split(x)
    d = float(np.linalg.norm(s[a].astype(np.float64) - s[b]))
    sc = float(warp_scores_ref(c, c, np.array([[a, b]]), dct.SHAPE)[0])
    return d, sc, d <= dct.DEFAULT_THRESHOLD and sc >= dct.MIN_SCORE


def test_decisions_on_planted_variants_of_real_photos(testdata: Path) -> None:
    """Recompression, resize, crops of up to 5% per side (off-centre too), brightness and contrast are
    confirmed; the mirror image, the central 50% crop, a copy at half the brightness and the same
    photo with one part replaced (another frame of an animation) are not duplicates."""
    img = decode_pil(testdata / "base_images" / "ukbench09380.jpg", 0)
    w, h = img.size
    changed = img.copy()
    changed.paste(img.crop((0, 0, w // 5, h // 5)).resize((w // 5, h // 5)), (w // 2, h // 3))
    dups = [
        img.resize((w // 4, h // 4), Image.Resampling.LANCZOS),
        img.crop((w // 40, h // 40, w - w // 40, h - h // 40)),
        img.crop((w // 20, 0, w, h - h // 20)),  # 5% off the left and the bottom: scaled by 5%
        ImageEnhance.Brightness(img).enhance(1.1),
        ImageEnhance.Contrast(img).enhance(0.9),
    ]
    negs = [
        ImageOps.mirror(img),
        img.crop((w // 4, h // 4, w - w // 4, h - h // 4)),
        ImageEnhance.Brightness(img).enhance(0.5),
        changed,
    ]
    x = _rows([img, *dups, *negs])
    for k in range(1, 1 + len(dups)):
        assert _decide(x, 0, k)[2], (k, _decide(x, 0, k))
    for k in range(1 + len(dups), len(x)):
        assert not _decide(x, 0, k)[2], (k, _decide(x, 0, k))
    # The off-centre crop scores higher aligned than with whole-pixel moves alone.
    _, c = dct.VERIFIER.split(x)
    assert _decide(x, 0, 3)[1] > _unaligned(c[0], c[3]) + 0.05, (_decide(x, 0, 3), _unaligned(c[0], c[3]))


def _unaligned(ra: np.ndarray, rb: np.ndarray) -> float:
    """The luma term with the alignment's best whole-pixel move and no scale (warp_check step 4)."""
    from clipdedup.match.verify import warp_check as w

    n, m = dct.CHECK, dct.MARGIN
    la, lb = ra[: n * n].reshape(n, n).astype(np.float64), rb[: n * n].reshape(n, n).astype(np.float64)
    best = max(
        w.local_term(w.smooth(la), w.smooth(lb), m, (1.0, float(dy), 1.0, float(dx)))
        for dy in range(-2, 3)
        for dx in range(-2, 3)
    )
    return best


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
    """A grey photo with one small coloured patch: the same picture with the patch recoloured at equal
    luma is turned down by the colour term, though its luma is the same; a greyscale copy of a colour
    photo is confirmed (judged on its luma: the test data counts it a duplicate)."""
    photo = decode_pil(testdata / "base_images" / "ukbench09380.jpg", 0)
    grey = photo.convert("L").convert("RGB")
    w, h = grey.size
    box = (w // 2, h // 2, w // 2 + w // 16, h // 2 + h // 16)  # a quarter of one chroma block
    red, green = grey.copy(), grey.copy()
    red.paste((200, 0, 0), box)
    green.paste((0, 102, 0), box)  # luma 0.587 * 102 ~ 0.299 * 200: the same grey level
    x = _rows([red, green, photo, grey])
    c = dct.VERIFIER.split(x)[1]
    n = dct.CHECK * dct.CHECK
    from clipdedup.match.verify import warp_check as wc

    assert np.abs(c[0, :n] - c[1, :n]).max() < 2.0  # the luma alone cannot tell them apart
    assert wc.colour_term(c[0, n:].astype(np.float64), c[1, n:].astype(np.float64)) < 0.5
    assert not _decide(x, 0, 1)[2], _decide(x, 0, 1)
    assert _decide(x, 2, 3)[2], _decide(x, 2, 3)

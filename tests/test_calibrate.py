"""Threshold help: nearest neighbours and the suggestion against plain references; the command's
mechanics on the tiny random model (its distances mean nothing) and on builtin:dct."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clipdedup import calibrate as cal
from clipdedup.cli import dedup_cmd, run_cli
from clipdedup.ingest.encode.base import ENCODERS
from clipdedup.ingest.update import update_db
from clipdedup.match.nearest import nn_distances, nn_distances_ref


@pytest.mark.parametrize(("n", "d"), [(2, 3), (3, 1), (63, 32), (65, 100), (300, 17)])
def test_nn_distances_match_reference(n: int, d: int) -> None:
    rng = np.random.default_rng(n * 1000 + d)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x[n // 2] = x[0]  # an exact duplicate: distance 0
    if n > 4:
        x[-1] = x[1] + 1e-4  # a very close pair
    rows = np.sort(rng.choice(n, size=min(n, 40), replace=False))
    want = nn_distances_ref(x, rows)
    np.testing.assert_allclose(nn_distances(x, rows, chunk=7), want, rtol=1e-6, atol=1e-7)


def test_nn_distances_all_identical_rows() -> None:
    x = np.ones((10, 5), np.float32)
    rows = np.arange(10)
    assert np.array_equal(nn_distances(x, rows), np.zeros(10))
    assert np.array_equal(nn_distances_ref(x, rows), np.zeros(10))


@pytest.mark.parametrize("seed", range(6))
def test_suggest_threshold_matches_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pos = np.round(rng.gamma(2.0, 0.02, int(rng.integers(1, 60))), 3)  # rounding makes ties
    neg = np.round(0.15 + rng.standard_normal(int(rng.integers(0, 200))) * 0.05, 3)
    for target in (0.5, 0.9, 0.99, 0.999):
        got = cal.suggest_threshold(pos, neg, target)
        assert got == cal.suggest_threshold_ref(pos, neg, target)
        if got is not None:
            prec, rec = cal.precision_curve_ref(pos, neg, got)
            assert prec >= target and rec > 0


def test_suggest_threshold_edges() -> None:
    assert cal.suggest_threshold(np.zeros(0), np.array([0.1]), 0.9) is None
    # Perfectly separated: the largest positive is the answer.
    assert cal.suggest_threshold(np.array([0.01, 0.02]), np.array([0.5, 0.6]), 0.99) == 0.02
    # A negative below every positive: no threshold reaches 0.99.
    assert cal.suggest_threshold(np.array([0.2, 0.3]), np.array([0.0, 0.9]), 0.99) is None


def test_transforms_keep_images_close_in_size(testdata: Path) -> None:
    from PIL import Image

    with Image.open(testdata / "base_images/ukbench01380.jpg") as im:
        im = im.convert("RGB")
        for name, fn in cal.TRANSFORMS.items():
            out = fn(im)
            assert out.mode == "RGB" and min(out.size) >= min(im.size) // 2, name


def _db(pics: Path, tmp_path: Path, model: str) -> Path:
    db = tmp_path / "db"
    update_db(pics, db, model, log=lambda line: None)
    return db


def test_calibrate_command_tiny_model(pics: Path, tmp_path: Path, tiny_model: str, capsys) -> None:
    db = _db(pics, tmp_path, tiny_model)
    args = ["calibrate", "-d", str(db), "-i", str(pics), "--samples", "6", "--precision", "0.9", "-q"]
    assert run_cli(dedup_cmd, "test", args + ["--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    # The two corrupt files may be among the samples: they are skipped, never counted.
    assert d["db_rows"] == 32 and d["images"] + len(d["skipped"]) == 6 and d["images"] >= 4
    assert sorted(d["synthetic"]) == sorted(cal.TRANSFORMS)
    assert len(d["nearest_neighbour"]) == len(cal.QUANTILES)
    # The test images hold byte-identical copies: they share one embedding (the pre-pass).
    assert d["nearest_neighbour"][0] == 0.0 and d["exact_copies"] >= 8

    assert run_cli(dedup_cmd, "test", args) == 0
    text = capsys.readouterr().out
    assert "nearest neighbour (32 rows)" in text and "synthetic jpeg-q70" in text
    assert "suggested threshold" in text or "no threshold reaches" in text

    # Without images: the nearest-neighbour part only.
    assert run_cli(dedup_cmd, "test", ["calibrate", "-d", str(db), "-q"]) == 0
    assert "no -i IMAGES given" in capsys.readouterr().out


def test_calibrate_refuses_wrong_model(pics: Path, tmp_path: Path, tiny_model: str, capsys) -> None:
    db = _db(pics, tmp_path, tiny_model)
    code = run_cli(dedup_cmd, "test", ["calibrate", "-d", str(db), "-m", "builtin:nope", "-q"])
    assert code == 2 and "DB holds" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(dedup_cmd, "test", ["calibrate", "-d", str(empty), "-q"]) == 2


@pytest.mark.skipif("builtin:dct" not in ENCODERS.entries, reason="builtin:dct not registered")
def test_calibrate_builtin_dct(pics: Path, tmp_path: Path, capsys) -> None:
    """builtin:dct targets every variant but the off-centre 90% crop; recall is reported per
    variant; the suggestion comes from the targeted ones, and exists at precision 0.99."""
    from clipdedup.calibrate import format_text, to_dict
    from clipdedup.ingest.encode import dct

    db = _db(pics, tmp_path, "builtin:dct")
    c = cal.calibrate(str(db), str(pics), samples=12, precision=0.99)
    assert c.model_id == "builtin:dct" and c.images + len(c.skipped) == 12
    assert all(len(v) == c.images for v in c.synthetic.values())
    assert c.targets == dct.CALIBRATION_TARGETS and "crop-90%" not in c.targets
    assert c.min_score == dct.MIN_SCORE and c.nn_scores is not None
    # A real (if simple) encoder: re-encoding barely moves the screening part.
    assert np.median(c.synthetic["jpeg-q70"]) < np.median(c.nn[c.nn > cal.IDENTICAL])
    rec = c.recall(c.default_threshold)
    assert sorted(rec) == sorted(cal.TRANSFORMS)
    assert rec["jpeg-q70"] == 1.0 and rec["bright+10%"] == 1.0, rec
    # Recall per variant is the share of pairs within t whose check also passes.
    for name, r in rec.items():
        ok = (c.synthetic[name] <= c.default_threshold) & (c.synthetic_scores[name] >= c.min_score)
        assert r == pytest.approx(ok.mean())
    # The untargeted variant does not pull the suggestion: it comes from the targeted ones.
    assert c.suggested is not None
    prec, _ = cal.precision_curve_ref(c.positives(), c.negatives(), c.suggested)
    assert prec >= 0.99
    assert len(c.positives()) == len(c.targets) * c.images < len(c.positives(targeted=False))
    text = format_text(c)
    assert "recall per variant: jpeg-q70" in text and "crop-90% " in text and "(not targeted)" in text
    assert "suggested threshold for precision >= 0.99" in text
    d = to_dict(c)
    assert d["targeted"] == list(dct.CALIBRATION_TARGETS) and d["recall_at_default"] == rec


def test_untargeted_variants_are_left_out_of_the_suggestion() -> None:
    """A model that targets one variant: a far-off other variant changes recall, not the suggestion."""
    nn = np.array([0.5, 0.6, 0.7, 0.8])
    c = cal.Calibration("m", 10, 4, 0.99, 0.3, nn, targets=("jpeg-q70",))
    c.synthetic = {"jpeg-q70": np.array([0.05, 0.1]), "crop-90%": np.array([0.9, 1.0])}
    c.suggested = cal.suggest_threshold(c.positives(), c.negatives(), 0.99)
    assert c.suggested == 0.1
    assert c.recall(0.1) == {"jpeg-q70": 1.0, "crop-90%": 0.0}
    # Counting the untargeted variant would halve the recall the suggestion is judged by.
    assert cal.precision_curve_ref(c.positives(), c.negatives(), 0.1)[1] == 1.0
    assert cal.precision_curve_ref(c.positives(targeted=False), c.negatives(), 0.1)[1] == 0.5

"""builtin:dct: fast DCT features against the term-by-term reference, invariances, the registry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

import clipdedup
from clipdedup.errors import ModelError
from clipdedup.ingest.decode.base import decode_pil
from clipdedup.ingest.encode import dct
from clipdedup.ingest.encode.base import CLIP_DEFAULT_THRESHOLD, load_encoder


def test_dct_matrix_is_orthonormal() -> None:
    for n in (1, 7, 32):
        c = dct.dct_matrix(n)
        np.testing.assert_allclose(c @ c.T, np.eye(n), atol=1e-12)


@pytest.mark.parametrize("batch", [0, 1, 2, 63, 65])
def test_fast_matches_reference_on_random_images(batch: int) -> None:
    rng = np.random.default_rng(batch)
    # Smooth and noisy content: random low-frequency fields plus pixel noise.
    base = rng.uniform(0, 255, (batch, 4, 4)).repeat(8, 1).repeat(8, 2)
    gray = np.clip(base + rng.normal(0, 20, (batch, 32, 32)), 0, 255).astype(np.float32)
    fast = dct.dct_features(gray)
    ref = dct.dct_features_ref(gray)
    assert fast.shape == ref.shape == (batch, dct.BLOCK * dct.BLOCK - 1)
    assert fast.dtype == np.float32
    np.testing.assert_allclose(fast, ref, atol=2e-6)
    if batch:
        np.testing.assert_allclose(np.linalg.norm(fast, axis=1), 1.0, atol=1e-6)


def test_identical_rows_and_flat_images() -> None:
    rng = np.random.default_rng(7)
    one = rng.uniform(0, 255, (32, 32)).astype(np.float32)
    x = np.stack([one] * 5 + [np.full((32, 32), 17, np.float32), np.zeros((32, 32), np.float32)])
    fast, ref = dct.dct_features(x), dct.dct_features_ref(x)
    np.testing.assert_allclose(fast, ref, atol=2e-6)
    assert np.all(fast[:5] == fast[0])
    # No AC energy: the zero vector (not NaN, not an arbitrary direction).
    assert np.all(fast[5:] == 0) and np.all(np.isfinite(fast))


def test_brightness_contrast_invariance_and_flip_sensitivity(testdata: Path) -> None:
    enc = load_encoder("builtin:dct")
    img = decode_pil(testdata / "base_images" / "ukbench09380.jpg", 0)
    variants = [
        img,
        ImageEnhance.Brightness(img).enhance(1.1),
        ImageEnhance.Contrast(img).enhance(0.9),
        img.resize((img.width // 4, img.height // 4), Image.Resampling.LANCZOS),
        ImageOps.mirror(img),
    ]
    v, _ = dct.VERIFIER.split(enc.encode_batch([enc.prepare(im) for im in variants]))
    d = np.linalg.norm(v - v[0], axis=1)
    thr = clipdedup.default_threshold("builtin:dct")
    assert np.all(d[1:4] < thr / 2), d
    assert d[4] > thr * 1.1, d


def test_registry_threshold_and_unknown_builtin() -> None:
    assert clipdedup.default_threshold("builtin:dct") == dct.DEFAULT_THRESHOLD
    assert dct.DEFAULT_THRESHOLD != CLIP_DEFAULT_THRESHOLD
    assert clipdedup.default_threshold("ViT-B-32/openai") == CLIP_DEFAULT_THRESHOLD
    assert clipdedup.default_threshold("builtin:dctx") == CLIP_DEFAULT_THRESHOLD
    with pytest.raises(ModelError, match="unknown built-in encoder"):
        load_encoder("builtin:nope")
    enc = load_encoder("builtin:dct")
    assert enc.dim == dct.SCREEN_DIM + dct.CHECK_DIM and enc.spec is None


def test_dedup_uses_dct_default_threshold(pics: Path, tmp_path: Path, capsys) -> None:
    from clipdedup.cli import dedup_cmd, run_cli

    args = ["-i", str(pics), "-d", str(tmp_path / "db"), "-m", "builtin:dct", "-n", "--json", "-q"]
    capsys.readouterr()
    assert run_cli(dedup_cmd, "test", args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["threshold"] == pytest.approx(dct.DEFAULT_THRESHOLD)
    # The same run with -th uses the given threshold.
    assert run_cli(dedup_cmd, "test", args + ["-th", "0.05"]) == 0
    assert json.loads(capsys.readouterr().out)["threshold"] == pytest.approx(0.05)


def test_db_of_an_older_row_layout_is_refused_or_reencoded(pics: Path, tmp_path: Path, capsys) -> None:
    """Rows of the same dim but another meaning are never read silently: an update, a
    --skip-update run and calibrate refuse the DB with one line; --force-update re-encodes it."""
    import dataclasses

    from clipdedup.calibrate import calibrate
    from clipdedup.cli import dedup_cmd, run_cli
    from clipdedup.db import read_meta, write_meta
    from clipdedup.errors import DBMismatchError
    from clipdedup.ingest.update import update_db

    db = tmp_path / "db"
    quiet = lambda line: None  # noqa: E731
    update_db(pics, db, "builtin:dct", log=quiet)
    meta = read_meta(db)
    assert meta is not None and meta.preprocess["layout"] == dct.LAYOUT == 4
    # What the previous builtin:dct wrote: the same model id and dim, no "layout" (layout 1).
    old = {k: v for k, v in meta.preprocess.items() if k != "layout"}
    write_meta(db, dataclasses.replace(meta, preprocess=old))
    want = r"layout 1 \(4367 dims\), this version reads layout 4.*--force-update"
    with pytest.raises(DBMismatchError, match=want):
        update_db(pics, db, "builtin:dct", log=quiet)
    with pytest.raises(DBMismatchError, match="layout 1"):
        calibrate(str(db), str(pics))
    capsys.readouterr()
    args = ["-i", str(pics), "-d", str(db), "--skip-update", "-n", "-q"]
    assert run_cli(dedup_cmd, "test", args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "layout 1" in err[0] and "Traceback" not in err[0]
    s = update_db(pics, db, "builtin:dct", force=True, log=quiet)
    assert s.encoded > 0 and read_meta(db).preprocess["layout"] == dct.LAYOUT
    update_db(pics, db, "builtin:dct", log=quiet)  # current again: accepted

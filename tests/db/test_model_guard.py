"""A DB written by one model is never extended by another, also when the caller hands update_db a
loaded encoder (or a LazyEncoder) instead of a model id: then only the metadata check after
loading can tell."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipdedup import db as dbmod
from clipdedup.errors import DBMismatchError
from clipdedup.ingest.encode.base import LazyEncoder, load_encoder
from clipdedup.ingest.update import update_db
from conftest import make_tiny_model


def test_a_loaded_encoder_of_another_model_is_refused(tmp_path: Path, tiny_model: str) -> None:
    img, db = tmp_path / "img", tmp_path / "db"
    img.mkdir()
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), np.uint8)).save(img / f"{k}.png")
    assert update_db(img, db, tiny_model, log=lambda line: None).encoded == 3
    st = os.stat(img / "1.png")
    os.utime(img / "1.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # something to encode
    before = (db / "1.png.npy").read_bytes()
    other = load_encoder("local-dir:" + str(make_tiny_model(tmp_path / "other", seed=1)), device="cpu")
    assert other.dim == dbmod.read_meta(db).dim  # only the model id tells them apart
    for encoder in (other, LazyEncoder(lambda: other)):
        with pytest.raises(DBMismatchError, match="use a separate --db-dir"):
            update_db(img, db, encoder=encoder, log=lambda line: None)
    assert dbmod.read_meta(db).model_id == tiny_model
    assert (db / "1.png.npy").read_bytes() == before

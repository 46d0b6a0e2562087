"""The DB under attack: damaged metadata values, damaged .npy files that look up to date, and image
names too long for their DB files. Each test pins one promise of docs/guarantees.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clipdedup import db as dbmod
from clipdedup.errors import UserError
from clipdedup.ingest.update import update_db
from clipdedup.util.fsutil import TMP_MARK, atomic_file
from helpers import distinct_images

EXE = Path(sys.executable).parent / "clip-image-deduper"
GOOD_META = {"model_id": "builtin:dct", "dim": 143, "dtype": "float32", "normalized": True, "preprocess": {}}


@pytest.mark.parametrize(
    "field,value",
    [
        ("dim", "abc"),
        ("dim", -5),
        ("dim", 143.5),
        ("dim", 1e9),
        ("dim", True),
        ("dim", 10**12),
        ("model_id", ""),
        ("model_id", 7),
        ("normalized", "no"),
        ("dtype", "float16"),
        ("preprocess", [1]),
        ("format_version", 99),
    ],
)
def test_each_damaged_metadata_value_is_one_line_naming_field_and_file(tmp_path: Path, field, value) -> None:
    (tmp_path / dbmod.META_NAME).write_text(json.dumps(GOOD_META | {field: value}))
    with pytest.raises(UserError) as e:
        dbmod.read_meta(tmp_path)
    msg = str(e.value)
    assert f"'{field}'" in msg and str(dbmod.meta_path(tmp_path)) in msg and "\n" not in msg


def test_metadata_that_is_not_an_object_or_lacks_the_dim(tmp_path: Path) -> None:
    p = tmp_path / dbmod.META_NAME
    for text in ("[1, 2]", json.dumps({"model_id": "builtin:dct"})):
        p.write_text(text)
        with pytest.raises(UserError, match=str(p)):
            dbmod.read_meta(tmp_path)
    p.write_text(json.dumps(GOOD_META))
    assert dbmod.read_meta(tmp_path) == dbmod.DBMeta(**GOOD_META)


def test_unnormalized_db_is_named_as_such_in_the_refusal(tmp_path: Path) -> None:
    (tmp_path / dbmod.META_NAME).write_text(json.dumps(GOOD_META | {"normalized": False}))
    with pytest.raises(UserError) as e:
        dbmod.check_meta(tmp_path, dbmod.DBMeta("builtin:dct", 143))
    held, uses = str(e.value).split("this run uses")
    assert "not normalized" in held and "not normalized" not in uses


def test_damaged_metadata_through_the_cli_is_one_line(
    testdata: Path, tmp_path: Path, tiny_model: str
) -> None:
    img, db = tmp_path / "img", tmp_path / "db"
    distinct_images(testdata, img, 1)
    db.mkdir()
    (db / dbmod.META_NAME).write_text(json.dumps(GOOD_META | {"model_id": tiny_model, "dim": "abc"}))
    r = subprocess.run(
        [str(EXE), "-i", str(img), "-d", str(db), "-q"], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "'dim'" in lines[0] and dbmod.META_NAME in lines[0], lines


# 4. Long names.


def test_temp_names_fit_name_max_for_the_longest_names(tmp_path: Path) -> None:
    for name in ("字" * 75 + ".jpg.npy", "x" * 255, "é" * 125 + ".npy"):
        with atomic_file(tmp_path / name) as f:
            (tmp,) = [n for n in os.listdir(tmp_path) if n.endswith(TMP_MARK)]
            assert len(os.fsencode(tmp)) <= 255
            f.write(b"data")
        assert (tmp_path / name).read_bytes() == b"data"


def test_a_long_image_name_is_encoded_and_a_too_long_one_skipped(
    testdata: Path, tmp_path: Path, tiny_model: str
) -> None:
    img, db = tmp_path / "img", tmp_path / "db"
    paths = distinct_images(testdata, img / "sub", 1)
    long_ok = "字" * 75 + ".jpg"  # 229 bytes: its .npy fits, its temp name used not to
    too_long = "x" * 248 + ".jpg"  # 252 bytes: no room for ".npy"
    os.rename(paths[0], img / "sub" / long_ok)
    os.rename(paths[1], img / "sub" / too_long)
    r = subprocess.run(
        [str(EXE), "-i", str(img), "-d", str(db), "-m", tiny_model], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (db / "sub" / (long_ok + ".npy")).exists()
    lines = [line for line in r.stderr.splitlines() if "name too long" in line]
    assert len(lines) == 1 and too_long in lines[0], r.stderr[-3000:]
    assert len(list(db.rglob("*.npy"))) == len(paths) - 1


# 9. A .npy that looks up to date but cannot be read is re-encoded.


@pytest.mark.parametrize("damage", ["magic", "dtype", "nan", "random"])
def test_a_damaged_npy_with_the_right_size_and_mtime_is_re_encoded(
    testdata: Path, tmp_path: Path, tiny_model: str, damage: str
) -> None:
    img, db = tmp_path / "img", tmp_path / "db"
    distinct_images(testdata, img, 1)
    update_db(str(img), str(db), tiny_model, log=lambda line: None)
    victim = sorted(db.glob("*.npy"))[0]
    good, st = np.load(victim), victim.stat()
    raw = bytearray(victim.read_bytes())
    body = len(raw) - good.nbytes
    if damage == "magic":
        raw[1:6] = b"XXXXX"
    elif damage == "dtype":
        k = raw.index(b"<f4")
        raw[k : k + 3] = b"<i4"
    elif damage == "nan":  # a header that reads fine over a body of NaN (issue #25, item 8)
        raw[body:] = np.full(good.shape, np.nan, "<f4").tobytes()
    else:  # a random body: finite numbers mostly, some too large to square
        raw[body:] = np.random.default_rng(0).integers(0, 256, good.nbytes, np.uint8).tobytes()
    victim.write_bytes(bytes(raw))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = subprocess.run(
        [str(EXE), "-i", str(img), "-d", str(db), "-m", tiny_model, "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert any("damaged" in line and victim.name in line for line in r.stderr.splitlines()), r.stderr
    assert json.loads(r.stdout)["loaded"] == len(list(img.glob("*.jpg")))
    np.testing.assert_allclose(np.load(victim), good, atol=2e-5)


def test_import_mode_re_encodes_a_nan_npy_of_the_import_db(testdata: Path, tmp_path: Path) -> None:
    from clipdedup.pipeline import RunOptions, run_import

    base, imp = tmp_path / "base", tmp_path / "imp"
    distinct_images(testdata, base, 1)
    imp.mkdir()
    for p in sorted(base.glob("*.jpg"))[:2]:
        (imp / p.name).write_bytes(p.read_bytes())
    lines: list[str] = []
    opts = RunOptions(model_id="builtin:dct", log=lines.append)
    dirs = (str(base), str(tmp_path / "bdb"), str(imp), str(tmp_path / "idb"))
    assert len(run_import(*dirs, None, opts).groups) == 2
    victim = Path(dbmod.npy_path(tmp_path / "idb", sorted(p.name for p in imp.iterdir())[0]))
    good, st = np.load(victim), victim.stat()
    raw = bytearray(victim.read_bytes())
    raw[len(raw) - good.nbytes :] = np.full(good.shape, np.nan, "<f4").tobytes()
    victim.write_bytes(bytes(raw))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    lines.clear()
    s = run_import(*dirs, None, opts)
    assert [line for line in lines if victim.name in line and "re-encoding" in line], lines
    assert len(s.groups) == 2 and s.load_errors == []
    np.testing.assert_array_equal(np.load(victim), good)

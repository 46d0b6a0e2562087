"""The bad-input zoo: every odd or broken file gets a one-line reason (or is encoded), the run completes.

The zoo is generated here from the real test images; no binary is committed.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from clipdedup.db import load_db
from clipdedup.ingest.update import scan_images, update_db
from clipdedup.pipeline import RunOptions, run_dedup
from clipdedup.report import core as report

SRC = "base_images/ukbench00120.jpg"
OTHER = "base_images/ukbench09380.jpg"
NON_UTF8 = b"caf\xe9 \xff.jpg"  # Latin-1 bytes: not UTF-8


def _png(im: Image.Image) -> bytes:
    b = io.BytesIO()
    im.save(b, "PNG")
    return b.getvalue()


def _chunk(png: bytes, kind: bytes) -> tuple[int, int]:
    """(offset of the chunk's data, its length) of the first `kind` chunk."""
    i = png.index(kind)
    return i + 4, struct.unpack(">I", png[i - 4 : i])[0]


def make_zoo(testdata: Path, d: Path) -> tuple[set[str], set[str]]:
    """Writes the zoo into `d`; returns (names that must be skipped, names that must be encoded)."""
    d.mkdir(parents=True, exist_ok=True)
    raw = (testdata / SRC).read_bytes()
    im = Image.open(testdata / SRC).convert("RGB")
    png = _png(im)
    bad: dict[str, bytes] = {
        "truncated.jpg": raw[: len(raw) // 2],
        "zero.jpg": b"",
        "text.jpg": b"this is not an image\n",
        "text.png": b"neither is this\n",
    }
    o, n = _chunk(png, b"IDAT")
    corrupt = bytearray(png)
    corrupt[o + n // 2 : o + n // 2 + 64] = b"\0" * 64
    bad["corrupt_idat.png"] = bytes(corrupt)
    # A real PNG whose header claims 60000 x 60000: far above Pillow's MAX_IMAGE_PIXELS.
    o, n = _chunk(png, b"IHDR")
    ihdr = b"IHDR" + struct.pack(">II", 60000, 60000) + png[o + 8 : o + n]
    bad["bomb.png"] = png[: o - 4] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + png[o + n + 4 :]
    for name, data in bad.items():
        (d / name).write_bytes(data)

    good = {"copy_of_src.jpg", "cmyk.jpg", "gray.jpg", "deep16.png", "rgba.png", "palette.png"}
    good |= {"anim.gif", "pic.webp", os.fsdecode(NON_UTF8), "other.jpg"}
    shutil.copyfile(testdata / SRC, d / "copy_of_src.jpg")
    shutil.copyfile(testdata / OTHER, d / "other.jpg")
    with open(os.path.join(os.fsencode(d), NON_UTF8), "wb") as f:
        f.write((testdata / OTHER).read_bytes())
    im.convert("CMYK").save(d / "cmyk.jpg", "JPEG")
    im.convert("L").save(d / "gray.jpg", "JPEG")
    deep = (np.asarray(im.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(deep).save(d / "deep16.png")  # 16-bit grayscale
    assert Image.open(d / "deep16.png").mode.startswith("I")
    rgba = im.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(im.size))
    rgba.save(d / "rgba.png")
    im.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(d / "palette.png")
    frames = [im.rotate(a).resize((160, 120)) for a in (0, 10, 20)]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    im.save(d / "pic.webp", "WEBP")
    if features.check("avif"):
        try:
            im.save(d / "pic.avif", "AVIF")
            good.add("pic.avif")
        except Exception:  # an AVIF decoder without an encoder: leave the format out
            (d / "pic.avif").unlink(missing_ok=True)
    return set(bad), good


def _opts(model: str, **kw) -> RunOptions:
    return RunOptions(model_id=model, batch_size=4, threshold=1e-4, log=lambda line: None, **kw)


def test_zoo_run_completes_with_one_line_reasons(testdata: Path, tmp_path: Path, tiny_model: str) -> None:
    img, db = tmp_path / "img", tmp_path / "db"
    bad, good = make_zoo(testdata, img / "zoo")
    shutil.copyfile(testdata / SRC, img / "src.jpg")
    trash = img / "trash"  # nested in the image dir: must be left out of the scan
    s = run_dedup(str(img), str(db), str(trash), _opts(tiny_model))
    d = report.summary_dict(s, dry_run=False)
    skipped = {os.path.basename(x["path"]): x["reason"] for x in d["skipped"]}
    assert set(skipped) == bad, skipped
    for name, reason in skipped.items():
        assert reason and "\n" not in reason, (name, reason)
    assert "decompression bomb" in skipped["bomb.png"]
    assert "truncated" in skipped["truncated.jpg"]
    paths, x = load_db(str(db))
    assert {os.path.basename(p) for p in paths} == good | {"src.jpg"}
    assert np.isfinite(x).all()
    assert os.path.exists(os.path.join(os.fsencode(db), b"zoo", NON_UTF8 + b".npy"))
    # The byte-identical copies moved into the nested trash; the non-UTF-8 twin of other.jpg too,
    # or other.jpg itself: either way one of each pair stays.
    moved = {os.path.basename(m.rel) for m in s.moved}
    assert len(moved) == 2 and len(moved & {"src.jpg", "copy_of_src.jpg"}) == 1
    # Second run: the trash dir (with the moved files and the journal) is not scanned.
    s2 = run_dedup(str(img), str(db), str(trash), _opts(tiny_model))
    d2 = report.summary_dict(s2, dry_run=False)
    assert d2["scanned"] == d["scanned"] - 2 and d2["moved"] == 0
    assert d2["orphans_removed"] == 2  # the DB entries of the two moved files, nothing from the trash
    assert not any("trash" in p for p in load_db(str(db))[0])


def test_file_deleted_between_scan_and_decode(testdata: Path, tmp_path: Path, tiny_model: str) -> None:
    img = tmp_path / "img"
    img.mkdir()
    for k, src in enumerate((SRC, OTHER, "base_images/ukbench01380.jpg")):
        shutil.copyfile(testdata / src, img / f"{k}.jpg")  # distinct images: each is encoded
    scan = scan_images(str(img))
    (img / "1.jpg").unlink()
    u = update_db(str(img), str(tmp_path / "db"), tiny_model, scan=scan, log=lambda line: None)
    assert u.encoded == 2 and len(u.failed) == 1
    path, reason = u.failed[0]
    assert path.endswith("1.jpg") and "\n" not in reason and ("No such file" in reason or "Errno 2" in reason)


UNREADABLE_RUN = """
import json, sys
from clipdedup.report import core as report
from clipdedup.pipeline import RunOptions, run_dedup
s = run_dedup(sys.argv[1], sys.argv[2], None, RunOptions(model_id=sys.argv[3], log=lambda line: None))
print(json.dumps(report.summary_dict(s, dry_run=False)["skipped"]))
"""


def test_file_without_read_permission(testdata: Path, tmp_path: Path, tiny_model: str) -> None:
    img = tmp_path / "img"
    img.mkdir()
    shutil.copyfile(testdata / SRC, img / "ok.jpg")
    shutil.copyfile(testdata / OTHER, img / "locked.jpg")
    os.chmod(img / "locked.jpg", 0)
    cmd = [sys.executable, "-c", UNREADABLE_RUN, str(img), str(tmp_path / "db"), tiny_model]
    if os.geteuid() == 0:
        # Root reads anything: drop the capabilities that let it ignore file modes.
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and setpriv is missing: cannot make a file unreadable to us")
        caps = "-dac_override,-dac_read_search"
        cmd = [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}"] + cmd
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "setpriv" in r.stderr:
        pytest.skip(f"setpriv cannot drop capabilities here: {r.stderr.strip()[:200]}")
    assert r.returncode == 0, r.stderr[-2000:]
    skipped = json.loads(r.stdout.strip().splitlines()[-1])
    assert [os.path.basename(x["path"]) for x in skipped] == ["locked.jpg"]
    assert "Permission denied" in skipped[0]["reason"] and "\n" not in skipped[0]["reason"]


def test_heic_when_a_plugin_is_installed(testdata: Path, tmp_path: Path, tiny_model: str) -> None:
    try:
        import pillow_heif
    except ImportError:
        pytest.skip("no HEIC plugin (pillow-heif) installed")
    pillow_heif.register_heif_opener()
    img = tmp_path / "img"
    img.mkdir()
    Image.open(testdata / SRC).convert("RGB").save(img / "pic.heic", "HEIF")
    u = update_db(str(img), str(tmp_path / "db"), tiny_model, log=lambda line: None)
    assert u.encoded == 1 and not u.failed


def test_cli_json_and_lines_with_non_utf8_names(testdata: Path, tmp_path: Path, tiny_model: str) -> None:
    img = tmp_path / "img"
    img.mkdir()
    shutil.copyfile(testdata / OTHER, img / "a.jpg")
    with open(os.path.join(os.fsencode(img), NON_UTF8), "wb") as f:
        f.write((testdata / OTHER).read_bytes())
    exe = Path(sys.executable).parent / "clip-image-deduper"
    args = [str(exe), "-i", str(img), "-d", str(tmp_path / "db"), "-t", str(tmp_path / "trash")]
    args += ["-m", tiny_model, "-th", "1e-4"]
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "LC_ALL": "C.UTF-8"}
    r = subprocess.run(args + ["-n"], capture_output=True, env=env, timeout=300)  # human lines
    assert r.returncode == 0, r.stderr[-2000:]
    assert b"would move" in r.stdout
    r = subprocess.run(args + ["--json", "-q"], capture_output=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(r.stdout)
    assert d["moved"] == 1
    moved = next(m for g in d["groups"] for m in g["moves"])
    assert os.path.exists(os.fsencode(moved["to"]))  # the name in the JSON leads to the real file


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--backend", "triton"], {}),
        (["--backend", "no-such-matcher"], {}),
        ([], {"CLIPDEDUP_BACKEND": "no-such-matcher"}),
        ([], {"CLIPDEDUP_DECODER": "no-such-decoder"}),
    ],
)
def test_an_unusable_backend_is_one_line_and_exit_2(
    tmp_path: Path,
    args: list[str],
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Naming a backend that does not exist, or cannot run here, is a usage error, not a traceback."""
    from clipdedup.cli import dedup_cmd, run_cli
    from clipdedup.match import MATCHERS

    if args[-1:] == ["triton"] and MATCHERS.entries["triton"].unavailable_reason() is None:
        pytest.skip("triton runs here")
    pics = tmp_path / "pics"
    pics.mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(pics / "a.png")
    shutil.copy(pics / "a.png", pics / "b.png")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cmd = ["-i", str(pics), "-d", str(tmp_path / "db"), "-m", "builtin:dct", "-n", "-q", *args]
    code = run_cli(dedup_cmd, "clip-image-deduper", cmd)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("clip-image-deduper: error: "), err

"""Decoders: format sniffing, PIL draft decoding, batching (every file exactly once), the registry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL
import pytest
from PIL import Image

from clipdedup.ingest.decode import base as decode
from clipdedup.ingest.decode import pil
from clipdedup.ingest.decode.base import (
    DECODERS,
    DecodeError,
    decode_pil,
    decode_pil_full,
    iter_batches,
    sniff,
)
from clipdedup.ingest.prep import PrepSpec, prepare_pil
from clipdedup.registry import UnavailableError


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix not in (".json", ".md"))


def test_sniff_reads_content_not_names(testdata: Path) -> None:
    fmt = testdata / "formats_images"
    assert sniff((fmt / "ukbench09380.png").read_bytes()[:16]) == "jpeg"  # JPEG data, .png name
    assert sniff((fmt / "ukbench09380.svg").read_bytes()[:16]) == "jpeg"
    assert sniff((fmt / "ukbench09380.webp").read_bytes()[:16]) == "webp"
    assert sniff((fmt / "copyleft.tiff").read_bytes()[:16]) == "tiff"
    assert sniff((fmt / "giphy.gif").read_bytes()[:16]) == "gif"
    assert sniff((fmt / "baboon.pgm").read_bytes()[:16]) == "pnm"
    assert sniff((testdata / "alpha_channel_image.png").read_bytes()[:16]) == "png"
    assert sniff((testdata / "mixed_images" / "ukbench09268_corrupt.jpg").read_bytes()[:16]) is None
    assert sniff(b"") is None and sniff(b"BM") == "bmp"


def test_draft_decode_keeps_enough_pixels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 256, (1500, 2000, 3), dtype=np.uint8))
    p = tmp_path / "big.jpg"
    big.save(p, quality=90)
    # libjpeg's DCT scaling: the largest of 1/8, 1/4, 1/2 that keeps both sides >= min_size.
    for min_size, short in ((1, 188), (64, 188), (224, 375), (400, 750), (1500, 1500)):
        im = decode_pil(p, min_size)
        assert im.mode == "RGB" and min(im.size) == short, (min_size, im.size)
    assert decode_pil_full(p, 64).size == (2000, 1500)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    a = np.zeros((40, 100, 3), np.uint8)
    a[:, :50] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    p = tmp_path / "rot.jpg"
    Image.fromarray(a).save(p, exif=exif, quality=95)
    im = decode_pil(p, 0)
    assert im.size == (40, 100)
    top = np.asarray(im)[:50].mean()
    assert top > 200  # the white half is on top after the rotation


def test_bad_files_are_reasons(tmp_path: Path, testdata: Path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    for p in (
        tmp_path / "empty.jpg",
        tmp_path / "text.png",
        testdata / "mixed_images" / "ukbench09268_corrupt.jpg",
    ):
        with pytest.raises(DecodeError) as e:
            decode_pil(p, 64)
        assert "\n" not in str(e.value) and str(e.value)


@pytest.mark.parametrize("decoder", ["pil", "pil-full"])
@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_every_file_exactly_once_in_order(testdata: Path, decoder: str, batch_size: int) -> None:
    files = all_files(testdata)
    gt = json.loads((testdata / "ground_truth.json").read_text())
    bad = {testdata / b["path"] for b in gt["bad_files"]}
    spec = PrepSpec((32, 32))
    seen: list[int] = []
    failed: list[int] = []
    for b in iter_batches(
        files,
        lambda im: prepare_pil(im, spec),
        batch_size=batch_size,
        min_size=32,
        decoder=decoder,
        workers=2,
    ):
        assert len(b.indices) == len(b.items) and len(b.indices) + len(b.failures) <= batch_size
        assert all(it.shape == (32, 32, 3) for it in b.items)
        seen += sorted(b.indices + [i for i, _ in b.failures])
        failed += [i for i, _ in b.failures]
    assert seen == list(range(len(files)))
    assert {files[i] for i in failed} == bad


def test_prepare_failure_is_the_files_reason(testdata: Path) -> None:
    files = all_files(testdata / "base_images")[:3]

    def prepare(im: Image.Image):
        raise ValueError("odd input\nsecond line")

    batches = list(iter_batches(files, prepare, batch_size=2, min_size=8))
    reasons = [r for b in batches for _, r in b.failures]
    assert reasons == ["ValueError: odd input"] * 3


def test_registry_and_environment_override(monkeypatch) -> None:
    names = DECODERS.names()
    assert {"pil", "pil-full", "dali", "dali-cpu"} <= set(names)
    monkeypatch.delenv("CLIPDEDUP_DECODER", raising=False)
    assert DECODERS.get().name in ("pil", "dali")  # dali only where CUDA and DALI are there
    monkeypatch.setenv("CLIPDEDUP_DECODER", "pil-full")
    assert DECODERS.get().name == "pil-full"
    monkeypatch.setenv("CLIPDEDUP_DECODER", "nope")
    with pytest.raises(UnavailableError, match="unknown decoder"):
        DECODERS.get()


def test_pillow_simd_detection(monkeypatch) -> None:
    import importlib.metadata

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    monkeypatch.setattr(PIL, "__version__", "11.0.0")
    assert decode.pillow_simd_version() is None
    monkeypatch.setattr(PIL, "__version__", "9.5.0.post2")
    assert decode.pillow_simd_version() == "9.5.0.post2"
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "9.0.0.post1")
    assert decode.pillow_simd_version() == "9.0.0.post1"
    assert "draft" in pil._pil_doc()


def test_decoding_from_a_deep_grayscale_png(tmp_path: Path) -> None:
    a = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)
    p = tmp_path / "deep.png"
    Image.fromarray(a).save(p)
    im = decode_pil(p, 32)
    assert im.mode == "RGB"
    g = np.asarray(im)[..., 0]
    assert g.max() > 200 and g.min() < 10  # scaled to 8 bits, not clipped white

"""DALI decoding: header checks, preprocessing parity with open_clip, bad files mid-batch."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clipdedup.ingest.decode import dali as dali_mod
from clipdedup.ingest.decode.base import decode_pil, iter_batches
from clipdedup.ingest.decode.dali import JpegInfo, jpeg_info
from clipdedup.ingest.encode.base import load_encoder
from clipdedup.ingest.prep import PrepSpec, normalize_ref, prepare_pil
from helpers import open_clip_transform

pytest.importorskip("nvidia.dali", reason="nvidia-dali-cuda130 not installed")

SPECS = [
    PrepSpec((64, 64)),
    PrepSpec((224, 224)),
    PrepSpec((64, 64), interpolation="bilinear"),
    PrepSpec((96, 128)),
    PrepSpec((224, 224), resize_mode="squash"),
    PrepSpec((80, 112), resize_mode="longest", fill=60),
]


def jpeg_files(root: Path) -> list[Path]:
    """Every file under `root` whose content is a JPEG DALI will take (names may say otherwise)."""
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and isinstance(jpeg_info(p.read_bytes()), JpegInfo):
            out.append(p)
    return out


def main_segments(b: bytes) -> dict[int, int]:
    """Offset of the first marker of each kind in the main image (not in an EXIF thumbnail)."""
    pos, out = 2, {}
    while pos + 4 <= len(b):
        marker, length = b[pos + 1], (b[pos + 2] << 8) | b[pos + 3]
        out.setdefault(marker, pos)
        if marker == 0xDA:
            break
        pos += 2 + length
    return out


def test_header_checks(testdata: Path, tmp_path: Path) -> None:
    for p in jpeg_files(testdata):
        info = jpeg_info(p.read_bytes())
        with Image.open(p) as im:
            assert (info.width, info.height) == im.size
            assert info.orientation == (im.getexif().get(0x0112) or 1)
    corrupt = (testdata / "mixed_images" / "ukbench09268_corrupt.jpg").read_bytes()
    assert isinstance(jpeg_info(corrupt), str)
    good = (testdata / "base_images" / "ukbench00120.jpg").read_bytes()
    assert "end marker" in jpeg_info(good[: len(good) // 2])
    assert isinstance(jpeg_info(good[:100]), str)
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).convert("CMYK").save(buf, "JPEG")
    assert "4 components" in jpeg_info(buf.getvalue())
    # EXIF orientation from a file PIL wrote.
    exif = Image.Exif()
    exif[0x0112] = 8
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(buf, "JPEG", exif=exif)
    info = jpeg_info(buf.getvalue())
    assert info == JpegInfo(60, 40, 8) and info.upright_size() == (40, 60)


def collect(files, spec: PrepSpec, decoder: str, batch_size: int = 5, log=None) -> tuple[dict, dict]:
    items, failures = {}, {}
    for b in iter_batches(
        files,
        lambda im: prepare_pil(im, spec),
        batch_size=batch_size,
        min_size=0,
        decoder=decoder,
        spec=spec,
        workers=2,
        log=log,
    ):
        items.update(zip(b.indices, b.items))
        for i, r in b.failures:
            assert i not in failures, "a file reported twice"
            failures[i] = r
    return items, failures


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.resize_mode}-{s.size[0]}x{s.size[1]}")
def test_dali_cpu_matches_open_clip_preprocess(testdata: Path, tmp_path: Path, spec: PrepSpec) -> None:
    files = jpeg_files(testdata)
    # Add an EXIF-rotated JPEG: DALI turns it upright as PIL does.
    exif = Image.Exif()
    exif[0x0112] = 6
    rot = tmp_path / "rotated.jpg"
    decode_pil(files[0], 0).save(rot, exif=exif, quality=92)
    files.append(rot)
    got, failures = collect(files, spec, "dali-cpu")
    assert not failures and len(got) == len(files)
    ref_tf = open_clip_transform(spec)
    for i, f in enumerate(files):
        ours = normalize_ref(np.asarray(got[i])[None], spec)[0]
        ref = ref_tf(decode_pil(f, 0)).numpy()  # open_clip on a full decode: the reference
        # Same geometry to the pixel; only the resampling filters' rounding differs.
        assert np.abs(ours - ref).mean() < 1.0 / 255 / min(spec.std), f
        assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] > 0.999, f


def test_dali_cpu_embeddings_match_open_clip(testdata: Path, tiny_model: str) -> None:
    enc = load_encoder(tiny_model, device="cpu")
    files = jpeg_files(testdata)
    got, failures = collect(files, enc.spec, "dali-cpu", batch_size=4)
    assert not failures
    x = enc.encode_batch([got[i] for i in range(len(files))])
    model, pre = open_clip.create_model_from_pretrained(tiny_model, return_transform=True)
    with torch.no_grad():
        ref = model.visual(torch.stack([pre(decode_pil(f, 0)) for f in files]))
        ref = torch.nn.functional.normalize(ref, dim=-1).numpy()
    cos = np.sum(x * ref, axis=1)
    assert cos.min() >= 0.999, cos


def test_non_jpeg_goes_through_pil(testdata: Path) -> None:
    fmt = testdata / "formats_images"
    files = [
        fmt / "copyleft.tiff",
        fmt / "giphy.gif",
        fmt / "ukbench09380.webp",
        testdata / "alpha_channel_image.png",
    ]
    files += [fmt / "baboon.pgm", fmt / "ukbench09380.jpeg"]
    spec = PrepSpec((64, 64))
    got, failures = collect(files, spec, "dali-cpu", batch_size=3)
    assert not failures
    for i, f in enumerate(files[:-1]):
        np.testing.assert_array_equal(got[i], prepare_pil(decode_pil(f, 0), spec))


def test_bad_jpeg_mid_batch_is_reported_once(testdata: Path, tmp_path: Path) -> None:
    good = sorted((testdata / "base_images").glob("*.jpg"))
    b = bytearray(good[0].read_bytes())
    sof = main_segments(bytes(b))[0xC0]
    b[sof + 12] = 3  # first component's quantisation table: one that is never defined
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(bytes(b))
    assert isinstance(jpeg_info(bytes(b)), JpegInfo)  # only decoding can tell
    files = [*good[:3], bad, *good[3:]]
    for k, f in enumerate(good[3:6]):  # more batches after the failure: the rebuilt pipeline runs
        shutil.copy(f, tmp_path / f"again{k}.jpg")
        files.append(tmp_path / f"again{k}.jpg")
    logs: list[str] = []
    spec = PrepSpec((64, 64))
    got, failures = collect(files, spec, "dali-cpu", batch_size=4, log=logs.append)
    assert list(failures) == [3] and "\n" not in failures[3]
    assert sorted(got) == [i for i in range(len(files)) if i != 3]
    assert len(logs) == 1 and "DALI pipeline failed" in logs[0]
    ref, _ = collect(files, spec, "pil-full", batch_size=4)
    for i in got:
        assert np.abs(got[i].astype(int) - ref[i].astype(int)).mean() < 1.0


def test_dali_without_spec_falls_back_to_pil(testdata: Path, monkeypatch) -> None:
    enc = load_encoder("builtin:dct")
    files = sorted((testdata / "base_images").glob("*.jpg"))
    logs: list[str] = []
    kw = {"batch_size": 4, "min_size": 32, "spec": None, "log": logs.append}
    out = list(iter_batches(files, enc.prepare, decoder="dali-cpu", **kw))
    assert sum(len(b.items) for b in out) == len(files) and len(logs) == 1
    # Picked by default (as on a CUDA machine) rather than asked for: Pillow, without a word.
    monkeypatch.setattr(dali_mod.DECODERS.entries["dali"], "why_not", lambda: None)
    monkeypatch.delenv("CLIPDEDUP_DECODER", raising=False)
    logs.clear()
    assert dali_mod.DECODERS.get().name == "dali"
    out = list(iter_batches(files, enc.prepare, **kw))
    assert sum(len(b.items) for b in out) == len(files) and logs == []


@pytest.mark.gpu
def test_dali_mixed_matches_cpu(testdata: Path, tiny_model: str) -> None:
    enc = load_encoder(tiny_model, device="cuda")
    files = jpeg_files(testdata)
    got, failures = collect(files, enc.spec, "dali", batch_size=4)
    ref, _ = collect(files, enc.spec, "dali-cpu", batch_size=4)
    assert not failures
    for i in ref:
        assert isinstance(got[i], torch.Tensor) and got[i].is_cuda
        assert np.abs(got[i].cpu().numpy().astype(int) - ref[i].astype(int)).mean() < 2.0
    x = enc.encode_batch([got[i] for i in range(len(files))])
    y = enc.encode_batch([ref[i] for i in range(len(files))])
    assert np.sum(x * y, axis=1).min() > 0.999

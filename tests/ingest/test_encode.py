"""Encoder: preprocessing parity with open_clip, the fixed-shape runner (padding, capture fallback,
staging), the asynchronous writer, and the update loop around them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clipdedup import db as dbmod
from clipdedup.db.writer import AsyncWriter
from clipdedup.errors import UserError
from clipdedup.ingest.decode.base import decode_pil
from clipdedup.ingest.encode.base import load_encoder
from clipdedup.ingest.encode.batch_runner import BatchRunner, capture_eager
from clipdedup.ingest.prep import PrepSpec, normalize_ref, prepare_pil
from clipdedup.ingest.update import update_db
from clipdedup.util.threads import ThreadPlan, thread_plan, torch_threads
from helpers import open_clip_transform

SPECS = [
    PrepSpec((64, 64)),
    PrepSpec((64, 64), interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    PrepSpec((48, 80)),  # non-square 'shortest': ResizeKeepRatio + CenterCrop
    PrepSpec((64, 64), resize_mode="squash"),
    PrepSpec((56, 72), resize_mode="squash"),
    PrepSpec((64, 64), resize_mode="longest", fill=0),
    PrepSpec((50, 70), resize_mode="longest", fill=127),
]
# Awkward sizes on purpose: 1 px, thinner than the crop, odd, already the target size, large.
SIZES = [(1, 1), (5, 300), (300, 5), (63, 65), (64, 64), (65, 63), (640, 480), (481, 1203)]


@pytest.mark.parametrize(
    "spec", SPECS, ids=lambda s: f"{s.resize_mode}-{s.size[0]}x{s.size[1]}-{s.interpolation}"
)
def test_prepare_pil_matches_open_clip(spec: PrepSpec) -> None:
    rng = np.random.default_rng(0)
    ref_tf = open_clip_transform(spec)
    for w, h in SIZES:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ours = prepare_pil(img, spec)
        assert ours.shape == (*spec.size, 3) and ours.dtype == np.uint8
        got = normalize_ref(ours[None], spec)[0]
        want = ref_tf(img).numpy()
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"{w}x{h}")


def test_spec_from_open_clip_cfg() -> None:
    spec = PrepSpec.from_open_clip({"size": [448, 448], "resize_mode": "squash", "interpolation": "random"})
    assert spec.size == (448, 448) and spec.resize_mode == "squash" and spec.interpolation == "bicubic"
    # open_clip's non-square 'shortest' resize ignores the configured interpolation.
    spec = PrepSpec.from_open_clip({"size": [96, 128], "interpolation": "bilinear"})
    assert spec.interpolation == "bicubic"
    spec = PrepSpec.from_open_clip({"size": 224, "mean": 0.5, "std": 0.25, "fill_color": 3})
    assert spec.mean == (0.5,) * 3 and spec.std == (0.25,) * 3 and spec.fill == 3 and spec.min_side == 224


def test_runner_normalisation_matches_reference() -> None:
    spec = SPECS[1]
    rng = np.random.default_rng(1)
    u8 = rng.integers(0, 256, (5, *spec.size, 3), dtype=np.uint8)
    for channels_last in (False, True):
        runner = BatchRunner(lambda x: x.flatten(1), spec, batch_size=4, channels_last=channels_last)
        with torch.inference_mode():
            x = runner.step(torch.from_numpy(u8))
        ref = normalize_ref(u8, spec).reshape(5, -1)
        ref /= np.linalg.norm(ref, axis=1, keepdims=True)
        np.testing.assert_allclose(x.numpy(), ref, atol=1e-6)


def test_encoder_matches_open_clip_reference(tiny_model: str, testdata: Path) -> None:
    enc = load_encoder(tiny_model, device="cpu")
    model, pre = open_clip.create_model_from_pretrained(tiny_model, return_transform=True)
    files = sorted((testdata / "base_images").glob("*.jpg"))
    imgs = [decode_pil(f, 0) for f in files]
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model.visual(torch.stack([pre(i) for i in imgs])), dim=-1).numpy()
    got = enc.encode_batch([enc.prepare(i) for i in imgs])
    assert got.shape == (len(files), enc.dim) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-5)


class RecordingModel(torch.nn.Module):
    """A per-row model that records the batch shapes it sees."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(3 * 8 * 8, 16)
        self.shapes: list[tuple[int, ...]] = []
        self.last_input: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        self.last_input = x.detach().clone()
        return self.proj(x.flatten(1))


def _items(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return list(rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8))


@pytest.mark.parametrize("n", [1, 2, 6, 7, 8, 9, 23])
def test_fixed_shape_padding_matches_eager(n: int) -> None:
    spec = PrepSpec((8, 8))
    model = RecordingModel()
    eager = BatchRunner(model, spec, batch_size=8, fixed_shape=False)
    fixed = BatchRunner(model, spec, batch_size=8, fixed_shape=True, capture=capture_eager)
    items = _items(n, n)
    want = eager.encode(items)
    model.shapes.clear()
    got = fixed.encode(items)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert got.shape == (n, 16)
    # Every forward ran at the fixed batch shape (the probe that sizes the buffers runs at 1).
    assert {s[0] for s in model.shapes[1:]} == {8}, model.shapes
    assert fixed.mode == "fixed eager"


def test_padding_rows_are_zero_not_stale() -> None:
    spec = PrepSpec((8, 8))
    model = RecordingModel()
    runner = BatchRunner(model, spec, batch_size=4, fixed_shape=True, capture=capture_eager)
    runner.encode(_items(4, 1))  # fills every static row
    alone = BatchRunner(model, spec, batch_size=4, fixed_shape=False).encode(_items(1, 2))
    got = runner.encode(_items(1, 2))
    np.testing.assert_allclose(got, alone, atol=1e-6)
    pad = model.last_input[1:]
    shift = torch.tensor([-m / s for m, s in zip(spec.mean, spec.std)]).view(1, 3, 1, 1)
    torch.testing.assert_close(pad, shift.expand_as(pad))  # a zero uint8 pixel, normalised


def test_capture_failure_falls_back_to_eager_with_one_log_line() -> None:
    spec = PrepSpec((8, 8))
    model = RecordingModel()
    lines: list[str] = []

    def broken_capture(step, static):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    runner = BatchRunner(
        model, spec, batch_size=4, fixed_shape=True, capture=broken_capture, log=lines.append
    )
    want = BatchRunner(model, spec, batch_size=4, fixed_shape=False).encode(_items(11, 3))
    got = runner.encode(_items(11, 3))
    got2 = runner.encode(_items(11, 3) + _items(2, 4))  # grows the shape: still no second attempt
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(got2[:11], want, atol=1e-6)
    assert len(lines) == 1 and "capture failed" in lines[0] and "more detail" not in lines[0]
    assert runner.mode == "fixed eager"


def test_two_batches_in_flight_and_growth() -> None:
    spec = PrepSpec((8, 8))
    model = RecordingModel()
    ref = BatchRunner(model, spec, batch_size=4, fixed_shape=False)
    runner = BatchRunner(model, spec, batch_size=4, fixed_shape=True, capture=capture_eager)
    a, b, c = _items(3, 5), _items(4, 6), _items(6, 7)
    pa, pb = runner.submit(a), runner.submit(b)
    np.testing.assert_allclose(pa.result(), ref.encode(a), atol=1e-6)
    np.testing.assert_allclose(pb.result(), ref.encode(b), atol=1e-6)
    model.shapes.clear()
    np.testing.assert_allclose(runner.submit(c).result(), ref.encode(c), atol=1e-6)
    # Larger than the fitted shape: run eagerly at its own size, never captured again.
    assert runner.batch_size == 4 and model.shapes[0][0] == 6
    with pytest.raises(ValueError):
        runner.submit([])
    runner.fit(3)  # a smaller fixed shape: every forward at 3 from now on
    want = ref.encode(c)
    model.shapes.clear()
    np.testing.assert_allclose(runner.encode(c), want, atol=1e-6)
    assert {s[0] for s in model.shapes[1:]} == {3}, model.shapes


@pytest.mark.gpu
def test_cuda_graph_matches_eager(tiny_model: str, testdata: Path) -> None:
    files = sorted((testdata / "base_images").glob("*.jpg"))
    cpu = load_encoder(tiny_model, device="cpu")
    gpu = load_encoder(tiny_model, device="cuda", dtype="fp16", batch_size=4)
    items = [cpu.prepare(decode_pil(f, cpu.input_size)) for f in files]
    want, got = cpu.encode_batch(items), gpu.encode_batch(items)
    assert gpu.runner.mode == "graph"
    assert np.min(np.sum(want * got, axis=1)) > 0.999


def test_async_writer_writes_everything(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vecs = {f"d{k % 3}/img{k}.jpg": rng.normal(size=7).astype(np.float32) for k in range(50)}
    with AsyncWriter(tmp_path, max_queue=4) as w:
        for k, (rel, v) in enumerate(vecs.items()):
            w.put(rel, v, 1_600_000_000_000_000_000 + k)
            v[:] = 0  # the writer copied it
    assert w.written == 50
    for k, rel in enumerate(vecs):
        p = dbmod.npy_path(tmp_path, rel)
        assert np.load(p).shape == (7,)
        assert os.stat(p).st_mtime_ns == 1_600_000_000_000_000_000 + k


def test_async_writer_error_propagates_and_leaves_no_partial_file(tmp_path: Path) -> None:
    (tmp_path / "blocked").write_text("a file where a DB directory must go")
    v = np.ones(5, np.float32)
    with pytest.raises(UserError, match=r"blocked/x\.jpg\.npy: cannot write embedding"):
        with AsyncWriter(tmp_path, max_queue=2) as w:
            w.put("a.jpg", v)
            w.put("blocked/x.jpg", v)
            for k in range(20):
                w.put(f"later{k}.jpg", v)
            w.close()
    assert np.array_equal(np.load(tmp_path / "a.jpg.npy"), v)
    for p in tmp_path.iterdir():
        assert dbmod.TMP_MARK not in p.name
        if p.suffix == ".npy":
            assert np.array_equal(np.load(p), v)  # whole files only


def test_update_db_write_error_is_one_line(pics: Path, tmp_path: Path) -> None:
    db = tmp_path / "db"
    db.mkdir()
    (db / "base_images").write_text("not a directory")
    with pytest.raises(UserError) as e:
        update_db(pics, db, "builtin:dct", batch_size=4, log=lambda line: None)
    assert "\n" not in str(e.value) and "cannot write embedding" in str(e.value)


def test_update_db_dry_run_writes_nothing(pics: Path, tmp_path: Path) -> None:
    db = tmp_path / "db"
    s = update_db(pics, db, "builtin:dct", batch_size=3, dry_run=True, log=lambda line: None)
    assert not db.exists()
    assert len(s.in_memory) == 32 and s.encoded <= 32  # exact copies may share one encoding
    assert len(s.failed) == 2  # the two corrupt files, each reported once


def test_thread_plan_and_restore() -> None:
    assert thread_plan("cpu", 2) == ThreadPlan(2, 2, 0)  # a CPU model and decoding take turns
    assert thread_plan("cpu", 16) == ThreadPlan(16, 16, 0)
    assert thread_plan("cpu", 2, torch_model=False) == ThreadPlan(0, 2, 2)  # torch's setting left alone
    assert thread_plan("cuda", 32).decoders == 16
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before

"""DALI decoding: JPEG batches through nvJPEG ('mixed', on CUDA) or libjpeg-turbo ('cpu').

The pipeline reproduces open_clip's preprocessing from the model's `PrepSpec` (resize mode,
interpolation with antialiasing, centre crop or pad) and hands over (H, W, 3) uint8 images, the same
items the PIL path prepares; the encoder normalises them. Only JPEG goes to DALI: PNG, WebP, GIF,
BMP, TIFF and PNM go through PIL on every path, as does any JPEG that a cheap header check finds odd
(CMYK, 12-bit, lossless or arithmetic-coded, no end marker, larger than PIL's bomb limit).

DALI ends a whole pipeline on one undecodable file ("Critical error in pipeline ... no longer
valid"). When that happens the pipeline is rebuilt and that batch's JPEGs go through PIL instead,
so the bad file is reported once, by PIL, and the run goes on.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

from clipdedup.ingest.decode.base import (
    DECODERS,
    Batch,
    _reason,
    decode_pil,
    decode_prepare,
    iter_pool,
    sniff,
)
from clipdedup.ingest.prep import PrepSpec, crop_box, resized_size

# SOF markers of JPEG modes DALI decodes like libjpeg does for PIL: baseline, extended, progressive.
_SOF_OK = {0xC0, 0xC1, 0xC2}
_SOF_ALL = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
MIN_JPEG_BYTES = 125  # the smallest well-formed JPEG is larger than this


def dali_why_not(device: str) -> str | None:
    """None if a DALI pipeline on `device` ('mixed' or 'cpu') can run here, else why not.

    CUDA is checked first: a CPU-only run does not pay for importing DALI just to pick a decoder.
    """
    if device == "mixed":
        import torch

        if not torch.cuda.is_available():
            return "no CUDA device (DALI 'mixed' decodes on the GPU)"
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        return f"nvidia.dali cannot be imported ({e}); pip install nvidia-dali-cuda130"
    return None


@dataclass(frozen=True)
class JpegInfo:
    width: int  # as stored, before EXIF orientation
    height: int
    orientation: int  # EXIF orientation 1..8 (1 when absent)

    def upright_size(self) -> tuple[int, int]:
        """(width, height) after the EXIF orientation is applied (5..8 swap the sides)."""
        return (self.height, self.width) if self.orientation in (5, 6, 7, 8) else (self.width, self.height)


def _exif_orientation(seg: bytes) -> int:
    """Orientation tag of an APP1 Exif payload ("Exif\\0\\0" + TIFF), 1 when absent or unreadable."""
    t = seg[6:]
    if len(t) < 8 or t[:2] not in (b"II", b"MM"):
        return 1
    order: Literal["little", "big"] = "little" if t[:2] == b"II" else "big"
    ifd = int.from_bytes(t[4:8], order)
    if ifd + 2 > len(t):
        return 1
    for k in range(int.from_bytes(t[ifd : ifd + 2], order)):
        e = ifd + 2 + 12 * k
        if e + 12 > len(t):
            break
        if int.from_bytes(t[e : e + 2], order) == 0x0112:
            v = int.from_bytes(t[e + 8 : e + 10], order)
            return v if 1 <= v <= 8 else 1
    return 1


def jpeg_info(data: bytes | np.ndarray) -> JpegInfo | str:
    """The frame size and EXIF orientation of a JPEG that is safe to hand to DALI, else why it goes
    to PIL instead.

    Walks the marker segments up to the frame header (EXIF is read, other segments are skipped by
    their length) and checks the frame and the end marker. Cheap: no pixel is decoded.
    """
    b = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
    n = len(b)
    if n < MIN_JPEG_BYTES or b[:3] != b"\xff\xd8\xff":
        return "not a complete JPEG header"
    if b"\xff\xd9" not in b[max(0, n - 4096) :]:
        return "no JPEG end marker (truncated?)"
    pos, orientation = 2, 1
    while pos + 4 <= n:
        if b[pos] != 0xFF:
            return "bad JPEG marker"
        marker = b[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        seg = (b[pos + 2] << 8) | b[pos + 3]
        if marker == 0xE1 and b[pos + 4 : pos + 10] == b"Exif\x00\x00" and orientation == 1:
            orientation = _exif_orientation(b[pos + 4 : pos + 2 + seg])
        if marker in _SOF_ALL:
            if marker not in _SOF_OK:
                return f"JPEG mode SOF{marker - 0xC0} (not baseline/progressive)"
            if pos + 10 > n:
                return "truncated JPEG frame header"
            precision, h, w, comps = (
                b[pos + 4],
                (b[pos + 5] << 8) | b[pos + 6],
                (b[pos + 7] << 8) | b[pos + 8],
                b[pos + 9],
            )
            if precision != 8 or comps not in (1, 3):
                return f"{precision}-bit JPEG with {comps} components"
            limit = Image.MAX_IMAGE_PIXELS
            if h == 0 or w == 0 or (limit is not None and w * h > limit):
                return f"JPEG frame {w}x{h}"
            return JpegInfo(w, h, orientation)
        if marker == 0xDA:  # scan before any frame header
            return "JPEG scan without a frame header"
        pos += 2 + seg
    return "no JPEG frame header"


def geometry(info: JpegInfo, spec: PrepSpec) -> tuple[np.ndarray, np.ndarray]:
    """Per-image DALI arguments: resize size (h, w) and slice anchor (y, x), float32.

    Computed with the same rounding as the PIL path (`resized_size`, `crop_box`), so both paths
    take the same pixels; a negative anchor is torchvision's padding.
    """
    w, h = info.upright_size()
    nw, nh = resized_size(w, h, spec)
    pl, pt, _, _, cl, ct = crop_box(nw, nh, spec)
    return np.array([nh, nw], np.float32), np.array([ct - pt, cl - pl], np.float32)


def build_pipeline(spec: PrepSpec, *, device: str, batch_size: int, threads: int, device_id: int | None):
    """A DALI pipeline fed "encoded" bytes, "size" and "anchor" (see `geometry`) -> (H, W, 3) uint8."""
    from nvidia.dali import fn, pipeline_def, types

    # The same enum members as types.INTERP_*, which DALI's stubs do not declare.
    interp = (
        types.DALIInterpType.INTERP_LINEAR
        if spec.interpolation == "bilinear"
        else types.DALIInterpType.INTERP_CUBIC
    )
    th, tw = spec.size
    extra = {"jpeg_fancy_upsampling": True} if device == "mixed" else {}
    fill = float(spec.fill) if spec.resize_mode == "longest" else 0.0

    # DALI's overload types device_id as int, but it documents and accepts None (no GPU).
    @pipeline_def(
        batch_size=batch_size,
        num_threads=threads,
        device_id=device_id,  # type: ignore[arg-type]
        prefetch_queue_depth=1,
    )
    def pipe():
        enc = fn.external_source(name="encoded", dtype=types.UINT8)
        size = fn.external_source(name="size", dtype=types.FLOAT)
        anchor = fn.external_source(name="anchor", dtype=types.FLOAT)
        img = fn.decoders.image(enc, device=device, output_type=types.RGB, adjust_orientation=True, **extra)
        # subpixel_scale off: the whole input maps onto the integral output size, as in PIL.
        img = fn.resize(img, size=size, interp_type=interp, antialias=True, subpixel_scale=False)
        return fn.slice(
            img,
            anchor,
            np.array([th, tw], np.float32),
            axes=[0, 1],
            normalized_anchor=False,
            normalized_shape=False,
            out_of_bounds_policy="pad",
            fill_values=fill,
        )

    p = pipe()
    p.build()
    return p


class DaliRunner:
    """Owns one pipeline; `run` decodes a list of JPEG byte arrays or raises (then rebuild)."""

    def __init__(self, spec: PrepSpec, *, device: str, batch_size: int, threads: int, torch_device: str):
        self.spec, self.device, self.batch_size, self.threads = spec, device, batch_size, threads
        self.torch_device = torch_device
        self.device_id: int | None = None
        if device == "mixed":
            import torch

            td = torch.device(torch_device)
            self.device_id = (td.index or 0) if td.type == "cuda" else torch.cuda.current_device()
        self.pipe = self._build()

    def _build(self):
        return build_pipeline(
            self.spec,
            device=self.device,
            batch_size=self.batch_size,
            threads=self.threads,
            device_id=self.device_id,
        )

    def rebuild(self) -> None:
        self.pipe = None  # let the dead pipeline go before the new one takes its memory
        self.pipe = self._build()

    def run(self, blobs: list[np.ndarray], infos: list[JpegInfo]) -> list[Any]:
        """(H, W, 3) uint8 per blob: numpy for 'cpu', CUDA tensors for 'mixed'."""
        geo = [geometry(info, self.spec) for info in infos]
        self.pipe.feed_input("encoded", blobs)
        self.pipe.feed_input("size", [g[0] for g in geo])
        self.pipe.feed_input("anchor", [g[1] for g in geo])
        (out,) = self.pipe.run()
        if self.device != "mixed":
            return list(out.as_array())
        import torch
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = out.as_tensor()
        t = torch.empty(dense.shape(), dtype=torch.uint8, device=f"cuda:{self.device_id}")
        feed_ndarray(dense, t, cuda_stream=torch.cuda.current_stream(self.device_id))
        return list(t.to(self.torch_device).unbind(0))


def _read(path: str | os.PathLike[str]) -> tuple[np.ndarray | None, str | None]:
    try:
        return np.fromfile(path, dtype=np.uint8), None
    except OSError as e:
        return None, f"{type(e).__name__}: {e.strerror or e}"


def iter_dali(
    paths: Sequence[str | os.PathLike[str]],
    prepare: Callable[[Image.Image], Any],
    *,
    dali_device: str,
    batch_size: int,
    min_size: int,
    workers: int,
    prefetch: int = 2,
    spec: PrepSpec | None = None,
    device: str = "cpu",
    log: Callable[[str], None],
) -> Iterator[Batch]:
    """Batches as `clipdedup.ingest.decode.base.iter_batches` describes, JPEGs decoded by DALI.

    A background thread runs the pipeline `prefetch` batches ahead of the consumer.
    """
    if spec is None:
        log("clipdedup: decoder 'dali' needs an open_clip model's preprocessing; using 'pil'")
        yield from iter_pool(paths, prepare, batch_size=batch_size, min_size=min_size, workers=workers)
        return
    runner = DaliRunner(spec, device=dali_device, batch_size=batch_size, threads=workers, torch_device=device)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="clipdedup-dali-io")

    def make(start: int) -> Batch:
        idx = list(range(start, min(start + batch_size, len(paths))))
        read = list(pool.map(lambda i: _read(paths[i]), idx))
        to_dali: list[int] = []
        to_pil: list[int] = []
        batch = Batch([], [], [])
        blobs: dict[int, tuple[np.ndarray, JpegInfo]] = {}
        for i, (data, err) in zip(idx, read):
            if err is not None or data is None:
                batch.failures.append((i, err or "unreadable"))
                continue
            info = jpeg_info(data) if sniff(data[:16].tobytes()) == "jpeg" else None
            if isinstance(info, JpegInfo):
                to_dali.append(i)
                blobs[i] = (data, info)
            else:
                to_pil.append(i)
        got: dict[int, Any] = {}
        if to_dali:
            try:
                items = runner.run([blobs[i][0] for i in to_dali], [blobs[i][1] for i in to_dali])
                got = dict(zip(to_dali, items))
            except Exception as e:  # DALI's pipeline is dead after any decode error
                log(f"clipdedup: DALI pipeline failed ({_reason(e)}); rebuilt, this batch goes through PIL")
                runner.rebuild()
                to_pil += to_dali
        pil = pool.map(lambda i: decode_prepare(paths[i], decode_pil, prepare, min_size), to_pil)
        for i, (item, err) in zip(to_pil, pil):
            if err is None:
                got[i] = item
            else:
                batch.failures.append((i, err))
        for i in sorted(got):
            batch.indices.append(i)
            batch.items.append(got[i])
        batch.failures.sort()
        return batch

    yield from _prefetched(range(0, len(paths), batch_size), make, prefetch, pool)


def _prefetched(starts: Sequence[int], make: Callable[[int], Batch], depth: int, pool) -> Iterator[Batch]:
    """`make(s)` for each start, computed by one background thread up to `depth` batches ahead."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(msg: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(msg, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False  # the consumer went away

    def produce() -> None:
        try:
            for s in starts:
                if not put(("ok", make(s))):
                    return
            put(("end", None))
        except BaseException as e:  # hand any error to the consumer, which re-raises it
            put(("error", e))

    t = threading.Thread(target=produce, name="clipdedup-dali", daemon=True)
    t.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(0.1)
        pool.shutdown(wait=True)


def _iter(dali_device: str):
    def source(paths, prepare, **kw):
        return iter_dali(paths, prepare, dali_device=dali_device, **kw)

    source.needs_spec = True  # type: ignore[attr-defined]
    return source


DECODERS.register(
    "dali",
    priority=20,
    why_not=lambda: dali_why_not("mixed"),
    doc="DALI 'mixed': nvJPEG on the GPU (hardware JPEG decoder where present); non-JPEG via PIL",
)(_iter("mixed"))
DECODERS.register(
    "dali-cpu",
    priority=-10,
    why_not=lambda: dali_why_not("cpu"),
    doc="DALI 'cpu': libjpeg-turbo in DALI's thread pool; slower than 'pil' here, for parity checks",
)(_iter("cpu"))

"""Decoders: image files -> batches of model inputs, bad files as one-line reasons.

One registry (`DECODERS`, override `CLIPDEDUP_DECODER`) of batch sources:
- `pil`: PIL with JPEG draft mode, the CPU default. libjpeg scales by 1/2, 1/4 or 1/8 in the DCT
  domain while decoding, so a 12 MP photo is never fully decoded just to be shrunk to 224 px.
  pillow-simd, when a user has swapped it in for Pillow, is detected and used as is.
- `pil-full`: full-resolution PIL decode (the original tool's way; a baseline).
- `dali` (nvJPEG on CUDA) and `dali-cpu` (see `clipdedup.ingest.decode.dali`): JPEG through a DALI pipeline;
  every other format (PNG, WebP, GIF, BMP, TIFF, PNM) still goes through PIL.
Bad files come back as one-line reasons, never as exceptions.
"""

from __future__ import annotations

import importlib.metadata
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL
from PIL import Image, ImageOps

from clipdedup.registry import Registry

# name -> batch source: fn(paths, prepare, *, batch_size, min_size, workers, prefetch, spec, device,
# log) -> Iterator[Batch]; see `iter_batches`.
DECODERS: Registry[Callable[..., Iterator[Batch]]] = Registry("decoder", env_var="CLIPDEDUP_DECODER")

# Leading bytes of the formats this tool reads; anything else still gets a try in PIL.
_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)


def sniff(head: bytes) -> str | None:
    """The image format that the first bytes of a file announce (by content, not by name), or None."""
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if len(head) >= 2 and head[:1] == b"P" and head[1:2] in b"123456":
        return "pnm"
    return None


def pillow_simd_version() -> str | None:
    """The pillow-simd version when it replaces Pillow in this environment, else None.

    pillow-simd installs as the `PIL` package under its own distribution name and versions like
    9.5.0.post1; it is an opt-in swap (see docs/backends.md), never a dependency.
    """
    try:
        return importlib.metadata.version("pillow-simd")
    except importlib.metadata.PackageNotFoundError:
        pass
    return PIL.__version__ if ".post" in PIL.__version__ else None


class DecodeError(Exception):
    """A file that is not a decodable image; the message is the one-line reason."""


def _reason(e: BaseException) -> str:
    msg = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # Deep grayscale: scale to 8 bits instead of clipping everything above 255 to white.
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        im = Image.fromarray(np.clip(a * (255.0 / hi), 0, 255).astype(np.uint8), "L")
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im


def decode_pil(path: str | os.PathLike[str], min_size: int) -> Image.Image:
    """Opens `path` as an RGB image whose shorter side is at least `min_size` (when the source is).

    Raises:
        DecodeError: the file is not a readable image.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.format == "JPEG" and min_size > 0:
                    # draft() keeps both sides >= the requested size, so Resize sees enough pixels.
                    im.draft("RGB", (min_size, min_size))
                im.load()
                upright = ImageOps.exif_transpose(im) or im
                return _to_rgb(upright)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError(f"decompression bomb refused: {_reason(e)}") from None
    except Exception as e:  # any decoder failure is a property of the file
        raise DecodeError(_reason(e)) from None


def decode_pil_full(path: str | os.PathLike[str], min_size: int) -> Image.Image:
    """A full-resolution decode whatever `min_size` is (the original tool's way)."""
    return decode_pil(path, 0)


@dataclass
class Batch:
    indices: list[int]  # positions in the input list that decoded
    items: list[Any]  # prepared items, one per index
    failures: list[tuple[int, str]]  # (position, reason)


def iter_batches(
    paths: Sequence[str | os.PathLike[str]],
    prepare: Callable[[Image.Image], Any],
    *,
    batch_size: int,
    min_size: int,
    workers: int | None = None,
    decoder: str | None = None,
    prefetch: int = 2,
    spec: Any = None,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
) -> Iterator[Batch]:
    """Decodes and prepares `paths` in batches, `prefetch` batches ahead of the consumer.

    Args:
        paths: image files; every one ends up in exactly one batch, as an item or a failure.
        prepare: RGB PIL image -> model input (run in decoder threads).
        batch_size: paths per batch (the last one may be shorter).
        min_size: shorter side the decoder must deliver (JPEG draft target).
        workers: decoder threads (default: one per core, at most 8).
        decoder: a `DECODERS` name; default the environment override, else the best available.
        spec: the model's `PrepSpec`, for decoders that resize themselves (DALI); None if unknown.
        device: the encoder's torch device (DALI 'mixed' hands over CUDA tensors).
        log: one-line notices (a DALI fallback); per-file failures come back in `Batch.failures`.
    """
    source = DECODERS.get(decoder).fn
    if getattr(source, "needs_spec", False) and spec is None and decoder is None:
        if not os.environ.get(DECODERS.env_var or ""):
            # The best decoder resizes by a model's PrepSpec and this encoder has none
            # (builtin:dct): the Pillow path serves it, nothing to say about it.
            source = DECODERS.get("pil").fn
    return source(
        paths,
        prepare,
        batch_size=batch_size,
        min_size=min_size,
        workers=workers or max(1, min(8, os.cpu_count() or 1)),
        prefetch=prefetch,
        spec=spec,
        device=device,
        log=log or (lambda line: None),
    )


def decode_prepare(
    path: str | os.PathLike[str], decode: Callable[..., Image.Image], prepare: Callable, min_size: int
) -> tuple[Any, str | None]:
    """(item, None) or (None, reason): one file through `decode` and `prepare`, never raising."""
    try:
        return prepare(decode(path, min_size)), None
    except DecodeError as e:
        return None, str(e)
    except Exception as e:  # a preprocessing failure on odd input is also the file's
        return None, _reason(e)


def iter_pool(
    paths: Sequence[str | os.PathLike[str]],
    prepare: Callable[[Image.Image], Any],
    *,
    decode: Callable[..., Image.Image] = decode_pil,
    batch_size: int,
    min_size: int,
    workers: int,
    prefetch: int = 2,
    **_: Any,
) -> Iterator[Batch]:
    """Per-file decoding in a thread pool; the consumer (the encoder) runs while the pool works on
    the next batches. PIL releases the GIL in its decode and resize loops."""

    def one(i: int) -> tuple[int, Any, str | None]:
        return (i, *decode_prepare(paths[i], decode, prepare, min_size))

    starts = list(range(0, len(paths), batch_size))
    with ThreadPoolExecutor(workers, thread_name_prefix="clipdedup-decode") as pool:
        pending: list[list[Future[tuple[int, Any, str | None]]]] = []

        def submit(k: int) -> None:
            s = starts[k]
            pending.append([pool.submit(one, i) for i in range(s, min(s + batch_size, len(paths)))])

        for k in range(min(prefetch, len(starts))):
            submit(k)
        for k in range(len(starts)):
            if k + prefetch < len(starts):
                submit(k + prefetch)
            batch = Batch([], [], [])
            for fut in pending.pop(0):
                i, item, err = fut.result()
                if err is None:
                    batch.indices.append(i)
                    batch.items.append(item)
                else:
                    batch.failures.append((i, err))
            yield batch

"""Decoders: file path -> RGB PIL image at (at least) the model's input size.

The CPU default is PIL with JPEG draft mode: libjpeg scales by 1/2, 1/4 or 1/8 in the DCT domain
while decoding, so a 12 MP photo is never fully decoded just to be shrunk to 224 px. Bad files come
back as one-line reasons, never as exceptions.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from clipdedup.registry import Registry

DECODERS: Registry[Callable[..., Any]] = Registry("decoder", env_var="CLIPDEDUP_DECODER")


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


@DECODERS.register("pil", priority=10, doc="PIL with JPEG draft mode (DCT-domain downscaling)")
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
                im = ImageOps.exif_transpose(im) or im
                return _to_rgb(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError(f"decompression bomb refused: {_reason(e)}") from None
    except Exception as e:  # any decoder failure is a property of the file
        raise DecodeError(_reason(e)) from None


@DECODERS.register("pil-full", priority=0, doc="PIL full-resolution decode (the original's way)")
def decode_pil_full(path: str | os.PathLike[str], min_size: int) -> Image.Image:
    return decode_pil(path, 0)


@dataclass
class Batch:
    indices: list[int]  # positions in the input list that decoded
    items: list[Any]  # preprocessed items, one per index
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
) -> Iterator[Batch]:
    """Decodes and prepares images in a thread pool, `prefetch` batches ahead of the consumer.

    The consumer (the encoder) runs while the pool works on the next batches, so decoding overlaps
    with inference. PIL and torchvision release the GIL in their C loops.
    """
    decode = DECODERS.get(decoder).fn
    workers = workers or max(1, min(8, os.cpu_count() or 1))

    def one(i: int) -> tuple[int, Any, str | None]:
        try:
            return i, prepare(decode(paths[i], min_size)), None
        except DecodeError as e:
            return i, None, str(e)
        except Exception as e:  # a preprocessing failure on odd input is also the file's
            return i, None, _reason(e)

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

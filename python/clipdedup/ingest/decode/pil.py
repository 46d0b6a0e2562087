"""Pillow decoders: `pil` (JPEG draft mode, the CPU default; pillow-simd used as is when swapped in)
and `pil-full` (full-resolution decode, the original tool's way)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import PIL

from clipdedup.ingest.decode.base import (
    DECODERS,
    Batch,
    decode_pil,
    decode_pil_full,
    iter_pool,
    pillow_simd_version,
)


def _pil_doc() -> str:
    simd = pillow_simd_version()
    lib = f"pillow-simd {simd}" if simd else f"Pillow {PIL.__version__}"
    return f"{lib} with JPEG draft mode (DCT-domain downscaling); the CPU default"


@DECODERS.register("pil", priority=10, doc=_pil_doc())
def iter_pil(paths: Sequence[str | os.PathLike[str]], prepare: Callable, **kw: Any) -> Iterator[Batch]:
    return iter_pool(paths, prepare, decode=decode_pil, **kw)


@DECODERS.register("pil-full", priority=0, doc="PIL full-resolution decode (the original's way)")
def iter_pil_full(paths: Sequence[str | os.PathLike[str]], prepare: Callable, **kw: Any) -> Iterator[Batch]:
    return iter_pool(paths, prepare, decode=decode_pil_full, **kw)

"""Encoders: batches of prepared images -> L2-normalised float32 embeddings.

`load_encoder(model_id)` resolves a model id through the encoder registry: `builtin:*` names, else
open_clip (`hf-hub:org/name`, `local-dir:/path`, `ARCH/TAG` or `ARCH/path/to/checkpoint`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clipdedup.errors import DBMismatchError, ModelError
from clipdedup.ingest.prep import PrepSpec
from clipdedup.registry import Registry

DEFAULT_MODEL = "hf-hub:timm/PE-Core-bigG-14-448"
CLIP_DEFAULT_THRESHOLD = 0.1


@dataclass(frozen=True)
class EncoderFactory:
    """A registered encoder: how to load it and the threshold its embeddings are matched with when
    -th is not given (the one place a model's default threshold is defined)."""

    load: Callable[..., Encoder]
    default_threshold: float = CLIP_DEFAULT_THRESHOLD
    # A model whose rows carry a check part: how its screened candidates are verified
    # (clipdedup.match.verify.verifier.Verifier); None: every pair within the threshold is a duplicate.
    verifier: Any = None
    # The calibrate transforms the model is meant to catch; None: all of them.
    calibration_targets: tuple[str, ...] | None = None
    # Revision of what a row means when that changed at the same dim (builtin:dct); the encoder
    # records it in the DB metadata as preprocess["layout"] (absent: 1). None: never revised.
    layout: int | None = None


# Factories keyed by model-id prefix; "open_clip" takes every id no other entry claims.
ENCODERS: Registry[EncoderFactory] = Registry("encoder")

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass
class Encoder:
    """A loaded model. `prepare` runs in decoder threads; `encode_batch` on the consumer thread.

    Attributes:
        prepare: RGB PIL image -> one model input (for open_clip: (H, W, 3) uint8, resized and
            cropped; normalisation happens batched inside `encode_batch`).
        encode_batch: list of inputs -> (B, D) float32, L2-normalised rows.
        spec: open_clip preprocessing as data, for decoders that resize themselves (DALI);
            None when only `prepare` knows how (builtin encoders).
        submit: optional asynchronous `encode_batch`: returns an object whose `result()` gives the
            (B, D) array, so the caller can stage the next batch while this one runs.
        encode_into_db: set by an encoder that runs elsewhere (a Ray cluster, `clipdedup.cluster`):
            called by `update_db` instead of its local decode -> encode -> write loop, with the
            same arguments.
    """

    model_id: str
    dim: int
    input_size: int  # shorter side the decoder must deliver at least
    prepare: Callable[[Any], Any]
    encode_batch: Callable[[list[Any]], np.ndarray]
    preprocess: dict = field(default_factory=dict)  # recorded in the DB metadata
    device: str = "cpu"
    spec: PrepSpec | None = None
    submit: Callable[[list[Any]], Any] | None = None
    runner: Any = None  # the BatchRunner, for its `mode` (graph / eager) in reports
    encode_into_db: Callable[..., None] | None = None


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


OFFLINE_HINT = "-m builtin:dct works offline (model-free: no weights, no download, no GPU)"
# CPU seconds per image of the default model on one core: it does ~480x the work of ViT-B-32 at
# 224 px (1,025 tokens of a 1.9B-parameter tower against 50 of an 88M one), and ViT-B-32 fp32
# encodes ~24 images/s on this project's 2-core x86-64 test machine (docs/benchmarks.md), so
# 480 * 2 / 24 = 40 core-seconds per image.
DEFAULT_MODEL_CPU_CORE_SECONDS = 40.0
SMALL_MODEL = "ViT-B-32/laion2b_s34b_b79k"


def cpu_rate_notice(model_id: str, device: str) -> str | None:
    """One line for a run of the default model without CUDA: its expected rate here and what to pick
    instead; None for any other model or device."""
    if device != "cpu" or canonical_model_id(model_id) != DEFAULT_MODEL:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    sec = DEFAULT_MODEL_CPU_CORE_SECONDS / cores
    return (
        f"{DEFAULT_MODEL.split('/')[-1]} without CUDA: expect ~{sec:.0f} s per image on {cores} CPU cores; "
        f"pick a smaller model with -m {SMALL_MODEL} (~500x less work), or -m builtin:dct (model-free, "
        "hundreds of images/s)"
    )


def load_encoder(
    model_id: str,
    *,
    device: str | None = None,
    dtype: str | None = None,
    batch_size: int = 32,
    log: Callable[[str], None] | None = None,
) -> Encoder:
    """Loads the encoder for `model_id` (see module docstring). Raises ModelError on failure.

    `batch_size` is the fixed batch shape a CUDA graph is captured at (it grows if a larger batch
    comes); `log` receives one-line notices (a graph capture that failed).
    """
    # a built-in encoder runs on the CPU: no torch import to ask about CUDA
    device = device or ("cpu" if model_id.startswith("builtin:") else default_device())
    notice = cpu_rate_notice(model_id, device)
    if notice and log is not None:
        log(notice)
    kw = {"device": device, "dtype": dtype, "batch_size": batch_size, "log": log}
    if model_id.startswith("builtin:"):
        if model_id not in ENCODERS.entries:
            known = ", ".join(n for n in ENCODERS.names() if n.startswith("builtin:"))
            raise ModelError(f"unknown built-in encoder {model_id!r}; known: {known or 'none'}")
        return ENCODERS.get(model_id).fn.load(model_id, **kw)
    return ENCODERS.get("open_clip").fn.load(model_id, **kw)


class LazyEncoder:
    """An encoder loaded on first use and then kept: one model for a whole run (import mode's two
    DBs included), and none at all when nothing needs encoding."""

    def __init__(self, load: Callable[[], Encoder]) -> None:
        self._load = load
        self._encoder: Encoder | None = None

    @classmethod
    def of(cls, encoder: Encoder) -> LazyEncoder:
        """One that is loaded already."""
        lazy = cls(lambda: encoder)
        lazy._encoder = encoder
        return lazy

    @property
    def loaded(self) -> bool:
        return self._encoder is not None

    def get(self) -> Encoder:
        if self._encoder is None:
            self._encoder = self._load()
        return self._encoder


def encoder_factory(model_id: str) -> EncoderFactory:
    """The registered factory of `model_id`: a built-in encoder's own, else open_clip's (which takes
    every other id, as `load_encoder` does)."""
    entry = ENCODERS.entries.get(model_id) if model_id.startswith("builtin:") else None
    return (entry or ENCODERS.entries["open_clip"]).fn


def verifier_for(model_id: str | None) -> Any:
    """The verifier a model declares (its `EncoderFactory.verifier`, a
    `clipdedup.match.verify.verifier.Verifier`), or None."""
    return encoder_factory(model_id).verifier if model_id else None


def layout_mismatch(meta: Any) -> str | None:
    """Why a DB's rows (its `DBMeta`) cannot be read by this version's code for its model: they were
    written under another row layout (`EncoderFactory.layout`); None when they can."""
    want = encoder_factory(meta.model_id).layout
    have = meta.preprocess.get("layout", 1) if isinstance(meta.preprocess, dict) else 1
    if want is None or have == want:
        return None
    return (
        f"DB holds {meta.model_id} rows of layout {have} ({meta.dim} dims), this version reads layout {want}"
    )


def check_layout(db_dir: str | os.PathLike[str], meta: Any, *, fix: str) -> None:
    """Raises DBMismatchError (one line, ending with `fix`) when `layout_mismatch(meta)`."""
    why = layout_mismatch(meta)
    if why is not None:
        raise DBMismatchError(f"{db_dir}: {why}; {fix}")


def default_threshold(model_id: str) -> float:
    """The euclidean threshold a model's embeddings are matched with when -th is not given.

    0.1 for CLIP models (the original tool's default); a built-in encoder's own measured default.
    """
    return encoder_factory(model_id).default_threshold


def canonical_model_id(model_id: str) -> str:
    """The id recorded in DB metadata: local paths made absolute so a DB can be checked later."""
    if model_id.startswith("local-dir:"):
        return "local-dir:" + os.path.abspath(os.path.expanduser(model_id[len("local-dir:") :]))
    if "/" in model_id and not model_id.startswith(("hf-hub:", "builtin:")):
        arch, _, tag = model_id.partition("/")
        if os.path.sep in tag or os.path.isfile(tag):
            return f"{arch}/{os.path.abspath(tag)}"
    return model_id

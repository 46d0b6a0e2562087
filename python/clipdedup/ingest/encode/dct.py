"""`builtin:dct`: a model-free near-duplicate encoder (no weights, no GPU).

An image becomes grayscale 32x32 (aspect ratio not kept, as perceptual hashes do); its 2-D DCT-II
is taken and the low-frequency K x K block without the DC term is the embedding, L2-normalised.
Dropping DC and normalising make it blind to brightness and contrast changes; re-encoding, resizing
and format changes barely move the lowest frequencies; a horizontal flip negates every odd
horizontal frequency, so mirrored images are far apart. The distance stays a real number, so one
euclidean threshold serves the same matcher and DB as the CLIP encoders.

Two refinements over the plain vector, both chosen by bench/bench_dct_quality.py (recall at
precision 1.0 on its tuning set rose from 0.64 to 0.99, see docs/benchmarks.md):
- before the DCT the mean is removed and the image is tapered by a raised-cosine window, so the
  border (what a crop or a caption changes first) weighs less than the centre;
- each coefficient is compressed to sign(c) |c|^0.2 before normalising, so the few strongest
  frequencies do not decide the distance alone (pHash's median threshold is the limit of this).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image

from clipdedup.errors import ModelError
from clipdedup.ingest.encode.base import ENCODERS, Encoder, EncoderFactory

MODEL_ID = "builtin:dct"
SIZE = 32  # side of the grayscale image the DCT is taken of
BLOCK = 12  # K: the K x K lowest frequencies are kept, DC dropped -> K*K - 1 dims
WINDOW = 0.8  # raised-cosine taper: weight (1 - a cos(2 pi (i + 1/2) / n)) / (1 + a), 0.11 at the border
POWER = 0.2  # coefficient compression sign(c) |c|^POWER
# Chosen by bench/bench_dct_quality.py: the middle of the range (0.84..0.94) where its tuning half
# has precision 1.0 and recall no longer grows (see docs/benchmarks.md).
DEFAULT_THRESHOLD = 0.88
FLAT_NORM = 1e-2  # AC norm (grey levels) below which an image counts as flat


def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix C, (n, n) float64: the DCT of a vector x is C @ x."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    c = np.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c


def window(n: int, a: float = WINDOW) -> np.ndarray:
    """(n,) float64 raised-cosine taper, 1 at the centre."""
    return (1.0 - a * np.cos(2.0 * math.pi * (np.arange(n) + 0.5) / n)) / (1.0 + a)


_C = dct_matrix(SIZE)[:BLOCK]  # (K, 32): only the rows that are kept
_W = np.outer(window(SIZE), window(SIZE))  # (32, 32)


def dct_features(gray: np.ndarray) -> np.ndarray:
    """Fast path: the K x K low-frequency coefficients as two small matrix products per image.

    Args:
        gray: (B, 32, 32) grayscale in [0, 255], any float or integer dtype.

    Returns:
        (B, K*K - 1) float32, L2-normalised rows; a flat image gives the zero vector.
    """
    x = np.asarray(gray, np.float64)
    x = (x - x.mean(axis=(1, 2), keepdims=True)) * _W
    coef = _C @ x @ _C.T  # [B, K, K], float64: the power below magnifies rounding of small values
    v = coef.reshape(len(coef), BLOCK * BLOCK)[:, 1:]
    flat = np.linalg.norm(v, axis=1) <= FLAT_NORM
    v = np.sign(v) * np.abs(v) ** POWER
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    # A flat image has no AC energy: it stays the zero vector (distance 0 to other flat images,
    # 1 to everything else) rather than a direction made of rounding noise. One grey level on one
    # pixel already gives the kept block a norm of ~0.25; float64 rounding stays far below 1e-2.
    v = np.divide(v, norm, out=np.zeros_like(v), where=~flat[:, None])
    return v.astype(np.float32)


def dct_features_ref(gray: np.ndarray) -> np.ndarray:
    """Reference: the same features written out plainly, the DCT-II summed term by term."""
    x = np.asarray(gray, np.float64)
    n = x.shape[-1]
    out = np.zeros((len(x), BLOCK * BLOCK - 1), np.float32)
    pos = np.arange(n)
    taper = window(n)
    for b in range(len(x)):
        img = (x[b] - x[b].mean()) * taper[:, None] * taper[None, :]
        vals = []
        for u in range(BLOCK):  # vertical frequency (rows y)
            for v in range(BLOCK):  # horizontal frequency (columns x)
                if u == v == 0:
                    continue
                cu = math.sqrt((1.0 if u == 0 else 2.0) / n)
                cv = math.sqrt((1.0 if v == 0 else 2.0) / n)
                cos_y = np.cos(math.pi * (2 * pos + 1) * u / (2 * n))
                cos_x = np.cos(math.pi * (2 * pos + 1) * v / (2 * n))
                vals.append(cu * cv * float(cos_y @ img @ cos_x))
        c = np.array(vals)
        if math.sqrt(float(np.sum(c * c))) <= FLAT_NORM:
            continue
        c = np.sign(c) * np.abs(c) ** POWER
        out[b] = c / math.sqrt(float(np.sum(c * c)))
    return out


def prepare_dct(img: Image.Image) -> np.ndarray:
    """RGB PIL image -> (32, 32) float32 luma, resized with an antialiasing box filter."""
    g = img.convert("L").resize((SIZE, SIZE), Image.Resampling.BOX)
    return np.asarray(g, dtype=np.float32)


def _encode(items: list[Any]) -> np.ndarray:
    if not items:
        return np.zeros((0, BLOCK * BLOCK - 1), np.float32)
    return dct_features(np.stack(items))


def load_dct(model_id: str, *, device: str = "cpu", dtype: str | None = None, **_: Any) -> Encoder:
    if model_id != MODEL_ID:
        raise ModelError(f"unknown built-in encoder {model_id!r}; did you mean {MODEL_ID}?")
    return Encoder(
        model_id=MODEL_ID,
        dim=BLOCK * BLOCK - 1,
        input_size=SIZE,
        prepare=prepare_dct,
        encode_batch=_encode,
        preprocess={
            "gray": True,
            "size": SIZE,
            "resize": "box, aspect not kept",
            "block": BLOCK,
            "window": WINDOW,
            "power": POWER,
        },
        device="cpu",
    )


ENCODERS.add(
    MODEL_ID,
    EncoderFactory(load_dct, DEFAULT_THRESHOLD),
    doc="model-free: 2-D DCT of 32x32 grayscale (no weights, no GPU)",
)

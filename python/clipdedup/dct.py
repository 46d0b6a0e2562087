"""`builtin:dct`: a model-free near-duplicate encoder (no weights, no GPU).

An image becomes grayscale 32x32 (aspect ratio not kept, as perceptual hashes do), its 2-D DCT-II
is taken, and the low-frequency K x K block without the DC term is the embedding, L2-normalised.
Dropping DC and normalising make it blind to brightness and contrast changes; re-encoding, resizing
and format changes barely move the lowest frequencies; a horizontal flip negates every odd
horizontal frequency, so mirrored images are far apart. It is pHash's vector before the median
threshold: the distance stays a real number, so one euclidean threshold serves the same matcher and
DB as the CLIP encoders. The threshold and block size were chosen by bench/bench_dct_quality.py.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image

from clipdedup.encode import ENCODERS, Encoder
from clipdedup.errors import ModelError

MODEL_ID = "builtin:dct"
SIZE = 32  # side of the grayscale image the DCT is taken of
BLOCK = 8  # K: the K x K lowest frequencies are kept, DC dropped -> K*K - 1 dims
# Chosen by bench/bench_dct_quality.py on its generated set (see the README's Numbers section).
DEFAULT_THRESHOLD = 0.4
FLAT_NORM = 1e-2  # AC norm (grey levels) below which an image counts as flat


def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix C, (n, n) float64: the DCT of a vector x is C @ x."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    c = np.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c


_C = dct_matrix(SIZE)[:BLOCK].astype(np.float32)  # (K, 32): only the rows that are kept


def _finish(coef: np.ndarray) -> np.ndarray:
    """(B, K, K) coefficients -> (B, K*K - 1) float32, DC dropped, rows L2-normalised (zero stays 0)."""
    v = coef.reshape(len(coef), coef.shape[1] * coef.shape[2])[:, 1:].astype(np.float32)
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    # A flat image has no AC energy: it stays the zero vector (distance 0 to other flat images,
    # 1 to everything else) rather than a direction made of rounding noise. One grey level on one
    # pixel already gives the kept block a norm of ~0.25; float32 rounding stays below 1e-3.
    return np.divide(v, norm, out=np.zeros_like(v), where=norm > FLAT_NORM)


def dct_features(gray: np.ndarray) -> np.ndarray:
    """Fast path: only the K x K low-frequency coefficients, as two small matrix products.

    Args:
        gray: (B, 32, 32) float32 grayscale in [0, 255].

    Returns:
        (B, K*K - 1) float32, L2-normalised rows.
    """
    x = np.asarray(gray, np.float32)
    coef = _C @ x @ _C.T  # [B, K, K]
    return _finish(coef)


def dct_features_ref(gray: np.ndarray) -> np.ndarray:
    """Reference: the DCT-II definition summed term by term in float64, all 32 x 32 coefficients."""
    x = np.asarray(gray, np.float64)
    n = x.shape[-1]
    out = np.zeros((len(x), n, n))
    pos = np.arange(n)
    for u in range(n):
        cu = math.sqrt(1.0 / n) if u == 0 else math.sqrt(2.0 / n)
        cos_u = np.cos(math.pi * (2 * pos + 1) * u / (2 * n))  # over rows y
        for v in range(n):
            cv = math.sqrt(1.0 / n) if v == 0 else math.sqrt(2.0 / n)
            cos_v = np.cos(math.pi * (2 * pos + 1) * v / (2 * n))  # over columns x
            out[:, u, v] = cu * cv * np.einsum("byx,y,x->b", x, cos_u, cos_v)
    return _finish(out[:, :BLOCK, :BLOCK])


def prepare_dct(img: Image.Image) -> np.ndarray:
    """RGB PIL image -> (32, 32) float32 luma, resized with an antialiasing box filter."""
    g = img.convert("L").resize((SIZE, SIZE), Image.Resampling.BOX)
    return np.asarray(g, dtype=np.float32)


def _encode(items: list[Any]) -> np.ndarray:
    if not items:
        return np.zeros((0, BLOCK * BLOCK - 1), np.float32)
    return dct_features(np.stack(items))


@ENCODERS.register(MODEL_ID, doc="model-free: 2-D DCT of 32x32 grayscale (no weights, no GPU)")
def load_dct(model_id: str, *, device: str = "cpu", dtype: str | None = None, **_: Any) -> Encoder:
    if model_id != MODEL_ID:
        raise ModelError(f"unknown built-in encoder {model_id!r}; did you mean {MODEL_ID}?")
    return Encoder(
        model_id=MODEL_ID,
        dim=BLOCK * BLOCK - 1,
        input_size=SIZE,
        prepare=prepare_dct,
        encode_batch=_encode,
        preprocess={"gray": True, "size": SIZE, "resize": "box, aspect not kept", "block": BLOCK},
        default_threshold=DEFAULT_THRESHOLD,
        device="cpu",
    )


load_dct.default_threshold = DEFAULT_THRESHOLD  # type: ignore[attr-defined]

"""`builtin:dct`: a model-free near-duplicate encoder (no weights, no GPU), screened then verified.

Each row holds two parts (see clipdedup.match.verify.verifier for why both live in one embedding):
- screen (BLOCK*BLOCK - 1 dims): an image becomes grayscale 32x32 (aspect ratio not kept, as
  perceptual hashes do); its 2-D DCT-II is taken and the low-frequency K x K block without the DC term
  is kept, L2-normalised. Dropping DC and normalising make it blind to brightness and contrast
  changes; re-encoding, resizing and format changes barely move the lowest frequencies; a horizontal
  flip negates every odd horizontal frequency, so mirrored images are far apart. Before the DCT the
  mean is removed and the image is tapered by a raised-cosine window (the border, what a crop or a
  caption changes first, weighs less); each coefficient is compressed to sign(c) |c|^0.2 so the few
  strongest frequencies do not decide the distance alone.
- check (CHECK*CHECK + 2*CHROMA*CHROMA dims): the CHECK x CHECK luma thumbnail and the CHROMA x
  CHROMA Cb/Cr block means, in grey levels, compared by clipdedup.match.verify.warp_check: gates on
  brightness, spread and colour strength, the chroma cosine, and the worst block of the luma after
  one thumbnail is aligned onto the other (scale and offset per axis: a crop of up to 5% per side
  scales the picture by up to 10%, which no whole-pixel move undoes). It is blind to +-10% brightness
  and contrast, not to a recolouring or a greyscale copy, and a change confined to one part of the
  picture (another frame of an animation, a sprite with and without its engine glow) counts in full.

The decoder delivers at least DECODE_SIDE pixels on the shorter side (JPEG draft mode scales by
1/2 to 1/8 in the DCT domain) and the box filter averages that down to CHECK x CHECK; the screen's
SIZE x SIZE grey image is the mean of 2 x 2 blocks of that. A draft scale of 1/4 or 1/8 is a
low-pass of each 8 x 8 block on its own, not an area average, and drifts from a full decode on fine
detail (sprite sheets, small icons scaled up), which the check would see.

LAYOUT numbers what a row means; the DB metadata records it (`preprocess["layout"]`) and a DB of
another layout is refused with one line (`clipdedup.ingest.encode.base.layout_mismatch`), never
misread. Layout 1 (no "layout" key, 527 dims): decoded at >= 32 px, a 16 x 16 luma check. Layouts 2
and 3 (1,295 dims): a 32 x 32 smoothed, normalised luma check compared over whole-pixel moves,
decoded at >= 64 and >= 128 px. Layout 4 (4,367 dims): the raw 64 x 64 luma and 8 x 8 chroma of
the aligned check. (Layouts 1 and 4 are refused by their dim already; the layout also covers a
change at the same dim.)

A pair is a duplicate when its screening distance is <= the threshold and its check score is
>= MIN_SCORE. Both defaults come from bench/bench_dct_quality.py's `choose` on the tuning half of
bench/corpus.py (docs/benchmarks.md).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import numpy as np
from PIL import Image

from clipdedup.errors import ModelError
from clipdedup.ingest.encode.base import ENCODERS, Encoder, EncoderFactory
from clipdedup.match.verify.verifier import Verifier
from clipdedup.match.verify.warp_check import WarpCheck, warp_scores, warp_scores_ref

MODEL_ID = "builtin:dct"
SIZE = 32  # side of the grayscale image the DCT is taken of
BLOCK = 12  # K: the K x K lowest frequencies are kept, DC dropped -> K*K - 1 dims
WINDOW = 0.8  # raised-cosine taper: weight (1 - a cos(2 pi (i + 1/2) / n)) / (1 + a), 0.11 at the border
POWER = 0.2  # coefficient compression sign(c) |c|^POWER
CHECK = 64  # side of the luma thumbnail of the check (clipdedup.match.verify.warp_check)
MARGIN = 8  # pixels cut from each edge of the first side's window before the alignment
CHROMA = 8  # side of the chroma (Cb, Cr) thumbnail compared beside it
DECODE_SIDE = 128  # shorter side the decoder must deliver before the box filter makes CHECK x CHECK
LAYOUT = 4  # row layout revision, recorded in the DB metadata (module docstring)
# Chosen by `choose` in bench/bench_dct_quality.py on the tuning half of bench/corpus.py: pair
# precision >= 0.99 at the highest recall (docs/benchmarks.md).
DEFAULT_THRESHOLD = 1.0
MIN_SCORE = 0.82
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
    """RGB PIL image -> (CHECK, CHECK, 3) float32, resized with an antialiasing box filter."""
    return np.asarray(img.convert("RGB").resize((CHECK, CHECK), Image.Resampling.BOX), dtype=np.float32)


_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601, as Pillow's convert("L")
_CBCR = np.array([[-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])  # JFIF Cb, Cr (centred)


def luma(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB -> (...) float64 luma, ITU-R 601 weights as Pillow's convert("L")."""
    return np.asarray(rgb, np.float64) @ _LUMA


def _blocks(x: np.ndarray, side: int) -> np.ndarray:
    """(B, n, n, C) -> (B, side, side, C) block means."""
    f = x.shape[1] // side
    return x.reshape(len(x), side, f, side, f, x.shape[-1]).mean(axis=(2, 4))


def check_features(rgb: np.ndarray) -> np.ndarray:
    """Fast path: the check part of a batch, [luma | chroma] in grey levels (nothing normalised: the
    check compares brightness, spread and colour strength too, clipdedup.match.verify.warp_check).

    Args:
        rgb: (B, CHECK, CHECK, 3) in [0, 255], any float or integer dtype.

    Returns:
        (B, CHECK_DIM) float32: the CHECK x CHECK luma, then CHROMA x CHROMA block means of (Cb, Cr),
        interleaved per block.
    """
    x = np.asarray(rgb, np.float64)
    return _check_of(x, luma(x))


def _check_of(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """`check_features` of float64 RGB x whose luma y (B, CHECK, CHECK) is already taken."""
    n = len(x)
    c = _blocks(x @ _CBCR.T, CHROMA).reshape(n, CHROMA * CHROMA * 2)
    return np.concatenate([y.reshape(n, CHECK * CHECK), c], axis=1).astype(np.float32)


def check_features_ref(rgb: np.ndarray) -> np.ndarray:
    """Reference: the check part written out pixel by pixel and block by block."""
    x = np.asarray(rgb, np.float64)
    out = np.zeros((len(x), CHECK_DIM), np.float32)
    g = CHECK // CHROMA
    for b in range(len(x)):
        px = [x[b, i, j] for i in range(CHECK) for j in range(CHECK)]
        out[b, : CHECK * CHECK] = [float(np.dot(v, _LUMA)) for v in px]
        cs = []
        for i in range(CHROMA):
            for j in range(CHROMA):
                px = [x[b, i * g + u, j * g + v] for u in range(g) for v in range(g)]
                cs += [sum(float(np.dot(_CBCR[k], p)) for p in px) / g**2 for k in range(2)]
        out[b, CHECK * CHECK :] = cs
    return out


def embed(rgb: np.ndarray) -> np.ndarray:
    """(B, CHECK, CHECK, 3) prepared images -> (B, SCREEN_DIM + CHECK_DIM) float32 rows [screen | check];
    the screen's SIZE x SIZE grey image is the mean of CHECK/SIZE-pixel blocks of the check's luma."""
    x = np.asarray(rgb, np.float64)
    y = luma(x)
    gray = _blocks(y[..., None], SIZE)[..., 0]
    return np.concatenate([dct_features(gray), _check_of(x, y)], axis=1)


SCREEN_DIM = BLOCK * BLOCK - 1
SHAPE = WarpCheck(side=CHECK, margin=MARGIN, chroma=CHROMA)
CHECK_DIM = SHAPE.dims
VERIFIER = Verifier(
    screen_dims=SCREEN_DIM,
    min_score=MIN_SCORE,
    measure=(
        f"1 - worst block residual of {CHECK}x{CHECK} luma after aligning scale and offset per axis, "
        f"and the cosine of {CHROMA}x{CHROMA} chroma; -1: brightness, spread or colour differ"
    ),
    score=partial(warp_scores, shape=SHAPE),
    score_ref=partial(warp_scores_ref, shape=SHAPE),
)


def _encode(items: list[Any]) -> np.ndarray:
    if not items:
        return np.zeros((0, SCREEN_DIM + CHECK_DIM), np.float32)
    return embed(np.stack(items))


def load_dct(model_id: str, *, device: str = "cpu", dtype: str | None = None, **_: Any) -> Encoder:
    if model_id != MODEL_ID:
        raise ModelError(f"unknown built-in encoder {model_id!r}; did you mean {MODEL_ID}?")
    return Encoder(
        model_id=MODEL_ID,
        dim=SCREEN_DIM + CHECK_DIM,
        input_size=DECODE_SIDE,
        prepare=prepare_dct,
        encode_batch=_encode,
        preprocess={
            "layout": LAYOUT,
            "decode_side": DECODE_SIDE,
            "gray": "luma of the box-resized RGB",
            "size": SIZE,
            "resize": "box, aspect not kept",
            "block": BLOCK,
            "window": WINDOW,
            "power": POWER,
            "check": f"luma {CHECK}x{CHECK} + CbCr {CHROMA}x{CHROMA} in grey levels, aligned per pair",
            "check_margin": MARGIN,
        },
        device="cpu",
    )


# What `calibrate` measures recall on for this model: re-encoding, resizing, a small centred crop and
# a brightness change. An off-centre 90% crop moves the low frequencies as far as a distinct image.
CALIBRATION_TARGETS = ("jpeg-q70", "resize-50%", "crop-96%", "bright+10%")

ENCODERS.add(
    MODEL_ID,
    EncoderFactory(
        load_dct,
        DEFAULT_THRESHOLD,
        verifier=VERIFIER,
        calibration_targets=CALIBRATION_TARGETS,
        layout=LAYOUT,
    ),
    doc="model-free: 2-D DCT of 32x32 grayscale, verified by luma/chroma thumbnails (no weights, no GPU)",
)

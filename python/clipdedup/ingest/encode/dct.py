"""`builtin:dct`: a model-free near-duplicate encoder (no weights, no GPU), screened then verified.

Each row holds two parts (see clipdedup.match.verify for why both live in one embedding):
- screen (BLOCK*BLOCK - 1 dims): an image becomes grayscale 32x32 (aspect ratio not kept, as
  perceptual hashes do); its 2-D DCT-II is taken and the low-frequency K x K block without the DC term
  is kept, L2-normalised. Dropping DC and normalising make it blind to brightness and contrast
  changes; re-encoding, resizing and format changes barely move the lowest frequencies; a horizontal
  flip negates every odd horizontal frequency, so mirrored images are far apart. Before the DCT the
  mean is removed and the image is tapered by a raised-cosine window (the border, what a crop or a
  caption changes first, weighs less); each coefficient is compressed to sign(c) |c|^0.2 so the few
  strongest frequencies do not decide the distance alone.
- check (CHECK*CHECK + 2*CHROMA*CHROMA dims): the 32 x 32 luma thumbnail, smoothed, centred and
  L2-normalised, compared by the largest normalised correlation of one's central window (MARGIN
  pixels cut from each edge) with the other's moved by up to SHIFT pixels each way (a crop of up to
  5% per side moves the picture by up to ~1.6 thumbnail pixels), and an 8 x 8 Cb/Cr thumbnail,
  L2-normalised but not centred (the colour itself counts; zero for a grey image: no block's Cb or
  Cr mean reaches COLOURLESS grey levels, so a mostly grey picture with a few coloured details is
  judged on its colour too). A pair's score is the smaller of the two, the colour one skipped when
  either image is grey (clipdedup.match.verify.Verifier). It is blind
  to brightness and contrast, and to a greyscale copy, but not to a recolouring, and it weighs
  pixels by their contrast, not by power-compressed frequencies: skies, gradients and recoloured
  shots that the DCT brings close are told apart.

The decoder delivers at least DECODE_SIDE pixels on the shorter side (JPEG draft mode scales by
1/2 to 1/8 in the DCT domain) and the box filter averages that down to 32 x 32: from a decode of
just over 32 pixels the box would mix unequal pixel counts per thumbnail pixel, and duplicates of
one picture decoded at different draft scales would drift apart. DECODE_SIDE is 128, not 64: a
draft scale of 1/4 or 1/8 is a low-pass of each 8 x 8 block on its own, not an area average, and
on fine detail (sprite sheets, small icons scaled up) a JPEG decoded at 1/4 correlated 0.80-0.91
with a PNG copy of the same pixels where both decoded in full correlated 0.97-0.999; on the tuning
half, recall at precision 0.99 went from 0.940 (64) to 0.957 (128; 96: 0.952, 192: 0.954, full
decode 0.955) at about the same encode rate (docs/benchmarks.md).

LAYOUT numbers what a row means; the DB metadata records it (`preprocess["layout"]`) and a DB of
another layout is refused with one line (`clipdedup.ingest.encode.base.layout_mismatch`), never
misread. Layout 1 (no "layout" key, 527 dims): decoded at >= 32 px, a 16 x 16 luma check, an
image grey when its RMS chroma was below 4 levels. Layout 2 (1,295 dims): decoded at >=
64 px, the 32 x 32 luma check compared over small moves, grey by the largest block chroma.
Layout 3 (1,295 dims): the same, decoded at >= DECODE_SIDE (128) px.
(A DB of layout 1 is refused by its dim already; the layout also covers a change at the same dim.)

A pair is a duplicate when its screening distance is <= the threshold and its check score is
>= MIN_SCORE. Both defaults come from bench/bench_dct_quality.py's `choose` on the tuning half of
bench/corpus.py (docs/benchmarks.md).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image

from clipdedup.errors import ModelError
from clipdedup.ingest.encode.base import ENCODERS, Encoder, EncoderFactory
from clipdedup.match.verify import Verifier

MODEL_ID = "builtin:dct"
SIZE = 32  # side of the grayscale image the DCT is taken of
BLOCK = 12  # K: the K x K lowest frequencies are kept, DC dropped -> K*K - 1 dims
WINDOW = 0.8  # raised-cosine taper: weight (1 - a cos(2 pi (i + 1/2) / n)) / (1 + a), 0.11 at the border
POWER = 0.2  # coefficient compression sign(c) |c|^POWER
CHECK = 32  # side of the luma thumbnail whose normalised correlation verifies a candidate
SHIFT = 1  # largest move (thumbnail pixels) of one check window against the other
# Pixels cut from each edge of the fixed window. The edges are what a crop or a caption changes;
# tuning-half recall at precision 0.99: 0.957 (2), 0.960 (3, 4 and 5; 4 with no hard negative).
MARGIN = 4
CHROMA = 8  # side of the chroma (Cb, Cr) thumbnail compared beside it
COLOURLESS = 3.0  # grey levels: an image whose every block's |Cb| and |Cr| stay below this is grey
DECODE_SIDE = 128  # shorter side the decoder must deliver before the box filter makes 32 x 32
LAYOUT = 3  # row layout revision, recorded in the DB metadata (module docstring)
CHECK_FLAT = 0.5  # RMS luma spread (grey levels) below which the check counts an image as flat
# Chosen by `choose` in bench/bench_dct_quality.py on the tuning half of bench/corpus.py: pair
# precision >= 0.99 at the highest recall (docs/benchmarks.md).
DEFAULT_THRESHOLD = 0.94
MIN_SCORE = 0.945
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
    """RGB PIL image -> (32, 32, 3) float32, resized with an antialiasing box filter."""
    return np.asarray(img.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BOX), dtype=np.float32)


_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601, as Pillow's convert("L")
_CBCR = np.array([[-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])  # JFIF Cb, Cr (centred)


def luma(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB -> (...) float64 luma, ITU-R 601 weights as Pillow's convert("L")."""
    return np.asarray(rgb, np.float64) @ _LUMA


def _blocks(x: np.ndarray, side: int) -> np.ndarray:
    """(B, 32, 32, C) -> (B, side, side, C) block means."""
    f = SIZE // side
    return x.reshape(len(x), side, f, side, f, x.shape[-1]).mean(axis=(2, 4))


def _smooth(y: np.ndarray) -> np.ndarray:
    """(B, n, n) -> the same smoothed by the [1, 2, 1] / 4 kernel along both axes, edges repeated:
    a crop of a few percent shifts the content by a fraction of a thumbnail pixel, and a smoothed
    thumbnail correlates through such a shift."""
    p = np.pad(y, ((0, 0), (1, 1), (0, 0)), mode="edge")
    y = (p[:, :-2] + 2.0 * p[:, 1:-1] + p[:, 2:]) / 4.0
    p = np.pad(y, ((0, 0), (0, 0), (1, 1)), mode="edge")
    return (p[:, :, :-2] + 2.0 * p[:, :, 1:-1] + p[:, :, 2:]) / 4.0


def _unit(t: np.ndarray, zero: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(t, axis=1, keepdims=True)
    return np.divide(t, norm, out=np.zeros_like(t), where=~zero[:, None])


def check_features(rgb: np.ndarray) -> np.ndarray:
    """Fast path: the check part of a batch, [luma | chroma].

    Args:
        rgb: (B, 32, 32, 3) in [0, 255], any float or integer dtype.

    Returns:
        (B, CHECK_DIM) float32. luma: CHECK x CHECK block means of the luma, smoothed (`_smooth`),
        their mean removed, L2-normalised (zero for a flat image: RMS spread below CHECK_FLAT).
        chroma: CHROMA x CHROMA block means of (Cb, Cr), not centred (the colour itself counts),
        L2-normalised; zero for a grey image (every block's |Cb| and |Cr| below COLOURLESS grey
        levels), so that a greyscale copy is judged on luma alone.
    """
    x = np.asarray(rgb, np.float64)
    n = len(x)
    y = _smooth(_blocks(luma(x)[..., None], CHECK)[..., 0]).reshape(n, CHECK * CHECK)
    y -= y.mean(axis=1, keepdims=True)
    flat = np.linalg.norm(y, axis=1) <= CHECK_FLAT * CHECK  # RMS over CHECK*CHECK values
    c = _blocks(x @ _CBCR.T, CHROMA).reshape(n, CHROMA * CHROMA * 2)
    grey = np.abs(c).max(axis=1, initial=0.0) < COLOURLESS
    return np.concatenate([_unit(y, flat), _unit(c, grey)], axis=1).astype(np.float32)


def _clamp(i: int) -> int:
    return min(max(i, 0), CHECK - 1)


def check_features_ref(rgb: np.ndarray) -> np.ndarray:
    """Reference: the check part written out block by block."""
    x = np.asarray(rgb, np.float64)
    out = np.zeros((len(x), CHECK_DIM), np.float32)
    for b in range(len(x)):
        lum = [[float(np.dot(x[b, i, j], _LUMA)) for j in range(SIZE)] for i in range(SIZE)]
        f = SIZE // CHECK
        blk = [
            [sum(lum[i * f + u][j * f + v] for u in range(f) for v in range(f)) / f**2 for j in range(CHECK)]
            for i in range(CHECK)
        ]

        k = {-1: 0.25, 0: 0.5, 1: 0.25}
        ys = [
            sum(k[u] * k[v] * blk[_clamp(i + u)][_clamp(j + v)] for u in k for v in k)
            for i in range(CHECK)
            for j in range(CHECK)
        ]
        m = sum(ys) / len(ys)
        ys = [v - m for v in ys]
        norm = math.sqrt(sum(v * v for v in ys))
        if norm > CHECK_FLAT * CHECK:
            out[b, : CHECK * CHECK] = [v / norm for v in ys]
        g = SIZE // CHROMA
        cs = []
        for i in range(CHROMA):
            for j in range(CHROMA):
                px = [x[b, i * g + u, j * g + v] for u in range(g) for v in range(g)]
                cs += [sum(float(np.dot(_CBCR[k], p)) for p in px) / g**2 for k in range(2)]
        norm = math.sqrt(sum(v * v for v in cs))
        if max(abs(v) for v in cs) >= COLOURLESS:
            out[b, CHECK * CHECK :] = [v / norm for v in cs]
    return out


def embed(rgb: np.ndarray) -> np.ndarray:
    """(B, 32, 32, 3) prepared images -> (B, SCREEN_DIM + CHECK_DIM) float32 rows [screen | check]."""
    rgb = np.asarray(rgb)
    return np.concatenate([dct_features(luma(rgb)), check_features(rgb)], axis=1)


SCREEN_DIM = BLOCK * BLOCK - 1
CHECK_DIM = CHECK * CHECK + 2 * CHROMA * CHROMA
VERIFIER = Verifier(
    screen_dims=SCREEN_DIM,
    required_dims=CHECK * CHECK,
    min_score=MIN_SCORE,
    measure=(
        f"correlation of {CHECK}x{CHECK} luma thumbnails (best of moves up to {SHIFT} px) "
        f"and of {CHROMA}x{CHROMA} chroma"
    ),
    shift=SHIFT,
    margin=MARGIN,
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
            "check": f"luma {CHECK}x{CHECK} smoothed, centred + CbCr {CHROMA}x{CHROMA}, each L2-normalised",
            "check_shift": [SHIFT, MARGIN],
            "colourless": COLOURLESS,
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

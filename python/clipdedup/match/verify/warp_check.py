"""builtin:dct's check: two small images compared after aligning one onto the other.

A candidate pair of the screen is confirmed by comparing the images themselves, from a check part
stored in each row: [luma (N x N box means, grey levels) | chroma (C x C block means of Cb, Cr)].

The score of a pair (a, b) is defined in four steps:

1. Gates. mu, sd: mean and spread (population standard deviation) of the N x N luma; cm: RMS of
   the C x C chroma magnitudes. A duplicate (re-encoded, resized, cropped a little, +-10% brightness
   or contrast) keeps all three within a few percent; the pair is refused (score -1) when
   |ln((sd_a + 1) / (sd_b + 1))| > SD_LOG, |ln((mu_a + 8) / (mu_b + 8))| > MU_LOG or, unless either
   side is grey (no chroma block reaches COLOURLESS grey levels: a greyscale copy is a duplicate),
   |ln((cm_a + 2) / (cm_b + 2))| > CM_LOG: a flat panel beside a framed one, a dark logo beside a
   bright one, a faintly tinted sprite beside a strongly coloured one.
2. Colour: the cosine of the two chroma vectors, or 1 when either has no block reaching COLOURLESS
   grey levels (both are nearly grey: the luma decides).
3. Alignment: a crop of up to 5% per side scales and moves the picture by up to 10% and 5% on each
   axis, which no whole-pixel move undoes. On the half-size (N/2) smoothed thumbnails, the best
   whole-pixel move of b against a's central window (MARGIN/2 cut from each edge) within +-1 pixel
   is refined by ITERS Gauss-Newton steps on four warp parameters (scale and offset per axis, b
   sampled bilinearly at (s (y - c) + c + o)) plus a gain and a bias (brightness and contrast), with
   scales kept within 1 +- SCALE_LIM and offsets within +-OFFSET_LIM of the side.
4. Local agreement: at full size, a's smoothed central window (MARGIN cut) and b's smoothed
   thumbnail warped by those parameters, each centred and scaled to unit norm (ua, ub), are cut into
   GRID x GRID blocks; block k's residual e_k = sum (ua - ub)^2 against its share of the signal
   s_k = sum (ua^2 + ub^2) / 2. loc = max_k e_k / (s_k + FLOOR); the luma term is 1 - loc. A whole-
   picture correlation hides a change confined to one part (another frame of an animation, a sprite
   with and without its engine glow, two portraits on one body); a duplicate's residual is spread
   thin over every block. A flat window (norm below FLAT) scores 1 beside a flat one, 0 otherwise.

The score is min(luma term, colour term) after the gates, in [-3, 1] (a block's residual is at most
four times its signal; -1 also stands for a gate's refusal), and the pair is confirmed at
>= the model's minimum score. `warp_scores_ref` is the definition, in float64 numpy per pair;
`warp_scores` is the native fast path (clipdedup.native.warp_scores, float64 throughout), and
tests compare the two on random and real rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from clipdedup import native

COLOURLESS = 3.0  # grey levels: a side whose every chroma block stays below this counts as grey
SD_LOG, CM_LOG, MU_LOG = 0.3, 0.8, 0.3  # gate bounds on the log ratios of spread, colour, brightness
ITERS = 5  # Gauss-Newton steps of the alignment
SCALE_LIM = 0.12  # warp scale within 1 +- this
OFFSET_LIM = 0.1  # warp offset within +- this fraction of the side
GRID = 4  # blocks per side of the local comparison
FLOOR = 0.02  # added to each block's signal share (a block with little signal may differ a little)
FLAT = 1e-6  # norm of a centred window below which it counts as flat
DAMP = 1e-6  # added to the Gauss-Newton normal matrix's diagonal


@dataclass(frozen=True)
class WarpCheck:
    """Shape of the check part: N x N luma then 2 x C x C chroma (Cb, Cr per block, interleaved)."""

    side: int = 64  # N, even
    margin: int = 8  # pixels cut from each edge of a's window at full size (even)
    chroma: int = 8  # C

    @property
    def dims(self) -> int:
        return self.side * self.side + 2 * self.chroma * self.chroma


def smooth(y: np.ndarray) -> np.ndarray:
    """(..., n, n) -> smoothed by [1, 2, 1] / 4 along both axes, edges repeated."""
    p = np.concatenate([y[..., :1, :], y, y[..., -1:, :]], axis=-2)
    y = (p[..., :-2, :] + 2.0 * p[..., 1:-1, :] + p[..., 2:, :]) / 4.0
    p = np.concatenate([y[..., :, :1], y, y[..., :, -1:]], axis=-1)
    return (p[..., :, :-2] + 2.0 * p[..., :, 1:-1] + p[..., :, 2:]) / 4.0


def half(y: np.ndarray) -> np.ndarray:
    """(n, n) -> (n/2, n/2) means of 2 x 2 blocks."""
    n = y.shape[-1] // 2
    return y.reshape(n, 2, n, 2).mean(axis=(1, 3))


def gradients(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """d/dy, d/dx of (n, n): central differences inside, one-sided at the edges (numpy.gradient)."""
    gy, gx = np.gradient(y)
    return gy, gx


def sample(img: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Bilinear samples of (n, n) img on the grid rows yy x columns xx, coordinates clamped to
    [0, n - 1]; the cell is floor(coordinate), at most n - 2."""
    n = img.shape[0]
    yy, xx = np.clip(yy, 0.0, n - 1.0), np.clip(xx, 0.0, n - 1.0)
    y0 = np.minimum(np.floor(yy).astype(np.int64), n - 2)
    x0 = np.minimum(np.floor(xx).astype(np.int64), n - 2)
    fy, fx = (yy - y0)[:, None], (xx - x0)[None, :]
    a, b = img[y0][:, x0], img[y0][:, x0 + 1]
    c, d = img[y0 + 1][:, x0], img[y0 + 1][:, x0 + 1]
    return (a * (1.0 - fx) + b * fx) * (1.0 - fy) + (c * (1.0 - fx) + d * fx) * fy


def _zncc(u: np.ndarray, v: np.ndarray) -> float:
    u, v = u - u.mean(), v - v.mean()
    nu, nv = math.sqrt(float(np.sum(u * u))), math.sqrt(float(np.sum(v * v)))
    if nu <= FLAT or nv <= FLAT:
        return 1.0 if (nu <= FLAT and nv <= FLAT) else 0.0
    return float(np.sum(u * v)) / (nu * nv)


def align(a: np.ndarray, b: np.ndarray, margin: int) -> tuple[float, float, float, float]:
    """Step 3 on (n, n) smoothed thumbnails: (sy, oy, sx, ox) mapping a's window onto b."""
    n = a.shape[0]
    m, c = margin, (n - 1) / 2.0
    wa = a[m : n - m, m : n - m]
    best, oy, ox = -2.0, 0.0, 0.0
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            z = _zncc(wa, b[m + dy : n - m + dy, m + dx : n - m + dx])
            if z > best:
                best, oy, ox = z, float(dy), float(dx)
    wa = wa - wa.mean()
    gy, gx = gradients(b)
    u = np.arange(m, n - m) - c
    sy = sx = 1.0
    lim = OFFSET_LIM * n
    for _ in range(ITERS):
        yy, xx = sy * u + c + oy, sx * u + c + ox
        bw, by, bx = sample(b, yy, xx), sample(gy, yy, xx), sample(gx, yy, xx)
        bc = bw - bw.mean()
        g = float(np.sum(wa * bc)) / max(float(np.sum(bc * bc)), 1e-12)
        uy, ux = u[:, None], u[None, :]
        one = np.ones_like(bw)
        jac = np.stack([g * by * uy, g * by, g * bx * ux, g * bx, bw, one], axis=-1).reshape(-1, 6)
        r = (wa - g * bc).reshape(-1)
        step = np.linalg.solve(jac.T @ jac + DAMP * np.eye(6), jac.T @ r)
        sy = min(max(sy + step[0], 1.0 - SCALE_LIM), 1.0 + SCALE_LIM)
        oy = min(max(oy + step[1], -lim), lim)
        sx = min(max(sx + step[2], 1.0 - SCALE_LIM), 1.0 + SCALE_LIM)
        ox = min(max(ox + step[3], -lim), lim)
    return sy, oy, sx, ox


def local_term(a: np.ndarray, b: np.ndarray, margin: int, warp: tuple[float, float, float, float]) -> float:
    """Step 4 on (n, n) smoothed thumbnails, the warp's offsets in these pixels: 1 - loc."""
    n = a.shape[0]
    m, c = margin, (n - 1) / 2.0
    sy, oy, sx, ox = warp
    u = np.arange(m, n - m) - c
    wa = a[m : n - m, m : n - m]
    wb = sample(b, sy * u + c + oy, sx * u + c + ox)
    wa, wb = wa - wa.mean(), wb - wb.mean()
    na, nb = math.sqrt(float(np.sum(wa * wa))), math.sqrt(float(np.sum(wb * wb)))
    if na <= FLAT or nb <= FLAT:
        return 1.0 if (na <= FLAT and nb <= FLAT) else 0.0
    ua, ub = wa / na, wb / nb
    k = (n - 2 * m) // GRID
    loc = 0.0
    for i in range(GRID):
        for j in range(GRID):
            rows, cols = slice(i * k, (i + 1) * k), slice(j * k, (j + 1) * k)
            sa, sb = ua[rows, cols], ub[rows, cols]
            e = float(np.sum((sa - sb) ** 2))
            s = float(np.sum(sa * sa + sb * sb)) / 2.0
            loc = max(loc, e / (s + FLOOR))
    return 1.0 - loc


def stats(lum: np.ndarray, chroma: np.ndarray) -> tuple[float, float, float]:
    """(mu, sd, cm) of one side: luma mean and spread, RMS chroma magnitude."""
    cc = chroma.reshape(-1, 2)
    return float(lum.mean()), float(lum.std()), math.sqrt(float(np.mean(np.sum(cc * cc, axis=1))))


def grey(chroma: np.ndarray) -> bool:
    """No chroma block reaches COLOURLESS grey levels."""
    return bool(np.abs(chroma).max(initial=0.0) < COLOURLESS)


def gates_pass(sa: tuple[float, float, float], sb: tuple[float, float, float], either_grey: bool) -> bool:
    (mua, sda, cma), (mub, sdb, cmb) = sa, sb
    return (
        abs(math.log((sda + 1.0) / (sdb + 1.0))) <= SD_LOG
        and (either_grey or abs(math.log((cma + 2.0) / (cmb + 2.0))) <= CM_LOG)
        and abs(math.log((mua + 8.0) / (mub + 8.0))) <= MU_LOG
    )


def colour_term(ca: np.ndarray, cb: np.ndarray) -> float:
    if grey(ca) or grey(cb):
        return 1.0
    return float(ca @ cb) / math.sqrt(float(ca @ ca) * float(cb @ cb))


def warp_score_ref(ra: np.ndarray, rb: np.ndarray, shape: WarpCheck) -> float:
    """The score of one pair (module docstring) from two check parts (shape.dims floats each)."""
    n, m = shape.side, shape.margin
    ra, rb = np.asarray(ra, np.float64), np.asarray(rb, np.float64)
    la, lb = ra[: n * n].reshape(n, n), rb[: n * n].reshape(n, n)
    ca, cb = ra[n * n :], rb[n * n :]
    if not gates_pass(stats(la, ca), stats(lb, cb), grey(ca) or grey(cb)):
        return -1.0
    sy, oy, sx, ox = align(smooth(half(la)), smooth(half(lb)), m // 2)
    luma = local_term(smooth(la), smooth(lb), m, (sy, 2.0 * oy, sx, 2.0 * ox))
    return min(luma, colour_term(ca, cb))


def warp_scores_ref(a: np.ndarray, b: np.ndarray, pairs: np.ndarray, shape: WarpCheck) -> np.ndarray:
    """Reference: (P,) float64 scores of pairs (rows of a, rows of b) of check parts."""
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    return np.array([warp_score_ref(a[i], b[j], shape) for i, j in pairs.tolist()], np.float64)


def native_params(shape: WarpCheck) -> native.WarpParams:
    """The shape and this module's constants, as the native fast path takes them."""
    return native.WarpParams(
        side=shape.side,
        margin=shape.margin,
        chroma=shape.chroma,
        iters=ITERS,
        grid=GRID,
        colourless=COLOURLESS,
        sd_log=SD_LOG,
        cm_log=CM_LOG,
        mu_log=MU_LOG,
        scale_lim=SCALE_LIM,
        offset_lim=OFFSET_LIM,
        floor=FLOOR,
        flat=FLAT,
        damp=DAMP,
    )


def warp_scores(
    a: np.ndarray, b: np.ndarray, pairs: np.ndarray, shape: WarpCheck, threads: int | None = None
) -> np.ndarray:
    """Fast path of `warp_scores_ref` (clipdedup.native.warp_scores): (P,) float64 scores.

    Args:
        a, b: float32 (N, shape.dims) and (M, shape.dims) C-contiguous check parts.
        pairs: int (P, 2) row pairs (i of a, j of b).
        shape: the check part's shape.
        threads: worker threads; default one per core.

    Returns:
        float64 (P,), within ~1e-12 of `warp_scores_ref`.
    """
    return native.warp_scores(a, b, pairs, native_params(shape), threads)

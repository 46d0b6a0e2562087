"""What every matching backend shares: the registry, the reference distance, the exact re-check,
the tiling, and the scaled problem (scale, norms, shifts, margins) that screening works on.

Kept apart from `match.py` so that backend modules can import it without an import cycle.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from clipdedup.match.screen.bounds import Screen, margins, pow2_scale
from clipdedup.registry import Registry

Matcher = Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]
MATCHERS: Registry[Matcher] = Registry("matching backend", env_var="CLIPDEDUP_BACKEND")

RECHECK_BYTES = 16 << 20  # float64 scratch of one re-check chunk


def exact_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The reference distance of matching rows: float64 sqrt(sum((a - b)^2)).

    Args:
        a, b: float32 (K, D) arrays.

    Returns:
        float64 (K,) distances. Every backend's re-check and the reference call this one function,
        so their values agree bit for bit.
    """
    d = np.subtract(a, b, dtype=np.float64)
    np.multiply(d, d, out=d)
    return np.sqrt(d.sum(axis=1))


def recheck(
    x: np.ndarray, y: np.ndarray, i: np.ndarray, j: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keeps the candidate pairs (i, j) whose `exact_distances` is <= threshold.

    Args:
        x, y: float32 (N, D), (M, D) rows; i, j: int64 (K,) candidate row indices into x and y.

    Returns:
        int64 (P,), int64 (P,), float64 (P,): the surviving pairs and their distances.
    """
    i = np.asarray(i, np.int64)
    j = np.asarray(j, np.int64)
    if i.size == 0:
        return i, j, np.zeros(0, np.float64)
    chunk = max(1, RECHECK_BYTES // (8 * max(1, x.shape[1])))
    keep_i, keep_j, keep_d = [], [], []
    for s in range(0, i.size, chunk):
        ii, jj = i[s : s + chunk], j[s : s + chunk]
        d = exact_distances(x[ii], y[jj])
        m = d <= threshold
        keep_i.append(ii[m])
        keep_j.append(jj[m])
        keep_d.append(d[m])
    return np.concatenate(keep_i), np.concatenate(keep_j), np.concatenate(keep_d)


@dataclass
class Tiles:
    """Row / column blocks of an (N x M) problem; for self-matching only tiles on or above the diagonal.

    In self mode the blocks are square (block_cols is ignored) so that a tile touching the diagonal
    has its diagonal at (0, 0).
    """

    n: int
    m: int
    block_rows: int
    block_cols: int
    upper: bool

    def __iter__(self) -> Iterator[tuple[int, int, int, int]]:
        bc = self.block_rows if self.upper else self.block_cols
        for i0 in range(0, self.n, self.block_rows):
            i1 = min(self.n, i0 + self.block_rows)
            for j0 in range(i0 if self.upper else 0, self.m, bc):
                yield i0, i1, j0, min(self.m, j0 + bc)

    def count(self) -> int:
        nb = -(-self.n // self.block_rows)
        if self.upper:
            return nb * (nb + 1) // 2
        return nb * -(-self.m // self.block_cols)


@dataclass
class Scaled:
    """The screening problem in a power-of-two scaled copy of the data.

    Attributes:
        scale: s; scaled rows are s * x (exact in float32 unless they turn subnormal).
        t2: (s t)^2, clamped to (2 R)^2 (1 + 2^-18) since no distance can exceed 2 R.
        na, nb: float64 (N,), (M,) squared norms of the scaled rows.
        alpha, beta: float64 (N,), (M,) the shifts: a pair is a candidate iff
            a~.b~ + alpha_i + beta_j >= 0 (computed as the backend computes it).
        max_norm: R, bound of the scaled row norms.
    """

    scale: float
    t2: float
    na: np.ndarray
    nb: np.ndarray
    alpha: np.ndarray
    beta: np.ndarray
    max_norm: float


def squared_norms(x: np.ndarray) -> np.ndarray:
    """float64 (N,) sum of squares of float32 (N, D) rows, in row chunks (no float64 copy of x)."""
    out = np.empty(x.shape[0], np.float64)
    step = max(1, (8 << 20) // (8 * max(1, x.shape[1])))
    for s in range(0, x.shape[0], step):
        blk = x[s : s + step].astype(np.float64)
        out[s : s + step] = np.einsum("ij,ij->i", blk, blk)
    return out


def scaled_problem(
    x: np.ndarray, y: np.ndarray | None, threshold: float, screen: Screen, target_exp: int
) -> Scaled:
    """Scale, norms, margins and shifts for screening x against y (or x itself).

    Args:
        x, y: float32 (N, D), (M, D) finite rows.
        threshold: the unscaled distance bound.
        screen: the backend's error constants (`match_bounds.screen_error`).
        target_exp: the scale puts the largest row norm in [2^(target_exp-1), 2^target_exp), where
            the operand type neither overflows nor loses the small entries.
    """
    na0 = squared_norms(x)
    nb0 = na0 if y is None else squared_norms(y)
    return scaled_from_norms(na0, nb0, threshold, x.shape[1], screen, target_exp)


def scaled_from_norms(
    na0: np.ndarray,
    nb0: np.ndarray,
    threshold: float,
    dim: int,
    screen: Screen,
    target_exp: int,
    scale: float | None = None,
) -> Scaled:
    """`scaled_problem` from the float64 squared norms (`squared_norms`) of the unscaled rows.

    Args:
        scale: a power of two fixed beforehand (from a bound of the largest row norm, when rows
            are converted before all norms are known); default: `pow2_scale` of the largest norm.
            Any power of two keeps the margins valid: they use the actual largest scaled norm.
    """
    top = max(float(na0.max(initial=0.0)), float(nb0.max(initial=0.0)))
    s = pow2_scale(math.sqrt(top), target_exp) if scale is None else scale
    na, nb = na0 * (s * s), nb0 * (s * s)  # exact: power-of-two scaling in float64
    r = math.sqrt(top) * s * (1 + 2.0**-40) if top > 0 else 2.0 ** (target_exp - 1)
    t = threshold * s
    t2 = min(t * t, (2 * r) ** 2 * (1 + 2.0**-18))
    da, db = margins(na, nb, t2, dim, screen, r)
    alpha = (t2 + da - na) / 2
    beta = (db - nb) / 2
    return Scaled(s, t2, na, nb, alpha, beta, r)

"""The integer screen: exact int16 dot products of rounded, scaled rows (usually their projections).

Rows u (float64, exact: float32 values times a power of two s) are rounded to integers q = round(u),
so each coordinate errs by |e_k| = |q_k - u_k| <= 1/2. For a pair (a, b),

    q_a . q_b - u_a . u_b = e_a . u_b + u_a . e_b + e_a . e_b,
    |q_a . q_b - u_a . u_b| <= (||u_a||_1 + ||u_b||_1) / 2 + k / 4
                            <= (||q_a||_1 + ||q_b||_1) / 2 + 3 k / 4      (||u||_1 <= ||q||_1 + k/2).

A pair within the screened threshold t (||u_a - u_b||^2 <= s^2 t^2) has 2 u_a . u_b >= na + nb - s^2 t^2
(na = ||u_a||^2, float64), so it has q_a . q_b >= T_a + T_b with the separable

    T = na / 2 - s^2 t^2 / 4 - ||q||_1 / 2 - 3 k / 8.

The screen keeps (a, b) when the integer dot reaches tau_a + tau_b, tau = floor(T - slack): rounding T
down only keeps more pairs, and the slack covers the float64 arithmetic of T (a relative error of a
few units of 2^-53 on numbers below 2^30, far under the slack of 1). Nothing else is rounded: the
int16 products and their int32 sums are exact as long as ||q|| < 2^15 keeps every partial dot below
2^30 (Cauchy-Schwarz), which the scale guarantees (s ||u||_max < 2^14, `TARGET_EXP`), and tau is
clamped below at -2^30 so that tau_a + tau_b fits int32 (it only keeps more pairs; T < 2^29 always).
So the screen drops no pair of the screened threshold, and the float64 re-check decides.

Compared with a float screen of the same width the margin is a few percent of t^2 (the sums of
|q| are about 2^14 sqrt(k) against s^2 t^2), so the screen is about as tight as float32, with half
the bytes per row and int16 multiply-adds (AVX2's vpmaddwd: 16 products per instruction).
`int16_screen_ref` is the plain numpy definition the native kernel is tested against.
"""

from __future__ import annotations

import math

import numpy as np

from clipdedup import native
from clipdedup.match.screen.bounds import pow2_scale
from clipdedup.util import cpu

TARGET_EXP = 14  # s * (largest row norm) < 2^14: |q_k| <= 2^14 + 1/2 fits int16, dots stay below 2^30
TAU_MIN = -(1 << 30)
TAU_NONE = (1 << 30) - 1  # tau of a row that must pair with nothing (non-finite rows)
FIRST_CAP = 1 << 20  # hits the first try of a screen has room for (16 MiB)


def isa() -> str:
    """The instruction set the native screen uses here: the fastest one the CPU has and
    `CLIPDEDUP_CPU_MASK` does not hide ("avx2", else "generic")."""
    for name in native.int_screen_isas():
        if name == "generic" or cpu.has(name):
            return name
    return "generic"


def width(k: int) -> int:
    """Columns of the int16 operands of k-wide rows: the native kernel takes pairs of columns."""
    return k + k % 2


def scale_for(max_norm: float) -> float:
    """The power of two s with s * max_norm < 2^TARGET_EXP (1 for zero or non-finite bounds)."""
    return pow2_scale(max_norm, TARGET_EXP)


def quantize(u_unscaled: np.ndarray, s: float, out: np.ndarray | None = None) -> np.ndarray:
    """int16 (N, width(k)) round(s * rows), zero-padded; rows must be finite with s * norm < 2^14.

    Args:
        u_unscaled: float32 (N, k) rows (their float64 scaled values are exact: s is a power of two).
        s: the scale from `scale_for`.
        out: optional int16 (N, width(k)) to fill.
    """
    n, k = u_unscaled.shape
    out = np.zeros((n, width(k)), np.int16) if out is None else out
    step = 8192
    for i in range(0, n, step):
        v = np.rint(u_unscaled[i : i + step].astype(np.float64) * s)
        if v.size and np.abs(v).max() > 32767:
            raise ValueError("a scaled row leaves int16: the scale does not bound the row norms")
        out[i : i + step, :k] = v
    return out


def thresholds(
    na: np.ndarray, q: np.ndarray, s: float, t: float, finite: np.ndarray | None = None
) -> np.ndarray:
    """int32 (N,) tau of each row (see the module docstring).

    Args:
        na: float64 (N,) squared norms of the unscaled, unrounded rows (`core.squared_norms`).
        q: int16 (N, width) their rounded scaled values (`quantize`).
        s: the scale; t: the screened distance bound (unscaled).
        finite: bool (N,): rows that may pair (others get TAU_NONE); None: all.
    """
    k = q.shape[1]
    n2 = na * (s * s)  # exact: s is a power of two
    s2t2 = (s * t) ** 2
    l1 = np.zeros(len(q), np.float64)
    step = 16384
    for i in range(0, len(q), step):
        l1[i : i + step] = np.abs(q[i : i + step].astype(np.int32)).sum(axis=1)
    big_t = n2 / 2 - s2t2 / 4 - l1 / 2 - 3 * k / 8
    slack = 1.0 + 2.0**-40 * (n2 + s2t2 + l1)
    tau = np.floor(big_t - slack)
    tau = np.clip(tau, TAU_MIN, TAU_NONE)
    if finite is not None:
        tau[~finite] = TAU_NONE
    return tau.astype(np.int32)


def int16_screen_ref(
    a: np.ndarray,
    b: np.ndarray,
    ta: np.ndarray,
    tb: np.ndarray,
    *,
    upper: bool = False,
    row_base: int = 0,
    col_base: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Every (r, q) with sum_k a[r,k] b[q,k] >= ta[r] + tb[q] (int64 arithmetic), and with `upper`
    only col_base + q > row_base + r; sorted by (r, q). The definition of `int16_screen`."""
    dots = a.astype(np.int64) @ b.astype(np.int64).T
    keep = dots >= ta.astype(np.int64)[:, None] + tb.astype(np.int64)[None, :]
    if upper:
        keep &= (np.arange(b.shape[0])[None, :] + col_base) > (np.arange(a.shape[0])[:, None] + row_base)
    r, c = np.nonzero(keep)
    return r.astype(np.int64), c.astype(np.int64)


class TooManyHits(Exception):
    """The integer screen found more candidates than its caller allowed."""


def int16_screen(
    a: np.ndarray,
    b: np.ndarray,
    ta: np.ndarray,
    tb: np.ndarray,
    *,
    upper: bool = False,
    row_base: int = 0,
    col_base: int = 0,
    max_hits: int | None = None,
    isa_name: str | None = None,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`int16_screen_ref`'s pairs from the native kernel (unsorted).

    The hits go into buffers of at most 2^20 pairs at first (not n * m: the answer is usually a tiny
    part of it), and the screen runs again with larger ones while it finds more, up to `max_hits`.

    Raises:
        TooManyHits: more than `max_hits` (default: no limit beyond n * m) were found.
    """
    a = np.ascontiguousarray(a, np.int16)
    b = np.ascontiguousarray(b, np.int16)
    ta, tb = np.ascontiguousarray(ta, np.int32), np.ascontiguousarray(tb, np.int32)
    limit = a.shape[0] * b.shape[0] if max_hits is None else max_hits
    limit = max(0, min(limit, a.shape[0] * b.shape[0]))
    cap = min(limit, FIRST_CAP)
    while True:
        out_r, out_q = np.empty(cap, np.int64), np.empty(cap, np.int64)
        args = (row_base, col_base, upper, out_r, out_q, isa_name or isa(), threads or native.cpu_threads())
        found = native.int16_screen(a, b, ta, tb, *args)
        if found <= cap:
            return out_r[:found], out_q[:found]
        if cap >= limit:
            raise TooManyHits(f"more than {limit} candidates")
        cap = min(limit, max(4 * cap, 2 * found))


def screened_threshold(threshold: float, dim: int) -> float:
    """The bound the rows themselves are screened at (no projection): every pair the float64
    reference accepts has a float32-row distance within it (`bounds.reference_slack`)."""
    from clipdedup.match.screen.bounds import reference_slack

    return threshold * math.sqrt(1 + reference_slack(dim)) * (1 + 2.0**-40)


def int16_candidates(
    x: np.ndarray, y: np.ndarray | None, t: float, *, max_candidates: int | None = None
) -> tuple[np.ndarray, np.ndarray] | None:
    """Candidate pairs (int64 i, j) of float32 rows x against y (None: x itself, i < j) whose
    float32-row distance may be <= t; None when there are more than `max_candidates`."""
    from clipdedup.match.core import squared_norms

    na = squared_norms(x)
    nb = na if y is None else squared_norms(y)
    s = scale_for(math.sqrt(max(float(na.max(initial=0.0)), float(nb.max(initial=0.0)))))
    qx = quantize(x, s)
    tx = thresholds(na, qx, s, t)
    if y is None:
        qy, ty = qx, tx
    else:
        qy = quantize(y, s)
        ty = thresholds(nb, qy, s, t)
    try:
        i, j = int16_screen(qx, qy, tx, ty, upper=y is None, max_hits=max_candidates)
    except TooManyHits:
        return None
    order = np.lexsort((j, i))
    return i[order], j[order]


def int16_rows_screen(x: np.ndarray, y: np.ndarray | None, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs of float32 rows screened whole (no projection) at the answer's `threshold`:
    every pair the float64 reference accepts, and more (no limit on their number)."""
    cand = int16_candidates(x, y, screened_threshold(threshold, x.shape[1]))
    assert cand is not None  # no limit was set
    return cand

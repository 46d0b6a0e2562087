"""Error bounds of screened distances, and the per-row margins that make screening lossless.

Every fast backend computes, for each pair of rows (a of x, b of y), one screened number

    C~ = a~ . b~ + alpha_i + beta_j           (in a power-of-two scaled copy of the data)

with low-precision operands a~, b~ and a float32 (or wider) accumulator, and keeps the pair as a
candidate when C~ >= 0. The shifts are

    alpha_i = (t^2 + delta_i - na_i) / 2,     beta_j = (delta_j - nb_j) / 2,

na/nb being the float64 squared norms, so that in exact arithmetic C~ = (t^2 + delta_i + delta_j - d^2) / 2.
`Screen` bounds |C~ - (a.b + alpha + beta)| for a given way of computing C~; `margins` picks
delta_i, delta_j large enough that no pair the float64 reference accepts (d_ref <= t) is dropped.
The derivation is in docs/matching.md; each step is commented below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

RHO = 2.0**-53  # unit roundoff of float64 (the reference and the host-side arithmetic)
U32 = 2.0**-24  # float32
U16 = 2.0**-11  # float16
UBF16 = 2.0**-8  # bfloat16
TINY32 = 2.0**-126  # smallest normal float32 (flush-to-zero floor of bf16 dot instructions)
TINY16 = 2.0**-24  # smallest subnormal float16
SAFETY = 1.0 + 2.0**-20  # covers the roundings of the margin arithmetic itself


def gamma(n: float, u: float) -> float:
    """Higham's gamma_n = n u / (1 - n u): bound on n accumulated relative roundings."""
    if n * u >= 0.5:
        raise ValueError(f"gamma_{n} undefined for u={u}: too many terms for this precision")
    return n * u / (1.0 - n * u)


@dataclass(frozen=True)
class Screen:
    """|C~ - (a.b + alpha + beta)| <= e ||a|| ||b|| + h (||a|| + ||b||) + f (|alpha| + |beta|) + g."""

    e: float
    h: float
    f: float
    g: float


def screen_error(
    dim: int,
    *,
    u_in: float,
    eta_in: float = 0.0,
    product_rounded: bool = False,
    u_acc: float = U32,
    roundings_per_term: int = 2,
    shift_terms: int = 0,
    shift_residual: float = 0.0,
    shift_floor: float = 0.0,
    epilogue_adds: int = 0,
    u_shift_store: float = 0.0,
    ftz: bool = False,
) -> Screen:
    """Error constants of one screening recipe (all quantities in the scaled space).

    Args:
        dim: D, the embedding width.
        u_in: unit roundoff of the operand type (0 when the float32 inputs are used as they are).
        eta_in: absolute rounding floor of an operand (half the smallest subnormal, or flush to zero).
        product_rounded: the accumulator rounds each product (float32 x float32); fp16 and bf16
            products are exact in float32.
        u_acc: unit roundoff of the accumulator.
        roundings_per_term: roundings one accumulated term may take (2 covers pair-dot instructions
            and truncating tensor-core adders).
        shift_terms: extra columns carrying alpha/beta through the matmul (exact products 1 * piece).
        shift_residual: |alpha - sum of its pieces| <= shift_residual |alpha| + shift_floor (same
            for beta); the floor is where the last piece underflows.
        shift_floor: see shift_residual.
        epilogue_adds: float32 additions of alpha and beta after the dot (0 when they ride in it).
        u_shift_store: relative rounding of alpha/beta when stored (float32 copies of float64).
        ftz: denormal products / partial sums may be flushed to zero.
    """
    u = u_in
    n = roundings_per_term * (dim + shift_terms)
    gam = gamma(n, u_acc)
    # Operand rounding: a~_k = a_k (1 + th) + et with |th| <= u, |et| <= eta; summing
    # |a~_k b~_k - a_k b_k| and Cauchy-Schwarz (sum |a_k| <= sqrt(D) ||a||) give:
    e = 2 * u + u * u + (U32 if product_rounded else 0.0)
    h = (1 + u) * eta_in * math.sqrt(dim)
    g = dim * eta_in * eta_in
    # Accumulation of all terms in any order: gamma_n times the sum of |terms|. The shift pieces
    # sum in absolute value to at most (1 + 2^-7) |alpha| (each piece is the rounding rest of the last).
    e += gam * (1 + u) ** 2 * (1 + U32)
    h *= 1 + gam
    g *= 1 + gam
    f = gam * (1 + 2.0**-7) + shift_residual
    g += 2 * shift_floor
    if ftz:
        g += n * TINY32
    # alpha and beta stored in float32, then added to the dot in float32: fl(fl(dot + alpha) + beta).
    # Each addition errs by U32 times the magnitude of its result, at most |dot| + |alpha| + |beta|.
    if epilogue_adds:
        f += u_shift_store + epilogue_adds * U32 * (1 + U32)
        e += epilogue_adds * U32 * (1 + e)
        h += epilogue_adds * U32 * h
        g += epilogue_adds * U32 * g
    return Screen(e, h, f, g)


def reference_slack(dim: int) -> float:
    """eta with d_ref <= t  =>  d^2 <= t^2 (1 + eta), d the real distance of the float32 rows.

    The reference rounds each float64 difference, square and addition (gamma_{D+1}) and the sqrt
    (rounded to nearest, so sqrt(S) <= t (1 + rho)).
    """
    return 1.01 * (dim + 6) * RHO


def margins(
    na: np.ndarray, nb: np.ndarray, t2: float, dim: int, screen: Screen, max_norm: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-row delta_i (rows of x) and delta_j (rows of y) that make `C~ >= 0` lossless.

    Args:
        na, nb: float64 (N,), (M,) squared norms of the scaled rows, as the host computed them.
        t2: the scaled threshold squared.
        dim: D.
        screen: the backend's `Screen`.
        max_norm: R, an upper bound of every scaled row norm (> 0).

    Returns:
        float64 (N,), (M,) margins.

    With Na, Nb the real squared norms (|Na - na| <= 1.01 D rho Na) and E the screening error:
        C~ >= (t^2 + delta_i + delta_j - d^2)/2 - 1.01 D rho (Na + Nb)/2 - 2 rho (S_i + S_j) - E,
    where S_i = t^2 + delta_i + na_i >= 2|alpha_i|, S_j = delta_j + nb_j >= 2|beta_j| (the last term
    is the float64 rounding of alpha and beta). Using ||a|| ||b|| <= (Na + Nb)/2 and
    ||a|| <= (Na/R + R)/2, and d^2 <= t^2 (1 + eta) for a reference pair, C~ >= 0 holds when
        (delta_i + delta_j)(1 - F) >= (eta + F) t^2 + (e + h/R + 1.01 D rho + F) kappa (na + nb)
                                      + 2 h R + 2 g,       F = f + 4 rho, kappa = 1 + 2 D rho,
    which the separable choice below satisfies half per side.
    """
    eta = reference_slack(dim)
    big_f = screen.f + 4 * RHO
    if big_f >= 0.5:
        raise ValueError("screening error too large for a margin")
    r = max(max_norm, 1e-300)
    kappa = 1 + 2 * dim * RHO
    per_norm = (screen.e + screen.h / r + 1.01 * dim * RHO + big_f) * kappa
    const = (eta + big_f) * t2 / 2 + screen.h * r + screen.g
    scale = SAFETY / (1 - big_f)
    return (per_norm * na + const) * scale, (per_norm * nb + const) * scale


def pow2_scale(max_abs_norm: float, target_exp: int) -> float:
    """A power of two s with s * max_abs_norm in [2^(target_exp-1), 2^target_exp) (1 for zero/inf)."""
    if not (max_abs_norm > 0) or math.isinf(max_abs_norm):
        return 1.0
    _, ex = math.frexp(max_abs_norm)  # max_abs_norm = m * 2^ex, m in [0.5, 1)
    return math.ldexp(1.0, target_exp - ex)


def split_pieces(v: np.ndarray, n: int, dtype) -> list[np.ndarray]:
    """v (float64) as n numbers of `dtype` (a numpy or torch-compatible dtype name) whose sum is v
    up to the rest of the last piece. Returns float64 arrays holding exactly representable values."""
    import torch

    pieces, rest = [], v.astype(np.float64, copy=True)
    for _ in range(n):
        p = torch.from_numpy(rest).to(dtype).to(torch.float64).numpy()
        pieces.append(p)
        rest = rest - p  # exact: p is rest rounded to fewer bits, in the same binade
    return pieces


def piece_residual(n: int, u: float) -> float:
    """Bound of |v - sum of n pieces| / |v| when each piece is the rest rounded with unit roundoff u
    (and none underflows; see `screen_error`'s shift_floor)."""
    return u**n * 1.01

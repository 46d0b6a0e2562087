"""A cheap exact pre-screen: distances of rows projected onto a few principal directions.

An orthogonal projection P never lengthens a vector, so ||P a - P b|| <= ||a - b||: a pair within
t stays within t after projecting (a lower bound, as in filter-and-refine search). Screening the
k-dimensional projections (k = 128 of D = 1280, say) costs about k/D of screening the rows, and on
embeddings, whose variance sits in few directions, it leaves few candidates besides the answer.
The computed P is only nearly orthonormal and the projections are rounded, so the projected
threshold is

    t1 = sigma t sqrt(1 + eta) + eps_p (R_x + R_y)

with sigma >= ||P||_2 bounded from ||P P^T - I||_F, eps_p bounding the rounding of the projection
per unit of row norm, R_x, R_y the largest row norms and eta the reference's own slack. The
projected rows then go through the same bf16 screen (with its own margin) at threshold t1.
When the pre-screen leaves too many candidates (clustered data), the caller screens the full rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from clipdedup.match.core import squared_norms
from clipdedup.match.screen.bounds import U32, gamma, reference_slack

PROJECT_DIM = 128  # projected width of the pre-screen (cpu-bf16)


@dataclass(frozen=True)
class Projection:
    """float32 (k, D) near-orthonormal rows and the bounds that make projected screening exact."""

    p: np.ndarray
    sigma: float  # >= largest singular value of p
    eps: float  # ||computed p a - p a|| <= eps ||a|| for the float32 projection of a row a


def principal_projection(x: np.ndarray, k: int, *, sample: int = 1024, iters: int = 2) -> Projection:
    """An orthonormal basis of (approximately) the top-k principal subspace of the rows of x.

    The quality of the subspace only decides how many candidates the pre-screen leaves; exactness
    rests on the bounds, which hold for any basis (a degenerate sample, such as identical rows,
    gives an arbitrary one).

    Args:
        x: float32 (N, D) rows; a deterministic sample of at most `sample` rows is used.
        k: projected width, 1 <= k <= D.
        iters: subspace iterations on the sample covariance.
    """
    import torch

    n, d = x.shape
    rows = torch.from_numpy(x[np.linspace(0, n - 1, min(n, sample)).astype(np.int64)])
    rows = rows - rows.mean(dim=0)  # differences of rows do not see the mean
    q = torch.randn((d, k), generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    # One thread: these are small, and threaded LAPACK QR took 260 ms instead of 4 ms here.
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for _ in range(iters):
                q = _orthonormal(rows.T @ (rows @ q)).float()  # subspace iteration on the covariance
    finally:
        torch.set_num_threads(threads)
    p32 = np.ascontiguousarray(q.T.numpy(), dtype=np.float32)
    return Projection(p32, projection_sigma(p32), projection_eps(p32))


def _orthonormal(q):
    """Columns of q made orthonormal (Householder QR in float64; a rank-deficient q, from a
    degenerate sample, is completed with random directions first)."""
    import torch

    q = q.double()
    filler = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return torch.linalg.qr(q + 1e-6 * filler * (1 + float(q.abs().max())))[0]


def projection_sigma(p32: np.ndarray) -> float:
    """Upper bound of ||p32||_2: sigma^2 = lambda_max(P P^T) <= 1 + ||P P^T - I||_F.

    P P^T is formed in float64 from float32 entries (exact products); the summation error, about
    D 2^-53 per entry, is far below the 2^-30 slack added.
    """
    import torch

    p = torch.from_numpy(p32).double()
    e = p @ p.T - torch.eye(p.shape[0], dtype=torch.float64)
    return math.sqrt(1.0 + float(torch.linalg.norm(e)) + 2.0**-30) * (1 + 2.0**-40)


def projection_eps(p32: np.ndarray) -> float:
    """eps with ||fl32(P a) - P a|| <= eps ||a||: each coordinate errs by at most
    gamma_2D sum_k |P_jk a_k| <= gamma_2D ||P_j|| ||a|| (Cauchy-Schwarz), so eps = gamma_2D ||P||_F."""
    d = p32.shape[1]
    return gamma(2 * d, U32) * float(np.linalg.norm(p32.astype(np.float64))) * 1.01


def project(x: np.ndarray, proj: Projection, chunk: int = 16384) -> np.ndarray:
    """float32 (N, k) projections of float32 (N, D) rows (torch float32 matmul, row chunks)."""
    import torch

    out = np.empty((x.shape[0], proj.p.shape[0]), np.float32)
    from clipdedup.match.screen.torch_screen import full_fp32_matmul

    pt = torch.from_numpy(proj.p).T
    with torch.inference_mode(), full_fp32_matmul():
        for s in range(0, x.shape[0], chunk):
            torch.mm(torch.from_numpy(x[s : s + chunk]), pt, out=torch.from_numpy(out[s : s + chunk]))
    return out


def projected_threshold(threshold: float, proj: Projection, max_norm_x: float, max_norm_y: float) -> float:
    """t1: every pair whose reference distance is <= threshold has projected distance <= t1."""
    dim = proj.p.shape[1]
    t = threshold * math.sqrt(1 + reference_slack(dim)) * proj.sigma
    return (t + proj.eps * (max_norm_x + max_norm_y)) * (1 + 2.0**-40)


def projected_candidates(x, y, threshold, *, k=PROJECT_DIM, max_candidates=None, recipe="bfloat16", **kw):
    """Candidate pairs (int64 i, j) of the pre-screen: the projected rows screened at t1.

    Args:
        x, y: float32 (N, D), (M, D) finite rows (y None: self-matching).
        threshold: the distance bound of the answer.
        k: projected width.
        max_candidates: give up beyond this many (default: one per 1024 pairs, at least 2^16).
        recipe: "int16" (`int_screen`) or a `torch_screen.RECIPES` name.
        kw: passed to `torch_screen.torch_screen` (blocks, progress).

    Returns:
        The candidates, or None when k >= D or the pre-screen left more than `max_candidates`
        (the caller then screens the full rows).
    """
    from clipdedup.match.screen.int_screen import int16_candidates
    from clipdedup.match.screen.torch_screen import RECIPES, TooManyCandidates, torch_screen

    if k >= x.shape[1]:
        return None  # no cheaper than the rows themselves
    other = x if y is None else y
    sample = x if y is None else np.concatenate([x[:: max(1, len(x) // 2048)], y[:: max(1, len(y) // 2048)]])
    proj = principal_projection(sample, k)
    px = project(x, proj)
    py = None if y is None else project(y, proj)
    rx = float(np.sqrt(squared_norms(x).max()))
    ry = rx if y is None else float(np.sqrt(squared_norms(other).max()))
    t1 = projected_threshold(threshold, proj, rx, ry)
    if max_candidates is None:
        max_candidates = max(1 << 16, x.shape[0] * other.shape[0] // 1024)
    if recipe == "int16":
        return int16_candidates(px, py, t1, max_candidates=max_candidates)
    try:
        return torch_screen(px, py, t1, RECIPES[recipe], max_candidates=max_candidates, **kw)
    except TooManyCandidates:
        return None

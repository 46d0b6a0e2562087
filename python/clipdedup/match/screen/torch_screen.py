"""Blocked screening with torch matmuls, shared by `cpu-bf16`, `cpu-fp32` and `torch-cuda`
(registered in `match_backends`).

The shifts alpha_i and beta_j ride inside the matmul as extra columns (split into pieces of the
operand type, each exactly representable):

    A_i = [ a_i | alpha pieces | 1 ... 1 | 0 pad ],   B_j = [ b_j | 1 ... 1 | beta pieces | 0 pad ]

so one matmul gives C~_ij = a~.b~ + alpha_i + beta_j, and the whole epilogue is `C~ >= 0`. Rounding
the output (to bf16, say) never changes a sign, so it needs no margin. Per tile the epilogue is one
pass (row maxima); only rows whose maximum is >= 0 are searched for their columns.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from clipdedup.match.core import Scaled, Tiles, scaled_problem
from clipdedup.match.screen.bounds import (
    TINY16,
    TINY32,
    U16,
    U32,
    UBF16,
    Screen,
    piece_residual,
    screen_error,
)


@dataclass(frozen=True)
class Recipe:
    """How one backend screens: operand dtype name, shift pieces, error constants, scale target."""

    dtype: str  # torch dtype name: bfloat16, float32, float16
    pieces: int
    target_exp: int
    screen_kw: dict = field(default_factory=dict)
    store_cols: bool = True  # keep the converted B side of all rows (else build it per tile)
    integer: bool = False  # rounded to integers and screened by `int_screen` (not by torch)

    def screen(self, dim: int) -> Screen:
        if self.integer:
            raise ValueError(
                f"recipe {self.dtype} is screened by match.screen.int_screen, not by a torch matmul"
            )
        return screen_error(dim, shift_terms=2 * self.pieces, **self.screen_kw)


RECIPES = {
    # the native int16 screen (int_screen): exact integer dots of rounded rows, s * norm < 2^14
    "int16": Recipe("int16", 0, 14, integer=True),
    # oneDNN bf16 GEMM: bf16 x bf16 products are exact in float32, float32 accumulation by pair-dot
    # instructions that flush denormals.
    "bfloat16": Recipe(
        "bfloat16",
        3,
        0,
        dict(
            u_in=UBF16,
            eta_in=TINY32,
            ftz=True,
            shift_residual=piece_residual(3, UBF16),
            shift_floor=3 * TINY32,
        ),
    ),
    # float32 BLAS: operands as they are, each product rounded.
    "float32": Recipe(
        "float32",
        2,
        0,
        dict(
            u_in=0.0,
            eta_in=TINY32,
            product_rounded=True,
            ftz=True,
            shift_residual=piece_residual(2, U32),
            shift_floor=2 * TINY32,
        ),
        store_cols=False,
    ),
    # cuBLAS fp16 with float32 output: tensor cores may truncate while accumulating (u_acc = 2 U32).
    # R < 2^7 keeps every entry and shift piece inside float16 range (|alpha| <= 2 R^2 + margin).
    "float16": Recipe(
        "float16",
        3,
        7,
        dict(
            u_in=U16,
            eta_in=TINY16 / 2,
            u_acc=2 * U32,
            ftz=True,
            shift_residual=piece_residual(3, U16),
            shift_floor=3 * TINY16 / 2,
        ),
    ),
}


@contextlib.contextmanager
def full_fp32_matmul():
    """float32 matmuls in float32 for the duration: a user's torch.set_float32_matmul_precision
    ("high"/"medium") would let them run in tf32/bf16, outside the error bounds used here."""
    import torch

    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


class AugmentedScreen:
    """The augmented operands of one problem and the screened tiles C~ = A_i B_j^T.

    Args:
        xs, ys: torch float32 (N, D), (M, D) unscaled rows (ys None: self-matching); each block is
            scaled by `sp.scale` (a power of two) as it is converted, so no scaled copy of x exists.
        sp: the `Scaled` problem (shifts).
        recipe: the backend's `Recipe`.
    """

    def __init__(self, xs, ys, sp: Scaled, recipe: Recipe):
        import torch

        from clipdedup.match.screen.bounds import split_pieces

        self.torch = torch
        self.dtype = getattr(torch, recipe.dtype)
        self.xs, self.ys = xs, (xs if ys is None else ys)
        self.scale = sp.scale
        self.d = xs.shape[1]
        self.p = recipe.pieces
        dev = xs.device
        # Tensor cores want K a multiple of 8; oneDNN bf16 ran no faster padded (1286 vs 1288) here.
        self.width = self.d + 2 * self.p
        if dev.type == "cuda":
            self.width = -(-self.width // 8) * 8
        to = dict(device=dev, dtype=self.dtype)
        self.alpha = torch.from_numpy(np.stack(split_pieces(sp.alpha, self.p, self.dtype), 1)).to(**to)
        self.beta = torch.from_numpy(np.stack(split_pieces(sp.beta, self.p, self.dtype), 1)).to(**to)
        self.cols = self._b_block(0, self.ys.shape[0]) if recipe.store_cols else None

    def _b_block(self, j0: int, j1: int):
        b = self.torch.zeros((j1 - j0, self.width), dtype=self.dtype, device=self.xs.device)
        for s in range(j0, j1, 8192):  # scaled float32 temporaries of 8192 rows, not of all rows
            e = min(j1, s + 8192)
            b[s - j0 : e - j0, : self.d] = self.ys[s:e] * self.scale
        b[:, self.d : self.d + self.p] = 1
        b[:, self.d + self.p : self.d + 2 * self.p] = self.beta[j0:j1]
        return b

    def a_block(self, i0: int, i1: int):
        a = self.torch.zeros((i1 - i0, self.width), dtype=self.dtype, device=self.xs.device)
        a[:, : self.d] = self.xs[i0:i1] * self.scale
        a[:, self.d : self.d + self.p] = self.alpha[i0:i1]
        a[:, self.d + self.p : self.d + 2 * self.p] = 1
        return a

    def b_block(self, j0: int, j1: int):
        return self.cols[j0:j1] if self.cols is not None else self._b_block(j0, j1)

    def tile(self, a, j0: int, j1: int, out):
        """C~ of rows `a` (an `a_block`) against columns j0:j1, written into `out` (flat buffer)."""
        h, w = a.shape[0], j1 - j0
        if a.is_cuda:
            return mm_float32_out(a, self.b_block(j0, j1))
        c = out[: h * w].view(h, w)
        self.torch.mm(a, self.b_block(j0, j1).T, out=c)
        return c


_NO_OUT_DTYPE: list[bool] = []  # set once torch.mm has refused out_dtype (torch < 2.8)


def mm_float32_out(a, b):
    """a @ b.T with a float32 result, for float16 a, b.

    float32 output keeps cuBLAS from reducing split-K partial sums in float16. torch < 2.8 has no
    `out_dtype`: then the operands are converted to float32 (float16 values and their products are
    exact in float32, the sums are float32 as the error bound assumes; slower, same answer).
    """
    import torch

    if not _NO_OUT_DTYPE:
        try:
            return torch.mm(a, b.T, out_dtype=torch.float32)
        except TypeError:
            _NO_OUT_DTYPE.append(True)
    return torch.mm(a.float(), b.float().T)


def tile_hits(c, diagonal_mask=None) -> tuple[np.ndarray, np.ndarray]:
    """Positions (r, k) of a screened tile with C~ >= 0, as int64 numpy arrays.

    Args:
        c: (h, w) screened tile (overwritten on the diagonal).
        diagonal_mask: bool (h, w) true on and below the diagonal for a tile of self-matching that
            the diagonal crosses; those entries are pairs (i, j) with j <= i.
    """
    import torch

    if diagonal_mask is not None:
        c.masked_fill_(diagonal_mask, float("-inf"))
    rows = torch.nonzero(c.amax(dim=1) >= 0).flatten()
    if rows.numel() == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    r, k = torch.nonzero(c.index_select(0, rows) >= 0, as_tuple=True)
    return rows[r].cpu().numpy().astype(np.int64), k.cpu().numpy().astype(np.int64)


class TooManyCandidates(Exception):
    """A screen found more candidates than its caller allowed (the caller then screens otherwise)."""


def screen_pairs(
    scr: AugmentedScreen,
    n: int,
    m: int,
    upper: bool,
    *,
    block_rows: int,
    block_cols: int,
    progress: Callable[[int], None] | None = None,
    max_candidates: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs (int64 i, j) of all tiles; in self mode only j > i.

    Raises:
        TooManyCandidates: more than `max_candidates` were found (checked after each tile).
    """
    torch = scr.torch
    tiles = Tiles(n, m, block_rows, block_cols, upper)
    bc = block_rows if upper else block_cols
    out = None if scr.xs.is_cuda else torch.empty(block_rows * bc, dtype=scr.dtype)
    lower = None
    if upper:
        o = torch.arange(block_rows, device=scr.xs.device)
        lower = o[None, :] <= o[:, None]
    cand_i, cand_j = [], []
    found = 0
    a, a_range = None, None
    for i0, i1, j0, j1 in tiles:
        if a_range != (i0, i1):
            a, a_range = scr.a_block(i0, i1), (i0, i1)
        c = scr.tile(a, j0, j1, out)
        diag = lower[: i1 - i0, : j1 - j0] if lower is not None and j0 == i0 else None  # None unless upper
        r, k = tile_hits(c, diag)
        cand_i.append(r + i0)
        cand_j.append(k + j0)
        found += r.size
        if max_candidates is not None and found > max_candidates:
            raise TooManyCandidates(f"more than {max_candidates} candidates")
        if progress:
            progress(1)
    if not cand_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(cand_i), np.concatenate(cand_j)


def torch_screen(
    x: np.ndarray,
    y: np.ndarray | None,
    threshold: float,
    recipe: Recipe,
    *,
    device: str = "cpu",
    block_rows: int = 2048,
    block_cols: int = 2048,
    progress: Callable[[int], None] | None = None,
    max_candidates: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Screens x against y (or x itself) with `recipe`; returns candidate pairs (superset of the answer).

    Args:
        x, y: float32 (N, D), (M, D) finite rows (y None: self-matching, pairs i < j).
        threshold: unscaled distance bound.
        recipe: a `Recipe` of `RECIPES`.
        max_candidates: raise `TooManyCandidates` beyond this many.

    Returns:
        int64 (K,), (K,) candidate pairs: every pair whose exact distance is <= threshold, and more.
    """
    import torch

    sp = scaled_problem(x, y, threshold, recipe.screen(x.shape[1]), recipe.target_exp)
    with torch.inference_mode(), full_fp32_matmul():
        xs = torch.from_numpy(x).to(device)
        ys = None if y is None else torch.from_numpy(y).to(device)
        scr = AugmentedScreen(xs, ys, sp, recipe)
        other = x if y is None else y
        return screen_pairs(
            scr,
            x.shape[0],
            other.shape[0],
            y is None,
            block_rows=block_rows,
            block_cols=block_cols,
            progress=progress,
            max_candidates=max_candidates,
        )

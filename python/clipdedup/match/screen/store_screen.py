"""The screening operands of a row store's rows: built by one pass over the store, or kept in the
match cache between runs (match/cache/screen.py).

`ScreenRows` is what does not depend on the threshold: each row's projection onto k principal
directions (`match.screen.project`), scaled by a power of two fixed from a bound of the largest row norm and
rounded to the recipe's type, the float64 squared norm of the unrounded projection, and whether the
row is finite. `finish_screen` adds, for one threshold, the projected threshold and every row's
shift pieces (the margins of `match.screen.bounds`), giving the `StoreScreen` that `match.store` tiles.
Any basis and any bound >= the row norms give a lossless screen, so operands kept from an earlier run
stay valid for unchanged rows as long as the new rows' norms are within its bound.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipdedup.db.rowstore import RowStore
from clipdedup.match.core import scaled_from_norms, squared_norms
from clipdedup.match.screen import int_screen
from clipdedup.match.screen.bounds import pow2_scale, split_pieces
from clipdedup.match.screen.project import (
    PROJECT_DIM,
    Projection,
    principal_projection,
    project,
    projected_threshold,
)
from clipdedup.match.screen.torch_screen import RECIPES, Recipe

BLOCK = 4096  # rows per pass block: 20 MiB of float32 at D = 1280


@dataclass
class ScreenRows:
    """The part of a `StoreScreen` that does not depend on the threshold: what the match cache keeps.

    Attributes:
        recipe: the screen's `match.screen.torch_screen.Recipe`; recipe_name: its `RECIPES` name.
        k: width of the screened rows (projected, or D without projection).
        proj: the projection (None: the rows themselves are screened).
        rx: >= the norm of every finite row (fixes the scale and the projected threshold).
        cols: torch (N, k + 2p) in the recipe's type; [:, :k] = scale * P x_j rounded, the rest is
            filled by `finish_screen`.
        na0: float64 (N,): squared norms of the unrounded projections (P x_j, float32).
        finite: bool (N,): rows without NaN or inf.
    """

    recipe_name: str
    k: int
    proj: Projection | None
    rx: float
    cols: Any
    na0: np.ndarray
    finite: np.ndarray

    @property
    def recipe(self) -> Recipe:
        return RECIPES[self.recipe_name]

    @property
    def scale(self) -> float:
        """The power of two the projections are scaled by before rounding (from rx alone)."""
        bound = self.rx if self.proj is None else (self.proj.sigma + self.proj.eps) * self.rx * (1 + 2.0**-20)
        return pow2_scale(bound, self.recipe.target_exp)  # bound >= every computed projection's norm

    def fill(self, ids: np.ndarray | slice, blk: np.ndarray, finite: np.ndarray) -> None:
        """Sets the rows `ids` from their float32 values `blk` (non-finite rows zeroed, as in `finite`)."""
        import torch

        px = project(blk, self.proj) if self.proj is not None else blk
        self.na0[ids] = squared_norms(px)
        self.finite[ids] = finite
        at = ids if isinstance(ids, slice) else torch.from_numpy(ids)
        with torch.inference_mode():
            v = torch.from_numpy(px) * self.scale  # exact: a power of two
            self.cols[at, : self.k] = (torch.round(v) if self.recipe.integer else v).to(self.cols.dtype)


def new_screen_rows(n: int, recipe_name: str, k: int, proj: Projection | None, rx: float) -> ScreenRows:
    """Empty `ScreenRows` for n rows (zero columns, no row finite yet)."""
    import torch

    recipe = RECIPES[recipe_name]
    width = int_screen.width(k) if recipe.integer else k + 2 * recipe.pieces
    cols = torch.zeros((n, width), dtype=getattr(torch, recipe.dtype))
    return ScreenRows(recipe_name, k, proj, rx, cols, np.zeros(n, np.float64), np.zeros(n, bool))


@dataclass
class StoreScreen:
    """The screening operands of every row of a store (see the module docstring).

    Attributes:
        rows: the threshold-free part (projections, norms, finite rows).
        threshold: the answer's distance bound.
        alpha: float recipes: torch (N, p): alpha_i pieces (rows of x are [s P x_i | alpha_i pieces |
            1 .. 1]); rows.cols hold [s P x_j | 1 .. 1 | beta_j pieces]. The int16 recipe: int32
            (N,) numpy, each row's tau of `int_screen` (rows.cols hold round(s P x_j)).
    """

    rows: ScreenRows
    threshold: float
    alpha: Any

    @property
    def recipe(self) -> Recipe:
        return self.rows.recipe

    @property
    def k(self) -> int:
        return self.rows.k

    @property
    def cols(self) -> Any:
        return self.rows.cols

    @property
    def finite(self) -> np.ndarray:
        return self.rows.finite

    def a_block(self, rows: np.ndarray) -> Any:
        """The x-side operands of `rows` (sorted int64 ids), (len(rows), k + 2p); the int16 recipe:
        int16 numpy (len(rows), width)."""
        p = self.recipe.pieces
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        if self.recipe.integer:
            cols = self.cols.numpy()
            return cols[lo:hi] if hi - lo == len(rows) else cols[rows]
        if hi - lo == len(rows):  # consecutive rows: a slice, not a gather
            a = self.cols[lo:hi].clone()
        else:
            import torch

            a = self.cols[torch.from_numpy(rows)]
        a[:, self.k : self.k + p] = self.alpha[rows]
        a[:, self.k + p :] = 1
        return a


def _finite_blocks(store: RowStore, block: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(i0, rows with non-finite ones zeroed, finite mask) for consecutive blocks of the store."""
    for i0, blk in store.blocks(block):
        fin = np.isfinite(blk).all(axis=1)
        if not fin.all():
            blk[~fin] = 0
        yield i0, blk, fin


def screen_rows(
    store: RowStore, recipe_name: str, *, k: int = PROJECT_DIM, sample: int = 1024, block: int = BLOCK
) -> ScreenRows:
    """The `ScreenRows` of every row of `store`: a bound of the row norms (from the store's opening
    pass, or a pass of its own), a projection from a sample, then one pass that projects every row."""
    n, d = store.n, store.dim
    if store.seen is not None:  # the store's opening pass saw every row already
        finite, top = store.seen.finite, store.seen.max_sq
    else:
        finite, top = np.zeros(n, bool), 0.0
        for i0, blk, fin in _finite_blocks(store, block):
            finite[i0 : i0 + len(blk)] = fin
            top = max(top, float(squared_norms(blk).max(initial=0.0)))
    proj: Projection | None = None
    if k < d:
        ids = np.flatnonzero(finite)
        ids = ids[np.linspace(0, len(ids) - 1, min(len(ids), sample)).astype(np.int64)] if len(ids) else ids
        proj = principal_projection(store.take(ids) if len(ids) else np.zeros((1, d), np.float32), k)
    else:
        k = d
    # rx >= every finite row's norm (a bound is enough: it only widens t1)
    sr = new_screen_rows(n, recipe_name, k, proj, math.sqrt(top))
    for i0, blk, fin in _finite_blocks(store, block):
        sr.fill(slice(i0, i0 + len(blk)), blk, fin)  # `project` multiplies in full float32
    return sr


def finish_screen(sr: ScreenRows, threshold: float) -> StoreScreen:
    """The `StoreScreen` of `sr` at `threshold`: the projected threshold and every row's shift pieces
    (written into sr.cols, replacing those of any earlier threshold)."""
    import torch

    k, recipe = sr.k, sr.recipe
    if recipe.integer:
        t1 = int_screen.screened_threshold(threshold, k)
        if sr.proj is not None:
            t1 = projected_threshold(threshold, sr.proj, sr.rx, sr.rx)
        tau = int_screen.thresholds(sr.na0, sr.cols.numpy(), sr.scale, t1, sr.finite)
        return StoreScreen(sr, float(threshold), tau)
    t1 = threshold if sr.proj is None else projected_threshold(threshold, sr.proj, sr.rx, sr.rx)
    dtype = getattr(torch, recipe.dtype)
    p = recipe.pieces
    with torch.inference_mode():
        sp = scaled_from_norms(sr.na0, sr.na0, t1, k, recipe.screen(k), recipe.target_exp, scale=sr.scale)
        alpha = torch.from_numpy(np.stack(split_pieces(sp.alpha, p, dtype), 1)).to(dtype)
        sr.cols[:, k + p :] = torch.from_numpy(np.stack(split_pieces(sp.beta, p, dtype), 1)).to(dtype)
        del sp
        sr.cols[:, k : k + p] = 1
        bad = torch.from_numpy(np.flatnonzero(~sr.finite))
        alpha[bad] = -math.inf
        sr.cols[bad, k + p :] = -math.inf
    return StoreScreen(sr, float(threshold), alpha)


def screen_store(
    store: RowStore,
    threshold: float,
    recipe: str,
    *,
    k: int = PROJECT_DIM,
    sample: int = 1024,
    block: int = BLOCK,
) -> StoreScreen:
    """Builds the `StoreScreen` of every row of `store` (bounded buffers); `recipe` is a
    `match.screen.torch_screen.RECIPES` name."""
    return finish_screen(screen_rows(store, recipe, k=k, sample=sample, block=block), threshold)

"""Matching rows that stay on disk: `find_pairs` of a `RowStore`, in memory bounded by the screen.

Resident per row while matching: the screening operands (`StoreScreen`: the row's projection onto
k principal directions, scaled and rounded to the recipe's type, with its shift pieces; 268 bytes
at k = 128 in bfloat16) and the store's 16 bytes. Full rows are only ever read from the store:

1. One pass over the store builds the operands (`match.screen.store_screen`: a bound of the largest row
   norm, known from the store's opening pass or from a pass of its own, fixes the power-of-two
   scale before any projection is known): the projections, their norms and the margins of
   `match.screen.bounds` at the projected threshold of `match.screen.project` (a lower bound of the distance).
   A rerun takes the unchanged rows' operands from the match cache instead (`match.cache.screen`).
2. Each tile (a block of rows against a block of columns, `match_tile`) screens the operands; when
   it leaves more candidates than `max_candidates` (clustered data), the tile's full rows are read
   into two bounded buffers and screened with the same recipe instead.
3. The exact float64 re-check (`match.core.recheck`) reads just the candidates' rows.

So the answer is `find_pairs`'s, pair for pair and bit for bit: every screen is lossless and the
re-check is the same function on the same float32 rows. Rows holding NaN or inf take part in no pair.

`match_tile` is the unit of work: a block of rows (any sorted row ids) against a block of columns
of one store, so workers that share the store's files can each take tiles (the upper triangle of
`find_pairs_store`'s tiles, or one new block against all columns).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from clipdedup.db.rowstore import RowStore
from clipdedup.match.core import recheck
from clipdedup.match.screen.int_screen import TooManyHits, int16_rows_screen, int16_screen
from clipdedup.match.screen.project import PROJECT_DIM
from clipdedup.match.screen.store_screen import StoreScreen, screen_store
from clipdedup.match.screen.torch_screen import tile_hits, torch_screen

BLOCK = 4096  # rows per tile side: a bfloat16 tile of 32 MiB, full-row buffers of 20 MiB at D = 1280


def match_tile(
    store: RowStore,
    scr: StoreScreen,
    rows: np.ndarray,
    j0: int,
    j1: int,
    *,
    in_rows: np.ndarray | None = None,
    max_candidates: int | None = None,
    buffers: dict | None = None,
    a: Any = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exact pairs between `rows` (sorted int64 row ids) and the columns j0:j1 of one store.

    A pair (a, b), a in rows, b in j0:j1, a != b, is reported once: as (min, max), and only from
    the side that owns it: when b is itself a row being matched (`in_rows[b]`, default every row,
    as in self-matching) only a < b reports it.

    Args:
        store, scr: the rows and their `screen_store` operands.
        rows: int64 (K,) sorted row ids; j0, j1: the column block.
        in_rows: bool (N,): the rows matched as `rows` across all tiles (None: all rows).
        max_candidates: beyond this many screened candidates the tile's full rows are screened
            (default one per 1024 pairs, at least 4096).
        buffers: reused float32 buffers between calls (any dict; filled on first use).
        a: `scr.a_block(rows)`, when the caller matches these rows against several blocks.

    Returns:
        int64 (P,), int64 (P,), float64 (P,): pairs i < j and their exact distances, unsorted.
    """
    buffers = {} if buffers is None else buffers
    t = scr.threshold
    if max_candidates is None:
        max_candidates = max(4096, len(rows) * (j1 - j0) // 1024)
    a = scr.a_block(rows) if a is None else a
    screen = _screen_int16 if scr.recipe.integer else _screen_torch
    hits = screen(scr, a, rows, j0, j1, in_rows, max_candidates, buffers)
    full = hits is None
    if hits is None:  # the screen was too coarse here: screen the tile's full rows instead
        xa = store.take(rows, _buffer(buffers, "a", len(rows), store.dim))
        xb = store.block(j0, j1, _buffer(buffers, "b", j1 - j0, store.dim))
        xa[~scr.finite[rows]] = 0
        xb[~scr.finite[j0:j1]] = 0
        r, q = int16_rows_screen(xa, xb, t) if scr.recipe.integer else torch_screen(xa, xb, t, scr.recipe)
    else:
        r, q = hits
    ci, cj = rows[r], q + j0
    keep = (ci != cj) & scr.finite[ci] & scr.finite[cj]
    keep &= ci < cj if in_rows is None else (ci < cj) | ~in_rows[cj]
    ci, cj = ci[keep], cj[keep]
    if full:
        i, j, d = recheck(xa, xb, r[keep], q[keep], t)
        i, j = rows[i], j + j0
    else:
        need = np.unique(np.concatenate([ci, cj]))
        x = store.take(need, _buffer(buffers, "c", len(need), store.dim))
        i, j, d = recheck(x, x, np.searchsorted(need, ci), np.searchsorted(need, cj), t)
        i, j = need[i], need[j]
    return np.minimum(i, j), np.maximum(i, j), d


def _screen_torch(
    scr: StoreScreen, a: Any, rows: np.ndarray, j0: int, j1: int, in_rows: Any, cap: int, buffers: dict
) -> tuple[np.ndarray, np.ndarray] | None:
    """Positions (r, q) of the screened tile of a float recipe, or None beyond `cap` of them."""
    import torch

    with torch.inference_mode():
        out = buffers.get("tile")
        if out is None or out.numel() < len(rows) * (j1 - j0):
            out = buffers["tile"] = torch.empty(len(rows) * (j1 - j0), dtype=scr.cols.dtype)
        c = out[: len(rows) * (j1 - j0)].view(len(rows), j1 - j0)
        torch.mm(a, scr.cols[j0:j1].T, out=c)
        _mask_not_owned(c, rows, j0, j1, in_rows)
        r, q = tile_hits(c)
    return None if len(r) > cap else (r, q)


def _screen_int16(
    scr: StoreScreen, a: Any, rows: np.ndarray, j0: int, j1: int, in_rows: Any, cap: int, buffers: dict
) -> tuple[np.ndarray, np.ndarray] | None:
    """Positions (r, q) of the int16 screen of the tile, or None beyond `cap` of them. Consecutive
    rows of self-matching skip the pairs below the diagonal; `match_tile` drops the other pairs it
    does not own."""
    upper = in_rows is None and int(rows[-1]) - int(rows[0]) + 1 == len(rows)
    tau = scr.alpha
    cols = scr.cols.numpy()[j0:j1]
    try:
        return int16_screen(
            a, cols, tau[rows], tau[j0:j1], upper=upper, row_base=int(rows[0]), col_base=j0, max_hits=cap
        )
    except TooManyHits:
        return None


def _mask_not_owned(c: Any, rows: np.ndarray, j0: int, j1: int, in_rows: np.ndarray | None) -> None:
    """Sets -inf where a screened tile holds a pair this tile does not report (b == a, or b a
    matched row below a), so that the search for hits skips them (the diagonal of self-matching)."""
    if rows[-1] < j0:
        return  # every column is above every row
    cols = np.arange(j0, j1) if in_rows is None else j0 + np.flatnonzero(in_rows[j0:j1])
    if not len(cols):
        return
    import torch

    below = torch.from_numpy(rows[:, None] >= cols[None, :])
    if len(cols) == j1 - j0:
        c.masked_fill_(below, float("-inf"))
    else:
        at = torch.from_numpy(cols - j0)
        c[:, at] = c[:, at].masked_fill_(below, float("-inf"))


def _buffer(buffers: dict, name: str, rows: int, dim: int) -> np.ndarray:
    buf = buffers.get(name)
    if buf is None or len(buf) < rows:
        buf = buffers[name] = np.empty((max(rows, BLOCK), dim), np.float32)
    return buf


def find_pairs_store(
    store: RowStore,
    threshold: float,
    *,
    rows: np.ndarray | None = None,
    recipe: str = "bfloat16",
    k: int = PROJECT_DIM,
    block: int = BLOCK,
    max_candidates: int | None = None,
    progress: Callable[[int], None] | None = None,
    screen: StoreScreen | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`find_pairs` of the store's rows (self-matching), or only the pairs that touch `rows`.

    Args:
        store: the rows.
        threshold: distance bound, inclusive (finite, >= 0).
        rows: int64 sorted row ids: only pairs with at least one end among them (every such
            pair once); None: all pairs.
        recipe: a `match.screen.torch_screen.RECIPES` name ("bfloat16" for cpu-bf16, "float32" for cpu-fp32).
        k: projected width of the screen (>= D: the rows themselves).
        block: rows per tile side.
        max_candidates: see `match_tile`.
        progress: called with 1 per finished tile.
        screen: operands already built for this store, recipe and threshold.

    Returns:
        (pairs, distances): int64 (P, 2) sorted by (i, j), i < j, and their float64 exact distances
        (`find_pairs` returns these as float32).
    """
    if not (threshold >= 0) or math.isinf(threshold):
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold}")
    n = store.n
    if n == 0 or (rows is not None and len(rows) == 0):
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float64)
    scr = screen or screen_store(store, float(threshold), recipe, k=k, block=block)
    in_rows = None
    if rows is not None:
        rows = np.unique(np.asarray(rows, np.int64))
        in_rows = np.zeros(n, bool)
        in_rows[rows] = True
    ids = np.arange(n, dtype=np.int64) if rows is None else rows
    buffers: dict = {}
    out_i, out_j, out_d = [], [], []
    for s in range(0, len(ids), block):
        part = ids[s : s + block]
        a = scr.a_block(part)
        first = int(part[0]) // block * block if rows is None else 0  # self: the upper triangle only
        for j0 in range(first, n, block):
            j1 = min(n, j0 + block)
            kw = dict(in_rows=in_rows, max_candidates=max_candidates, buffers=buffers, a=a)
            i, j, d = match_tile(store, scr, part, j0, j1, **kw)
            out_i.append(i)
            out_j.append(j)
            out_d.append(d)
            if progress:
                progress(1)
    i, j, d = np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_d)
    order = np.lexsort((j, i))
    return np.stack([i[order], j[order]], axis=1).reshape(-1, 2), d[order]


def tile_count(n: int, rows: int | None = None, block: int = BLOCK) -> int:
    """How many tiles `find_pairs_store` runs (for progress bars)."""
    nb = -(-n // block)
    return nb * (nb + 1) // 2 if rows is None else -(-rows // block) * nb

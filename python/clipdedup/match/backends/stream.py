"""GPU matching from a row store: `find_pairs_store_gpu`, the `triton` and `torch-cuda` screens fed
by bounded buffers instead of a whole matrix.

What goes in: a `RowStore` (self-matching, or only the pairs touching `rows`, or against a second
store `y_store` as import mode does) and a threshold. What comes out: `find_pairs_store`'s answer,
pairs (i, j) sorted with their float64 exact distances, pair for pair (the screens are lossless and
the re-check is `match.core.recheck` on the same float32 rows).

How the memory stays bounded:
- Host, per row: the store's 16 bytes, one float32 shift per side and a finite flag (the float64
  norms of the opening pass are dropped once the shifts are made). Rows travel from the store into
  two staging buffers of `piece_rows` rows each (page-locked on CUDA; `ChunkLoader` reads the store
  straight into them with pread, fills one while the other is being copied, on a copy stream that
  overlaps the previous step's screening).
- Device: `match.backends.triton.plan_steps` splits the (N x M) problem into steps of one query
  chunk against one key chunk, so that a resident query chunk, the key chunk being screened and the
  next one arriving, their shifts, the candidate buffer and the tiles fit `budget_bytes`.
- Candidates are re-checked step by step, reading their rows from the store in chunks of pairs.

Both backends screen the same operands (float16 rows scaled by a power of two, float32 shifts) with
the same arithmetic, so `triton_screen`'s error constants serve both: the Triton kernel, or
`pairwise_within_torch` (torch matmuls with a float32 output, no host sync per tile).
Rows holding NaN or inf are zeroed on the way and given a shift of -inf: they take part in no pair.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from clipdedup.db.rowstore import BLOCK_ROWS
from clipdedup.match.backends.triton import (
    BLOCKS,
    TARGET_EXP,
    ChunkLoader,
    Step,
    plan_steps,
    run_steps,
    triton_screen,
)
from clipdedup.match.core import MATCHERS, recheck, scaled_from_norms, squared_norms
from clipdedup.match.screen.bounds import pow2_scale

GPU_STORE_BACKENDS = ("triton", "torch-cuda")
PIECE_ROWS = 16384  # rows per staging buffer: 80 MiB of float32 at D = 1280, two of them
PAIR_CHUNK = 4096  # candidate pairs re-checked at once: at most 8192 rows read (40 MiB at D = 1280)
SHIFT_CHUNK = 1 << 20  # rows per float64 temporary while making the shifts
TORCH_BLOCKS = (8192, 8192, 8)  # rows, columns of a torch-cuda tile; operand width a multiple of 8


@dataclass(frozen=True)
class Screener:
    """One backend's part: the step function (`pairwise_within`'s signature), its tiles, the operand
    width multiple, its pair limit and the device bytes of one step besides the rows."""

    pairwise: Callable[..., Any]
    blocks: tuple[int, ...]
    width_of: int
    max_pairs: int
    tile_bytes: int


def screener(
    backend: str, pairwise: Callable | None = None, blocks: tuple[int, ...] | None = None
) -> Screener:
    """The `Screener` of "triton" (imports the kernel, hence triton) or "torch-cuda"."""
    if backend == "triton":
        from clipdedup.kernels import pairwise as kmod

        b = blocks or BLOCKS
        return Screener(pairwise or kmod.pairwise_within, b, b[2], kmod.MAX_PAIRS, 0)
    if backend == "torch-cuda":
        from clipdedup.match.backends import torch_steps

        b = blocks or TORCH_BLOCKS
        fn = pairwise or torch_steps.pairwise_within_torch
        # the float32 tile, its mask, the positions and the step buffer's scatter operands
        return Screener(fn, b, 8, torch_steps.MAX_PAIRS, b[0] * b[1] * 13)
    raise ValueError(f"no streamed screen for backend {backend!r}; one of {', '.join(GPU_STORE_BACKENDS)}")


def operand_width(dim: int, scr: Screener) -> int:
    """Columns of a row's float16 operand: D rounded up to the screen's multiple (zero padding)."""
    return -(-dim // scr.width_of) * scr.width_of


def device_bytes(dim: int, scr: Screener, cap: int, piece_rows: int = PIECE_ROWS) -> tuple[int, int]:
    """(bytes per row, fixed bytes) of a step on the device: each row's float16 operand and shift;
    the float32 pieces on their way in (copied, then scaled), the candidate buffer with its int64
    copy, and the screen's tiles. `plan_steps` fits three chunks of rows into the rest."""
    return 2 * operand_width(dim, scr) + 4, 2 * piece_rows * dim * 4 * 2 + 24 * cap + scr.tile_bytes


class Rows(Protocol):
    """What the steps read rows from: a `RowStore`, or `ArrayRows` (a matrix)."""

    @property
    def n(self) -> int: ...

    dim: int

    def take(self, idx: np.ndarray, out: np.ndarray | None = None) -> np.ndarray: ...

    def blocks(self, rows: int = BLOCK_ROWS) -> Iterator[tuple[int, np.ndarray]]: ...


class ArrayRows:
    """A float32 (N, D) matrix read as a `RowStore` is (copies into the caller's buffers), so that
    `find_pairs` on a matrix runs the same streamed steps (`pairs_of_arrays`)."""

    def __init__(self, x: np.ndarray) -> None:
        self.x, self.dim = x, x.shape[1]

    @property
    def n(self) -> int:
        return len(self.x)

    def take(self, idx: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        view = (np.empty((len(idx), self.dim), np.float32) if out is None else out)[: len(idx)]
        np.take(self.x, idx, axis=0, out=view)
        return view

    def blocks(self, rows: int = BLOCK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        buf = np.empty((min(rows, max(1, self.n)), self.dim), np.float32)
        for i0 in range(0, self.n, rows):
            yield i0, self.take(np.arange(i0, min(self.n, i0 + rows)), buf)


class StoreRows:
    """Rows of a store (all, or the rows `ids`) as `ChunkLoader` reads them: rows that are not
    finite read as zeros (their shift is -inf)."""

    def __init__(self, store: Rows, finite: np.ndarray, ids: np.ndarray | None = None) -> None:
        self.store, self.finite, self.ids = store, finite, ids
        self.shape = (store.n if ids is None else len(ids), store.dim)

    def read(self, s: int, e: int, out: np.ndarray) -> np.ndarray:
        idx = np.arange(s, e, dtype=np.int64) if self.ids is None else self.ids[s:e]
        blk = self.store.take(idx, out)
        bad = ~self.finite[idx]
        if bad.any():
            blk[bad] = 0
        return blk


def store_norms(store: Rows, block: int = BLOCK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """float64 (N,) squared norms (`squared_norms`; 0 for rows that are not finite) and bool (N,)
    finite flags of every row, by one pass of bounded blocks."""
    na0, finite = np.zeros(store.n, np.float64), np.zeros(store.n, bool)
    for i0, blk in store.blocks(block):
        fin = np.isfinite(blk).all(axis=1)
        blk[~fin] = 0
        na0[i0 : i0 + len(blk)] = squared_norms(blk)
        finite[i0 : i0 + len(blk)] = fin
    return na0, finite


def shifts(
    na0: np.ndarray, nb0: np.ndarray, threshold: float, dim: int, chunk: int = SHIFT_CHUNK
) -> tuple[float, np.ndarray, np.ndarray]:
    """(scale, float32 alpha (N,), float32 beta (M,)): `scaled_from_norms(na0, nb0, ...)` for the
    Triton screen, computed `chunk` rows at a time. Every step of it is elementwise given the scale,
    the largest norm and the threshold, so putting the largest norm in front of each chunk gives the
    whole problem's values bit for bit (a test compares) with float64 temporaries of one chunk."""
    top = max(float(na0.max(initial=0.0)), float(nb0.max(initial=0.0)))
    s = pow2_scale(math.sqrt(top), TARGET_EXP)
    screen = triton_screen(dim)

    def side(v: np.ndarray, field: str) -> np.ndarray:
        out = np.empty(len(v), np.float32)
        for c in range(0, len(v), chunk):
            part = np.concatenate([[top], v[c : c + chunk]])
            sp = scaled_from_norms(part, part, threshold, dim, screen, TARGET_EXP, scale=s)
            out[c : c + chunk] = getattr(sp, field)[1:]
        return out

    return s, side(na0, "alpha"), side(nb0, "beta")


def recheck_store(
    xs: Rows, ys: Rows, i: np.ndarray, j: np.ndarray, threshold: float, chunk: int = PAIR_CHUNK
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`recheck(x, y, i, j, threshold)` with x, y the rows of two stores (or one), read in chunks of
    pairs, each distinct row once per chunk."""
    out_i, out_j, out_d = [i[:0]], [j[:0]], [np.zeros(0, np.float64)]
    sides = [xs] if ys is xs else [xs, ys]
    rows = min(2 * chunk, 2 * len(i))
    bufs = [np.empty((max(1, min(rows, st.n)), st.dim), np.float32) for st in sides]
    for s in range(0, len(i), chunk):
        ii, jj = i[s : s + chunk], j[s : s + chunk]
        if ys is xs:
            need = np.unique(np.concatenate([ii, jj]))
            x = xs.take(need, bufs[0])
            a, b, d = recheck(x, x, np.searchsorted(need, ii), np.searchsorted(need, jj), threshold)
            out_i.append(need[a])
            out_j.append(need[b])
        else:
            na, nb = np.unique(ii), np.unique(jj)
            ra, rb = xs.take(na, bufs[0]), ys.take(nb, bufs[1])
            a, b, d = recheck(ra, rb, np.searchsorted(na, ii), np.searchsorted(nb, jj), threshold)
            out_i.append(na[a])
            out_j.append(nb[b])
        out_d.append(d)
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_d)


def find_pairs_store_gpu(
    store: Rows,
    threshold: float,
    *,
    rows: np.ndarray | None = None,
    y_store: Rows | None = None,
    backend: str = "triton",
    budget_bytes: int | None = None,
    device: str = "cuda",
    cap: int = 1 << 20,
    blocks: tuple[int, ...] | None = None,
    pairwise: Callable | None = None,
    max_grid: int | None = None,
    max_pairs: int | None = None,
    piece_rows: int = PIECE_ROWS,
    progress: Callable[[int], None] | None = None,
    log: Callable[[str], object] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`find_pairs_store(store, threshold, rows=rows)` screened on the device, or the pairs
    (row of store, row of y_store) within `threshold` (`find_pairs(x, t, y=y)`'s answer).

    Args:
        rows: int64 row ids: only pairs with an end among them, each once as (min, max).
        y_store: a second store (import mode); not with `rows`.
        backend: "triton" or "torch-cuda".
        budget_bytes: device bytes of a step; default 60% of the free device memory (CUDA),
            unlimited elsewhere (tests make it tiny to force many steps).
        device: "cuda", or "cpu" (tests: the Triton interpreter, or torch on CPU).
        cap: first capacity of a step's candidate buffer (a step re-runs with the exact size).
        blocks, pairwise, max_grid: the step function's tiles, the function itself (tests pass an
            interpreted kernel) and its launch size.
        max_pairs: candidates allowed over the whole run; beyond it `TooManyPairsError`.
        piece_rows: rows per staging buffer.
        progress: called with 1 per finished step.

    Returns:
        (pairs, distances): int64 (P, 2) sorted by (i, j) (i < j without y_store), float64 (P,).
    """
    import torch

    if not (threshold >= 0) or math.isinf(threshold):
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold}")
    if rows is not None and y_store is not None:
        raise ValueError("rows= matches within one store; it cannot be combined with y_store=")
    scr = screener(backend, pairwise, blocks)
    ys = store if y_store is None else y_store
    ids = None if rows is None else np.unique(np.asarray(rows, np.int64))
    nx = store.n if ids is None else len(ids)
    if nx == 0 or ys.n == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float64)
    self_mode = ids is None and y_store is None
    nb0, fin_y = store_norms(ys)
    na0_s, fin_s = (nb0, fin_y) if y_store is None else store_norms(store)  # by row of store
    na0, fin_x = (na0_s, fin_s) if ids is None else (na0_s[ids], fin_s[ids])  # by query position
    scale, hq_host, hk_host = shifts(na0, nb0, float(threshold), store.dim)
    del na0, nb0, na0_s
    hq_host[~fin_x] = -np.inf
    hk_host[~fin_y] = -np.inf
    width, (row_bytes, fixed) = operand_width(store.dim, scr), device_bytes(store.dim, scr, cap, piece_rows)
    if budget_bytes is None:
        budget_bytes = int(torch.cuda.mem_get_info(device)[0] * 0.6) if device.startswith("cuda") else 1 << 62
    _, steps = plan_steps(nx, ys.n, row_bytes, max(budget_bytes - fixed, 0), self_mode)

    def note(line: str) -> None:
        if log is not None:
            log(line)

    load_q = load_k = ChunkLoader(StoreRows(store, fin_s, ids), scale, width, device, piece_rows, log=note)
    if not self_mode:
        load_k = ChunkLoader(StoreRows(ys, fin_y), scale, width, device, piece_rows, log=note)
    limit = scr.max_pairs if max_pairs is None else max_pairs
    launch = {} if max_grid is None else {"max_grid": max_grid}
    in_rows = None
    if ids is not None:
        in_rows = np.zeros(store.n, bool)
        in_rows[ids] = True
    total = [0]

    def compute(q, k, st: Step, overlap):
        hq = torch.from_numpy(hq_host[st.q0 : st.q1]).to(device)
        hk = torch.from_numpy(hk_host[st.k0 : st.k1]).to(device)
        cand = scr.pairwise(
            q, k, hq, hk, self_mode=self_mode, row_base=st.q0, col_base=st.k0, cap=cap,
            blocks=scr.blocks, overlap=overlap, max_pairs=limit - total[0], **launch,
        ).cpu().numpy()  # fmt: skip
        total[0] += len(cand)
        a, b = cand[:, 0], cand[:, 1]
        if in_rows is not None and ids is not None:  # a row being matched against every row
            a = ids[a]
            keep = (a != b) & ((a < b) | ~in_rows[b])
            a, b = np.minimum(a, b)[keep], np.maximum(a, b)[keep]
        found = recheck_store(store, ys, a, b, float(threshold))
        if progress:
            progress(1)
        return found

    with torch.inference_mode():
        parts = list(run_steps(steps, load_q, load_k, self_mode, compute))
    i, j, d = (np.concatenate([p[k] for p in parts]) for k in range(3))
    order = np.lexsort((j, i))
    return np.stack([i[order], j[order]], axis=1).reshape(-1, 2), d[order]


def streams(backend: str | None, cluster: Any = None) -> bool:
    """Whether a run matches row stores here: the backend named (or the best available) is a GPU
    one, and `cluster` (a `RayCluster` or None) does not match on Ray, which takes matrices."""
    return not (cluster is not None and cluster.match) and MATCHERS.get(backend).name in GPU_STORE_BACKENDS


def find_pairs_stores(
    x: Any,
    threshold: float,
    *,
    y: Any = None,
    backend: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`find_pairs` for stores x and y (`RowStore`s; import mode's call, typed as `find_pairs` is
    called): `find_pairs_store_gpu` with the `MATCHERS` backend named (or the best available, one
    of `GPU_STORE_BACKENDS`); distances as float32."""
    name = MATCHERS.get(backend).name
    pairs, d = find_pairs_store_gpu(x, threshold, y_store=y, backend=name, progress=progress)
    return pairs, d.astype(np.float32)


def pairs_of_arrays(
    x: np.ndarray, y: np.ndarray | None, threshold: float, *, backend: str, **kw: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A `MATCHERS` function's answer (i, j, distances) for finite float32 matrices, by the same
    streamed steps as stores (`find_pairs_store_gpu`'s keywords pass through)."""
    ys = None if y is None else ArrayRows(y)
    pairs, d = find_pairs_store_gpu(ArrayRows(x), threshold, y_store=ys, backend=backend, **kw)
    return pairs[:, 0], pairs[:, 1], d

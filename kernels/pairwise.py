"""Fused screening of all pairs within a distance: a float16 tensor-core matmul with the threshold
test in its epilogue, appending candidate pairs to a buffer through an atomic counter.

For a block of queries Q against keys K (both float16, scaled and zero-padded to a multiple of BK
columns by the caller), the kernel computes per tile

    s_ij = fl(fl(q_i . k_j + hq_i) + hk_j)        (float32 accumulate, float32 epilogue)

and appends (row_base + i, col_base + j) when s_ij >= 0 (and, when SELF, col > row). The shifts hq,
hk carry the squared norms, the threshold and the error margin (see clipdedup.match.screen.bounds), so the
kernel needs no knowledge of distances.

Launch grid: always 1-D over a list of tiles, split into launches of at most `MAX_GRID` programs
(`launch_plan`), so no grid dimension and no product of them can pass a hardware or launcher limit
at any N. When Q and K are the same rows (self mode, same base, same length) only the upper
triangle of tiles is enumerated (`tile_coords`: the triangle folded into a T/2 x (T+1) rectangle),
so no program is launched for a tile without pairs. Every program adds one to a device tile
counter and the host checks it against the planned count: a launch that did not run raises instead
of returning a partial answer. Offsets and both counters are int64.

Importing this module imports triton; `clipdedup.match.backends.triton` imports it only when asked to run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from clipdedup.errors import TooManyPairsError

# Programs per launch. Triton's launcher multiplies the grid dimensions in 32-bit int and skips a
# launch whose product is not > 0; CUDA allows gridDim.x < 2^31. 2^30 stays clear of both.
MAX_GRID = 1 << 30
# Pairs one call may return (a (P, 2) int32 device buffer of 8 P bytes, then int64 copies).
MAX_PAIRS = 1 << 28
MAX_INDEX = (1 << 31) - 1  # row indices are stored as int32


def tile_count(n_tm: int, n_tn: int, tri: bool) -> int:
    """Tiles of an (n_tm x n_tn)-tile problem: all, or the upper triangle with its diagonal."""
    return n_tm * (n_tm + 1) // 2 if tri else n_tm * n_tn


def tile_coords(t: int, n_tm: int, n_tn: int, tri: bool) -> tuple[int, int]:
    """(row tile, column tile) of tile number `t`: the kernel's arithmetic, in Python for tests.

    In `tri` mode (n_tm == n_tn = T) row r of the folded rectangle (width T + 1) holds the T - r
    tiles (r, r..T-1) followed by the r + 1 tiles (T-1-r, T-1-r..T-1); enumerating exactly
    T (T + 1) / 2 tiles leaves out the repeated half-row of the middle row when T is odd.
    """
    if not tri:
        return t // n_tn, t % n_tn
    r, c = divmod(t, n_tm + 1)
    if c < n_tm - r:
        return r, r + c
    i_m = n_tm - 1 - r
    return i_m, i_m + c - (n_tm - r)


def launch_plan(n_tiles: int, max_grid: int = MAX_GRID) -> list[tuple[int, int]]:
    """(first tile, programs) of each 1-D launch covering tiles [0, n_tiles), each <= max_grid."""
    return [(t0, min(max_grid, n_tiles - t0)) for t0 in range(0, n_tiles, max_grid)]


# Arguments that change between launches, streamed steps and overflow re-runs: without this,
# Triton compiles a new variant whenever one of them changes its divisibility by 16 or equals 1.
NO_SPECIALIZE = ["n_q", "n_k", "row_base", "col_base", "cap", "tile0", "n_tm", "n_tn"]


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def pairwise_within_kernel(
    q_ptr,
    k_ptr,
    hq_ptr,
    hk_ptr,
    out_ptr,
    count_ptr,
    n_q,
    n_k,
    row_base,
    col_base,
    cap,
    tile0,
    n_tm,
    n_tn,
    D: tl.constexpr,
    SELF: tl.constexpr,
    TRI: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    t = tile0 + tl.program_id(0).to(tl.int64)
    if TRI:
        w = n_tm + 1
        r = t // w
        c = t % w
        lo = c < n_tm - r
        i_m = tl.where(lo, r, n_tm - 1 - r)
        i_n = i_m + tl.where(lo, c, c - (n_tm - r))
    else:
        i_m = t // n_tn
        i_n = t % n_tn
    o_m = i_m * BM + tl.arange(0, BM).to(tl.int64)
    o_n = i_n * BN + tl.arange(0, BN).to(tl.int64)
    o_k = tl.arange(0, BK)
    m_m = o_m < n_q
    m_n = o_n < n_k
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        b_q = tl.load(q_ptr + o_m[:, None] * D + (k0 + o_k)[None, :], mask=m_m[:, None], other=0.0)
        b_k = tl.load(k_ptr + o_n[:, None] * D + (k0 + o_k)[None, :], mask=m_n[:, None], other=0.0)
        acc = tl.dot(b_q, tl.trans(b_k), acc)  # [BM, BN] float32
    b_hq = tl.load(hq_ptr + o_m, mask=m_m, other=0.0)
    b_hk = tl.load(hk_ptr + o_n, mask=m_n, other=0.0)
    b_s = (acc + b_hq[:, None]) + b_hk[None, :]
    hit = (b_s >= 0) & m_m[:, None] & m_n[None, :]
    g_m = row_base + o_m
    g_n = col_base + o_n
    if SELF:
        hit = hit & (g_n[None, :] > g_m[:, None])
    n_hit = tl.sum(hit.to(tl.int32)).to(tl.int64)
    if n_hit > 0:
        # One atomic per tile reserves n_hit slots; a prefix sum ranks the hits inside the tile.
        # The counter keeps counting past `cap`, so the host sees how much room a re-run needs.
        base = tl.atomic_add(count_ptr, n_hit)
        flat = tl.reshape(hit.to(tl.int32), (BM * BN,))
        rank = tl.reshape(tl.cumsum(flat, 0), (BM, BN)).to(tl.int64) - 1
        slot = base + rank
        keep = hit & (slot >= 0) & (slot < cap)
        zero = tl.zeros((BM, BN), dtype=tl.int64)
        tl.store(out_ptr + 2 * slot, (g_m[:, None] + zero).to(tl.int32), mask=keep)
        tl.store(out_ptr + 2 * slot + 1, (g_n[None, :] + zero).to(tl.int32), mask=keep)
    tl.atomic_add(count_ptr + 1, tl.full((), 1, tl.int64))  # this tile is done


def pairwise_within(
    q: torch.Tensor,
    k: torch.Tensor,
    hq: torch.Tensor,
    hk: torch.Tensor,
    *,
    self_mode: bool,
    row_base: int = 0,
    col_base: int = 0,
    cap: int = 1 << 16,
    blocks: tuple[int, int, int] = (128, 128, 64),
    num_warps: int = 8,
    num_stages: int = 3,
    overlap: Callable[[], None] | None = None,
    max_grid: int = MAX_GRID,
    max_pairs: int = MAX_PAIRS,
) -> torch.Tensor:
    """Candidate pairs (row_base + i, col_base + j) with fl(q_i.k_j + hq_i + hk_j) >= 0.

    Args:
        q: float16 (N, D) queries, D a multiple of blocks[2] (zero-pad), contiguous.
        k: float16 (M, D) keys, same D.
        hq: float32 (N,) row shifts; hk: float32 (M,) column shifts.
        self_mode: keep only col > row. With row_base == col_base and N == M (q and k the same
            rows) only the upper triangle of tiles is launched (needs BM == BN).
        row_base, col_base: global index of q[0] and k[0].
        cap: initial output capacity; when the kernel finds more, it is re-run with exactly the room
            it asked for (the counter counts every hit, stored or not).
        blocks: (BM, BN, BK) tile sizes (each >= 16, powers of two).
        overlap: host work to do once while the first launch runs (the next chunk's copy).
        max_grid: programs per launch (tests make it tiny to force several launches).
        max_pairs: raise `TooManyPairsError` when more candidates than this are found.

    Returns:
        int64 (P, 2) tensor of global (row, col) indices on q's device, in no particular order.

    Raises:
        RuntimeError: fewer tiles ran than were planned (a launch was skipped or failed).
        TooManyPairsError: more than `max_pairs` candidates.
    """
    bm, bn, bk = blocks
    n, d = q.shape
    m = k.shape[0]
    if d % bk or k.shape[1] != d:
        raise ValueError(f"q and k must share a width that is a multiple of {bk}, got {d} and {k.shape[1]}")
    if row_base + n - 1 > MAX_INDEX or col_base + m - 1 > MAX_INDEX:
        raise ValueError(f"row indices past {MAX_INDEX} do not fit the int32 output")
    if n == 0 or m == 0:
        return torch.zeros((0, 2), dtype=torch.int64, device=q.device)
    tri = self_mode and row_base == col_base and n == m and bm == bn
    n_tm, n_tn = triton.cdiv(n, bm), triton.cdiv(m, bn)
    planned = tile_count(n_tm, n_tn, tri)
    while True:
        out = torch.full((cap, 2), -1, dtype=torch.int32, device=q.device)  # poisoned
        count = torch.zeros(2, dtype=torch.int64, device=q.device)  # [hits, tiles done]
        for tile0, programs in launch_plan(planned, max_grid):
            pairwise_within_kernel[(programs,)](
                q, k, hq, hk, out, count, n, m, row_base, col_base, cap, tile0, n_tm, n_tn,
                D=d, SELF=self_mode, TRI=tri, BM=bm, BN=bn, BK=bk, num_warps=num_warps, num_stages=num_stages,
            )  # fmt: skip
        if overlap is not None:
            overlap()
            overlap = None
        found, done = (int(v) for v in count.tolist())
        if done != planned:
            raise RuntimeError(
                f"pairwise_within: {done} of {planned} tiles ran ({n} x {m} rows, blocks {blocks}); "
                "a kernel launch was skipped or failed, the answer would be partial"
            )
        if found > max_pairs:
            raise TooManyPairsError(
                f"{found} candidate pairs within the threshold among {n} x {m} rows (limit {max_pairs}): "
                "is one image copied thousands of times? Lower the threshold or remove the copies first"
            )
        if found <= cap:
            return out[:found].to(torch.int64)
        cap = found


def pairwise_within_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    hq: torch.Tensor,
    hk: torch.Tensor,
    *,
    self_mode: bool,
    row_base: int = 0,
    col_base: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's test evaluated in float64 on the same operands.

    Returns:
        (pairs, s): int64 (P, 2) global (row, col) pairs with s >= 0 (col > row when self_mode),
        sorted by row then col, and the float64 (N, M) matrix s itself, so that callers comparing
        with the kernel can allow pairs whose s is within the kernel's float32 rounding of zero.
    """
    s = q.double() @ k.double().T + hq.double()[:, None] + hk.double()[None, :]
    g_m = row_base + torch.arange(q.shape[0], device=q.device)
    g_n = col_base + torch.arange(k.shape[0], device=q.device)
    keep = s >= 0
    if self_mode:
        keep &= g_n[None, :] > g_m[:, None]
    r, c = torch.nonzero(keep, as_tuple=True)
    return torch.stack([g_m[r], g_n[c]], 1), s


__all__ = [
    "MAX_GRID",
    "MAX_PAIRS",
    "TooManyPairsError",
    "launch_plan",
    "pairwise_within",
    "pairwise_within_kernel",
    "pairwise_within_ref",
    "tile_coords",
    "tile_count",
]

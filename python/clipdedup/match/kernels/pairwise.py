"""Fused screening of all pairs within a distance: a float16 tensor-core matmul with the threshold
test in its epilogue, appending candidate pairs to a buffer through an atomic counter.

For a block of queries Q against keys K (both float16, scaled and zero-padded to a multiple of BK
columns by the caller), the kernel computes per tile

    s_ij = fl(fl(q_i . k_j + hq_i) + hk_j)        (float32 accumulate, float32 epilogue)

and appends (row_base + i, col_base + j) when s_ij >= 0 (and, when SELF, col > row). The shifts hq,
hk carry the squared norms, the threshold and the error margin (see clipdedup.match.bounds), so the
kernel needs no knowledge of distances. In SELF mode tiles wholly on or below the diagonal return at
once: only the upper triangle of tiles does work.

Importing this module imports triton; `clipdedup.match.triton` imports it only when asked to run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl


@triton.jit
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
    D: tl.constexpr,
    SELF: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_n = tl.program_id(1)
    if SELF:
        # Largest column of this tile <= smallest row: no pair with col > row.
        if col_base + (i_n + 1) * BN - 1 <= row_base + i_m * BM:
            return
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
    n_hit = tl.sum(hit.to(tl.int32))
    if n_hit > 0:
        # One atomic per tile reserves n_hit slots; a prefix sum ranks the hits inside the tile.
        # The counter keeps counting past `cap`, so the host sees how much room a re-run needs.
        base = tl.atomic_add(count_ptr, n_hit)
        flat = tl.reshape(hit.to(tl.int32), (BM * BN,))
        rank = tl.reshape(tl.cumsum(flat, 0), (BM, BN)) - 1
        slot = (base + rank).to(tl.int64)
        keep = hit & (slot < cap)
        zero = tl.zeros((BM, BN), dtype=tl.int64)
        tl.store(out_ptr + 2 * slot, (g_m[:, None] + zero).to(tl.int32), mask=keep)
        tl.store(out_ptr + 2 * slot + 1, (g_n[None, :] + zero).to(tl.int32), mask=keep)


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
) -> torch.Tensor:
    """Candidate pairs (row_base + i, col_base + j) with fl(q_i.k_j + hq_i + hk_j) >= 0.

    Args:
        q: float16 (N, D) queries, D a multiple of blocks[2] (zero-pad), contiguous.
        k: float16 (M, D) keys, same D.
        hq: float32 (N,) row shifts; hk: float32 (M,) column shifts.
        self_mode: q and k are the same rows offset by row_base/col_base; keep only col > row.
        row_base, col_base: global index of q[0] and k[0].
        cap: initial output capacity; when the kernel finds more, it is re-run with exactly the room
            it asked for (the counter counts every hit, stored or not).
        blocks: (BM, BN, BK) tile sizes (each >= 16, powers of two).
        overlap: host work to do once while the first launch runs (the next chunk's copy).

    Returns:
        int64 (P, 2) tensor of global (row, col) indices on q's device, in no particular order.
    """
    bm, bn, bk = blocks
    n, d = q.shape
    m = k.shape[0]
    if d % bk or k.shape[1] != d:
        raise ValueError(f"q and k must share a width that is a multiple of {bk}, got {d} and {k.shape[1]}")
    if n == 0 or m == 0:
        return torch.zeros((0, 2), dtype=torch.int64, device=q.device)
    grid = (triton.cdiv(n, bm), triton.cdiv(m, bn))
    while True:
        out = torch.full((cap, 2), -1, dtype=torch.int32, device=q.device)  # poisoned
        count = torch.zeros(1, dtype=torch.int32, device=q.device)
        pairwise_within_kernel[grid](
            q, k, hq, hk, out, count, n, m, row_base, col_base, cap,
            D=d, SELF=self_mode, BM=bm, BN=bn, BK=bk, num_warps=num_warps, num_stages=num_stages,
        )  # fmt: skip
        if overlap is not None:
            overlap()
            overlap = None
        found = int(count.item())
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


__all__ = ["pairwise_within", "pairwise_within_kernel", "pairwise_within_ref"]

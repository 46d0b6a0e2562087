"""`torch-cuda`'s step: `pairwise_within_torch`, the Triton kernel's host wrapper
(`clipdedup.kernels.pairwise.pairwise_within`) in torch operations, for the streamed steps of
`match.backends.stream` (needs no triton).
"""

from __future__ import annotations

from collections.abc import Callable

from clipdedup.errors import TooManyPairsError
from clipdedup.match.screen.torch_screen import full_fp32_matmul, mm_float32_out

BLOCK = 8192  # rows and columns of a tile on a GPU
MAX_PAIRS = 1 << 28  # as the Triton kernel's: candidates of one call, int64 (P, 2) on the device
TILE_HITS = 1 << 16  # first room for one tile's hits (the step's buffer holds `cap`)
_NO_STATIC: list[bool] = []  # set once torch.nonzero_static has failed (old torch): syncing nonzero


def pairwise_within_torch(
    q,
    k,
    hq,
    hk,
    *,
    self_mode: bool,
    row_base: int = 0,
    col_base: int = 0,
    cap: int = 1 << 16,
    blocks: tuple[int, ...] = (BLOCK, BLOCK),
    overlap: Callable[[], None] | None = None,
    max_pairs: int = MAX_PAIRS,
    tile_hits: int = TILE_HITS,
    **_launch: object,
):
    """`clipdedup.kernels.pairwise.pairwise_within` in torch operations: the same operands, the
    same test fl(fl(q_i.k_j + hq_i) + hk_j) >= 0 (a float32-output float16 matmul, then two float32
    additions), the same output and the same re-run with the exact size when `cap` is too small.

    Nothing in the tile loop waits for the device: each tile's hits are placed into one step buffer
    by `torch.nonzero_static` and a device counter, and the host reads the counter once, after the
    last tile (the old per-tile `nonzero` + `.cpu()` synchronised every tile). `overlap` runs once
    after the first tile is queued, so the next chunk's copy overlaps the screening.

    Args:
        q, k: float16 (N, W), (M, W) scaled rows (zero padding); hq, hk: float32 (N,), (M,) shifts.
        blocks: (rows, columns) of a tile; further entries are ignored (the kernel's BK).
        tile_hits: first room for one tile's hits; a tile with more re-runs the step with room
            for the most any tile had (so that a tile's positions are not a tile-sized array).

    Returns:
        int64 (P, 2) global (row, col) pairs on q's device, col > row in self mode, unordered.
    """
    import torch

    bm, bn = blocks[0], blocks[1]
    n, m = q.shape[0], k.shape[0]
    dev = q.device
    if n == 0 or m == 0:
        return torch.zeros((0, 2), dtype=torch.int64, device=dev)
    # Tiles holding a pair col > row at all (self mode), in row-major order.
    tiles = [
        (i0, j0)
        for i0 in range(0, n, bm)
        for j0 in range(0, m, bn)
        if not self_mode or col_base + min(m, j0 + bn) - 1 > row_base + i0
    ]
    while True:
        out = torch.full((2, cap + 1), -1, dtype=torch.int64, device=dev)  # poisoned; [:, cap] spills
        count = torch.zeros((), dtype=torch.int64, device=dev)
        worst = torch.zeros((), dtype=torch.int64, device=dev)  # the most hits of one tile
        with torch.inference_mode(), full_fp32_matmul():
            for i0, j0 in tiles:
                i1, j1 = min(n, i0 + bm), min(m, j0 + bn)
                a, b = q[i0:i1], k[j0:j1]
                # float16 values and their products are exact in float32 (CPU has no float16 mm
                # with a float32 output): float32 sums either way, as triton_screen assumes
                c = mm_float32_out(a, b) if a.is_cuda else torch.mm(a.float(), b.float().T)  # [h, w]
                c.add_(hq[i0:i1, None])
                c.add_(hk[None, j0:j1])
                hit = c >= 0
                if self_mode and col_base + j0 <= row_base + i1 - 1:  # the diagonal crosses
                    g_m = torch.arange(row_base + i0, row_base + i1, device=dev)
                    g_n = torch.arange(col_base + j0, col_base + j1, device=dev)
                    hit &= g_n[None, :] > g_m[:, None]
                flat = _hit_positions(hit.view(-1), min(cap, tile_hits, hit.numel()))
                rank = torch.arange(flat.numel(), device=dev)
                got = hit.sum()
                worst = torch.maximum(worst, got)
                slot = count + rank
                slot = torch.where((rank < got) & (slot < cap), slot, cap)
                w = j1 - j0
                out[0].scatter_(0, slot, flat // w + (row_base + i0))
                out[1].scatter_(0, slot, flat % w + (col_base + j0))
                count += got
                if overlap is not None:
                    overlap()
                    overlap = None
        found, most = torch.stack([count, worst]).tolist()  # the step's one wait for the device
        if found > max_pairs:
            raise TooManyPairsError(
                f"{found} candidate pairs within the threshold among {n} x {m} rows (limit {max_pairs}): "
                "is one image copied thousands of times? Lower the threshold or remove the copies first"
            )
        if found <= cap and most <= tile_hits:
            return out[:, :found].T
        cap, tile_hits = max(cap, found), max(tile_hits, most)


def _hit_positions(flat, size: int):
    """Flat positions of the true entries of `flat` (the first `size`, then -1 padding), without a
    host sync where torch has `nonzero_static` for the device; else `nonzero` (syncs)."""
    import torch

    if not _NO_STATIC:
        try:
            return torch.nonzero_static(flat, size=size, fill_value=-1).view(-1)
        except (AttributeError, NotImplementedError, RuntimeError):
            _NO_STATIC.append(True)
    return torch.nonzero(flat).view(-1)[:size]

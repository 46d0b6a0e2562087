"""The `torch-cuda` backend: the float16 recipe of `match.screen.torch_screen` on CUDA, streamed in steps
that fit a device-memory budget, then the exact re-check.

The screen of one step holds its query rows and key rows on the device in float32 plus the key
rows' float16 operand, so the rows are planned like the Triton path (`match.triton.plan_steps`):
when everything fits, one step over the whole problem; otherwise chunks of rows, each query chunk
against itself (self mode) and against every later key chunk. Each step is its own screening
problem (its own scale and shifts, a superset of its pairs), so steps need no shared state; the
candidates of all steps are re-checked once, against the float32 rows, as in every backend.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from clipdedup.errors import TooManyPairsError
from clipdedup.match.backends.triton import plan_steps
from clipdedup.match.core import MATCHERS, recheck
from clipdedup.match.screen.torch_screen import RECIPES, full_fp32_matmul, mm_float32_out, torch_screen

BLOCK = 8192
MAX_PAIRS = 1 << 28  # as the Triton kernel's: candidates of one call, int64 (P, 2) on the device
_NO_STATIC: list[bool] = []  # set once torch.nonzero_static has failed (old torch): syncing nonzero


def device_bytes(d: int, recipe: str) -> tuple[int, int]:
    """(bytes per row, bytes per tile) of one step's screen: float32 rows plus the converted
    operand of the key rows; the tile, its mask and the query block at BLOCK x BLOCK."""
    r = RECIPES[recipe]
    size = {"float16": 2, "bfloat16": 2, "float32": 4}[r.dtype]
    width = -(-(d + 2 * r.pieces) // 8) * 8
    return 4 * d + size * width, BLOCK * BLOCK * (4 + 1) + BLOCK * width * size


def pairs_torch_cuda(
    x: np.ndarray,
    y: np.ndarray | None,
    threshold: float,
    *,
    progress: Callable[[int], None] | None = None,
    block_rows: int = BLOCK,
    block_cols: int = BLOCK,
    device: str = "cuda",
    budget: int | None = None,
    recipe: str = "float16",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs within `threshold` (see `find_pairs`): blocked float16 screening on the device.

    Args:
        budget: device bytes for rows and tiles; default 60% of the free device memory (CUDA) or
            unlimited elsewhere (tests run the step logic on CPU with a tiny budget).
        recipe: the `RECIPES` entry (tests on CPU use "float32").
    """
    import torch

    other = x if y is None else y
    self_mode = y is None
    row_bytes, fixed = device_bytes(x.shape[1], recipe)
    if budget is None:
        budget = int(torch.cuda.mem_get_info(device)[0] * 0.6) if device.startswith("cuda") else 1 << 62
    _, steps = plan_steps(x.shape[0], other.shape[0], row_bytes, max(budget - fixed, 0), self_mode)
    cand_i, cand_j = [], []
    for st in steps:
        diagonal = self_mode and st.k0 == st.q0
        i, j = torch_screen(
            x[st.q0 : st.q1],
            None if diagonal else other[st.k0 : st.k1],
            threshold,
            RECIPES[recipe],
            device=device,
            block_rows=block_rows,
            block_cols=block_cols,
            progress=progress,
        )
        cand_i.append(i + st.q0)
        cand_j.append(j + st.k0)
    if not cand_i:
        return recheck(x, other, np.zeros(0, np.int64), np.zeros(0, np.int64), threshold)
    return recheck(x, other, np.concatenate(cand_i), np.concatenate(cand_j), threshold)


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
                flat = _hit_positions(hit.view(-1), min(cap, hit.numel()))
                rank = torch.arange(flat.numel(), device=dev)
                got = hit.sum()
                slot = count + rank
                slot = torch.where((rank < got) & (slot < cap), slot, cap)
                w = j1 - j0
                out[0].scatter_(0, slot, flat // w + (row_base + i0))
                out[1].scatter_(0, slot, flat % w + (col_base + j0))
                count += got
                if overlap is not None:
                    overlap()
                    overlap = None
        found = int(count)  # the step's one wait for the device
        if found > max_pairs:
            raise TooManyPairsError(
                f"{found} candidate pairs within the threshold among {n} x {m} rows (limit {max_pairs}): "
                "is one image copied thousands of times? Lower the threshold or remove the copies first"
            )
        if found <= cap:
            return out[:, :found].T
        cap = found


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


def _cuda_why_not() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


MATCHERS.register(
    "torch-cuda", priority=30, why_not=_cuda_why_not, doc="blocked torch float16 screening on CUDA, streamed"
)(pairs_torch_cuda)

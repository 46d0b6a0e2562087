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

from clipdedup.match.backends.triton import plan_steps
from clipdedup.match.core import MATCHERS, recheck
from clipdedup.match.screen.torch_screen import RECIPES, torch_screen

BLOCK = 8192


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


def _cuda_why_not() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


def pairs_torch_cuda_streamed(
    x: np.ndarray,
    y: np.ndarray | None,
    threshold: float,
    *,
    progress: Callable[[int], None] | None = None,
    **kw: object,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The `torch-cuda` backend: `pairwise_within_torch` over the steps of
    `match.backends.stream` (the query chunk stays on the device across its key chunks, the next
    key chunk is copied while a step is screened, one host sync per step). `pairs_torch_cuda`
    above, the earlier per-step recipe, stays beside it with its tests."""
    from clipdedup.match.backends.stream import pairs_of_arrays

    return pairs_of_arrays(x, y, threshold, backend="torch-cuda", progress=progress, **kw)


MATCHERS.register(
    "torch-cuda", priority=30, why_not=_cuda_why_not, doc="blocked torch float16 screening on CUDA, streamed"
)(pairs_torch_cuda_streamed)

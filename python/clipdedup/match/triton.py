"""The `triton` backend: the fused kernel `clipdedup.match.kernels.pairwise` driven over chunks of rows.

When the rows fit the device's memory budget there is one step: all of x (and y) on the device,
one launch over the upper triangle of tiles. When they do not, x and y stay in host memory and
chunks of rows travel through two pinned staging buffers on a copy stream while the previous chunk
is being screened (`ChunkLoader`, `run_steps`). The planning and the step loop are plain Python
over a loader interface, so the tiling logic runs (and is tested) on CPU tensors with a tiny budget.

Nothing here imports triton or the kernels at start-up; `_triton_why_not` only looks for them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from clipdedup.match.bounds import TINY16, U16, U32, Screen, screen_error
from clipdedup.match.core import MATCHERS, recheck, scaled_problem

BLOCKS = (128, 128, 64)  # BM, BN, BK on a GPU
TARGET_EXP = 7  # scaled row norms in [64, 128): entries and shifts well inside float16 / float32


def triton_screen(dim: int) -> Screen:
    """Error constants of the kernel: float16 operands (subnormals rounded, or flushed), float32
    tensor-core accumulation that may truncate (u_acc = 2 U32), shifts stored in float32 and added
    in two float32 additions."""
    return screen_error(
        dim, u_in=U16, eta_in=TINY16 / 2, u_acc=2 * U32, ftz=True, epilogue_adds=2, u_shift_store=U32
    )


@dataclass(frozen=True)
class Step:
    """Queries [q0, q1) against keys [k0, k1) (global row indices)."""

    q0: int
    q1: int
    k0: int
    k1: int


def plan_steps(n: int, m: int, row_bytes: int, budget: int, self_mode: bool) -> tuple[int, list[Step]]:
    """Splits an (n x m) problem into steps whose device operands fit `budget` bytes.

    One resident query chunk and two key chunks (the one being screened, the next one arriving)
    share the budget; when everything fits there is a single step. In self mode only key chunks at
    or after the query chunk are visited (the kernel drops pairs with col <= row).

    Returns:
        (chunk rows, steps in execution order).
    """
    if n == 0 or m == 0:
        return 0, []
    total = n if self_mode else n + m
    if total * row_bytes <= budget:
        return max(n, m), [Step(0, n, 0, m)]
    chunk = budget // (3 * row_bytes)
    if chunk < 1:
        raise MemoryError(f"a device budget of {budget} bytes holds not even 3 rows of {row_bytes} bytes")
    steps = [
        Step(q0, min(n, q0 + chunk), k0, min(m, k0 + chunk))
        for q0 in range(0, n, chunk)
        for k0 in range(q0 if self_mode else 0, m, chunk)
    ]
    return chunk, steps


class ChunkLoader:
    """Brings row ranges of a host float32 array to the device as scaled, zero-padded float16.

    On CUDA, `start` allocates the float16 chunk and fills it piece by piece: each piece of rows is
    copied by the host into one of two pinned staging buffers, sent on a side stream, and converted
    there; while the device copies one piece the host fills the other buffer. `finish` makes the
    compute stream wait for the last piece. Called while the device screens the previous chunk, the
    whole transfer overlaps that work. Elsewhere (CPU tensors, tests) `start` converts at once.
    """

    def __init__(self, host: np.ndarray, scale: float, width: int, device: str, piece_rows: int = 16384):
        import torch

        self.torch, self.host, self.scale, self.width = torch, host, scale, width
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            rows = max(1, min(piece_rows, host.shape[0]))
            self.piece = rows
            self.staging = [torch.empty((rows, host.shape[1]), pin_memory=True) for _ in range(2)]
            self.free: list = [None, None]  # event: the copy out of that staging buffer is done
            self.copy_stream = torch.cuda.Stream(self.device)
            self.turn = 0

    def _empty(self, rows: int):
        return self.torch.zeros((rows, self.width), dtype=self.torch.float16, device=self.device)

    def start(self, r0: int, r1: int):
        torch = self.torch
        out = self._empty(r1 - r0)
        d = self.host.shape[1]
        if not self.cuda:
            out[:, :d] = torch.from_numpy(self.host[r0:r1]).to(self.device) * self.scale
            return out
        current = torch.cuda.current_stream(self.device)
        self.copy_stream.wait_stream(current)  # `out` is zeroed on the compute stream
        out.record_stream(self.copy_stream)
        for s in range(r0, r1, self.piece):
            e = min(r1, s + self.piece)
            b, self.turn = self.turn, 1 - self.turn
            if self.free[b] is not None:
                self.free[b].synchronize()  # its previous piece has left: it may be overwritten
            stage = self.staging[b][: e - s]
            stage.copy_(torch.from_numpy(self.host[s:e]))
            with torch.cuda.stream(self.copy_stream):
                dev = stage.to(self.device, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self.copy_stream)
                # exact power-of-two scaling, then one rounding to float16
                out[s - r0 : e - r0, :d] = dev * self.scale
            self.free[b] = ev
        done = torch.cuda.Event()
        done.record(self.copy_stream)
        return out, done

    def finish(self, pending):
        if not self.cuda:
            return pending
        out, done = pending
        self.torch.cuda.current_stream(self.device).wait_event(done)
        return out


def run_steps(
    steps: list[Step], load_q: ChunkLoader, load_k: ChunkLoader, self_mode: bool, compute: Callable
) -> Iterator:
    """Runs `compute(q, k, step, overlap)` over the steps, prefetching the next key chunk.

    `compute` launches the screening of one step, calls `overlap()` (which queues the next chunk's
    copy) while the device works, and returns that step's pairs; this yields them step by step.
    """
    q, q_range = None, None
    pending: list = [None, None]  # (handle, (k0, k1)) of the key chunk being copied ahead
    for idx, st in enumerate(steps):
        if q_range != (st.q0, st.q1):
            q, q_range = load_q.finish(load_q.start(st.q0, st.q1)), (st.q0, st.q1)
        if self_mode and (st.k0, st.k1) == q_range:
            k = q  # the diagonal step screens the resident chunk against itself
        elif pending[1] == (st.k0, st.k1):
            k = load_k.finish(pending[0])
        else:
            k = load_k.finish(load_k.start(st.k0, st.k1))
        pending[:] = [None, None]
        nxt = steps[idx + 1] if idx + 1 < len(steps) else None
        # Prefetch only a key chunk of the same query chunk (the diagonal one is the query chunk).
        same_q = nxt is not None and (nxt.q0, nxt.q1) == q_range
        ahead = nxt if nxt is not None and same_q and not (self_mode and nxt.k0 == nxt.q0) else None

        def overlap(ahead=ahead):
            if ahead is not None:
                pending[:] = [load_k.start(ahead.k0, ahead.k1), (ahead.k0, ahead.k1)]

        yield compute(q, k, st, overlap)


def pairs_triton(
    x: np.ndarray,
    y: np.ndarray | None,
    threshold: float,
    *,
    progress: Callable[[int], None] | None = None,
    device: str = "cuda",
    budget: int | None = None,
    blocks: tuple[int, int, int] = BLOCKS,
    cap: int = 1 << 20,
    pairwise: Callable | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs within `threshold` (see `find_pairs`) with the fused kernel, then the exact re-check.

    Args:
        device: "cuda", or "cpu" with TRITON_INTERPRET=1 (tests).
        budget: device bytes for the operands; default 60% of the free device memory (CUDA) or
            unlimited (CPU).
        cap: initial capacity of the candidate buffer of one launch.
        pairwise: the host wrapper to use (default `clipdedup.match.kernels.pairwise.pairwise_within`;
            tests pass an interpreted copy).
    """
    import torch

    if pairwise is None:
        from clipdedup.match.kernels.pairwise import pairwise_within

        pairwise = pairwise_within

    other = x if y is None else y
    self_mode = y is None
    d = x.shape[1]
    width = -(-d // blocks[2]) * blocks[2]
    sp = scaled_problem(x, y, threshold, triton_screen(d), TARGET_EXP)
    if budget is None:
        budget = int(torch.cuda.mem_get_info(device)[0] * 0.6) if device.startswith("cuda") else 1 << 62
    row_bytes = 2 * width  # the float16 operand; staging pieces are a fixed extra
    chunk, steps = plan_steps(x.shape[0], other.shape[0], row_bytes, budget, self_mode)
    hq = torch.from_numpy(sp.alpha.astype(np.float32)).to(device)  # rows of x
    hk = torch.from_numpy(sp.beta.astype(np.float32)).to(device)  # rows of y (x itself in self mode)
    load_q = ChunkLoader(x, sp.scale, width, device)
    load_k = load_q if self_mode else ChunkLoader(other, sp.scale, width, device)

    def compute(q, k, st: Step, overlap):
        out = pairwise(
            q, k, hq[st.q0 : st.q1], hk[st.k0 : st.k1], self_mode=self_mode,
            row_base=st.q0, col_base=st.k0, cap=cap, blocks=blocks, overlap=overlap,
        )  # fmt: skip
        if progress:
            progress(1)
        return out.cpu().numpy()

    with torch.inference_mode():
        found = list(run_steps(steps, load_q, load_k, self_mode, compute))
    cand = np.concatenate(found) if found else np.zeros((0, 2), np.int64)
    return recheck(x, other, cand[:, 0], cand[:, 1], threshold)


def _triton_why_not() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'clip-image-deduper[gpu]')"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


MATCHERS.register("triton", priority=40, why_not=_triton_why_not, doc="fused float16 Triton kernel on CUDA")(
    pairs_triton
)

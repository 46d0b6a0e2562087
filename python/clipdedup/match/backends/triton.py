"""The `triton` backend: the fused kernel `clipdedup.kernels.pairwise` driven over chunks of rows.

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
from typing import Any

import numpy as np

from clipdedup.match.core import MATCHERS, recheck, scaled_problem
from clipdedup.match.screen.bounds import TINY16, U16, U32, Screen, screen_error

BLOCKS = (128, 128, 64)  # BM, BN, BK on a GPU
MIN_CAPABILITY = (8, 0)  # Triton's supported NVIDIA GPUs; the kernel was compiled for sm_80/86/90
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

    On CUDA, `start` allocates and zeroes the float16 chunk on a side (copy) stream and fills it
    piece by piece: each piece of rows is copied by the host into one of two staging buffers
    (page-locked where possible), sent on the copy stream, and converted there; while the device
    copies one piece the host fills the other buffer. Nothing on the copy stream waits for the
    compute stream, so a `start` issued while the device screens the previous chunk overlaps that
    work. `finish` makes the compute stream wait for the last piece and records the chunk as used
    there (it was allocated on the copy stream). Elsewhere (CPU tensors, tests) `start` converts at
    once.

    Args:
        host: float32 (N, D) rows, or a source with `shape` and `read(r0, r1, out)` that writes
            rows r0:r1 into the float32 buffer `out` and returns them (`match.backends.stream`
            reads a row store that way, straight into the staging buffers); on CPU a source is
            read piece by piece through one plain buffer.
        cuda: the `torch.cuda` namespace (default); tests pass a recording stand-in to check the
            stream discipline on CPU tensors.
        log: one-line notices (page-locked memory unavailable).
    """

    def __init__(
        self,
        host: Any,
        scale: float,
        width: int,
        device: str,
        piece_rows: int = 16384,
        *,
        cuda: Any = None,
        log: Callable[[str], None] | None = None,
    ):
        import torch

        from clipdedup.native import empty_pinned

        self.torch, self.host, self.scale, self.width = torch, host, scale, width
        self.device = torch.device(device)
        if cuda is None and self.device.type == "cuda":
            cuda = torch.cuda
        self.cu: Any = cuda
        self.cuda = cuda is not None
        self.piece = max(1, min(piece_rows, host.shape[0]))
        self.plain: np.ndarray | None = None  # the CPU path's buffer for a source (not an array)
        # A page-locked host array (`load_db` on a CUDA machine) is read by the device directly: no
        # staging buffers, no second copy of its rows.
        self.direct = cuda is not None and isinstance(host, np.ndarray) and self._is_pinned(host)
        if cuda is not None:
            rows = self.piece
            self.staging = (
                [] if self.direct else [empty_pinned((rows, host.shape[1]), log=log) for _ in range(2)]
            )
            self.free: list = [None, None]  # event: the copy out of that staging buffer is done
            self.copy_stream = cuda.Stream(self.device)
            self.turn = 0

    def _is_pinned(self, host: np.ndarray) -> bool:
        try:
            return bool(self.torch.from_numpy(host).is_pinned())
        except RuntimeError:  # no CUDA runtime to ask
            return False

    def _empty(self, rows: int):
        return self.torch.zeros((rows, self.width), dtype=self.torch.float16, device=self.device)

    def _rows(self, s: int, e: int, buf: Any) -> np.ndarray:
        """float32 rows s:e of the host rows: a view of an array, or read into `buf` (numpy)."""
        if isinstance(self.host, np.ndarray):
            return self.host[s:e]
        return self.host.read(s, e, buf)

    def start(self, r0: int, r1: int):
        torch = self.torch
        d = self.host.shape[1]
        if not self.cuda:
            out = self._empty(r1 - r0)
            if isinstance(self.host, np.ndarray):
                out[:, :d] = torch.from_numpy(self.host[r0:r1]).to(self.device) * self.scale
                return out
            if self.plain is None:
                self.plain = np.empty((self.piece, d), np.float32)
            for s in range(r0, r1, self.piece):
                e = min(r1, s + self.piece)
                rows = torch.from_numpy(self._rows(s, e, self.plain))
                out[s - r0 : e - r0, :d] = rows.to(self.device) * self.scale
            return out
        cu = self.cu
        with cu.stream(self.copy_stream):
            out = self._empty(r1 - r0)  # allocated and zeroed on the copy stream
            for s in range(r0, r1, self.piece):
                e = min(r1, s + self.piece)
                if self.direct:
                    dev = torch.from_numpy(self.host[s:e]).to(self.device, non_blocking=True)
                    out[s - r0 : e - r0, :d] = dev * self.scale
                    continue
                b, self.turn = self.turn, 1 - self.turn
                if self.free[b] is not None:
                    self.free[b].synchronize()  # its previous piece has left: it may be overwritten
                stage = self.staging[b][: e - s]
                if isinstance(self.host, np.ndarray):
                    stage.copy_(torch.from_numpy(self.host[s:e]))
                else:  # read straight into the (page-locked) staging buffer
                    self._rows(s, e, stage.numpy())
                dev = stage.to(self.device, non_blocking=True)
                ev = cu.Event()
                ev.record(self.copy_stream)
                # exact power-of-two scaling, then one rounding to float16
                out[s - r0 : e - r0, :d] = dev * self.scale
                self.free[b] = ev
            done = cu.Event()
            done.record(self.copy_stream)
        return out, done

    def finish(self, pending):
        if not self.cuda:
            return pending
        out, done = pending
        current = self.cu.current_stream(self.device)
        current.wait_event(done)
        self._record(out, current)
        return out

    def _record(self, t, stream) -> None:
        """Tells the caching allocator that `t` (allocated on the copy stream) is used on `stream`."""
        t.record_stream(stream)


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
    max_grid: int | None = None,
    max_pairs: int | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs within `threshold` (see `find_pairs`) with the fused kernel, then the exact re-check.

    Args:
        device: "cuda", or "cpu" with TRITON_INTERPRET=1 (tests).
        budget: device bytes for the operands; default 60% of the free device memory (CUDA) or
            unlimited (CPU).
        cap: initial capacity of the candidate buffer of one launch.
        pairwise: the host wrapper to use (default `clipdedup.kernels.pairwise.pairwise_within`;
            tests pass an interpreted copy).
        max_grid: programs per kernel launch (default the kernel's `MAX_GRID`; tests force several).
        max_pairs: candidates allowed over the whole run (default the kernel's `MAX_PAIRS`);
            beyond it `TooManyPairsError`.

    Raises:
        TooManyPairsError: more than `max_pairs` candidates (thousands of copies of one image).
        RuntimeError: a launch did not run all of its tiles (never a silently partial answer).
    """
    import torch

    from clipdedup.kernels import pairwise as kmod

    if pairwise is None:
        pairwise = kmod.pairwise_within
    limit = kmod.MAX_PAIRS if max_pairs is None else max_pairs
    launch = {} if max_grid is None else {"max_grid": max_grid}

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
    load_q = ChunkLoader(x, sp.scale, width, device, log=log)
    load_k = load_q if self_mode else ChunkLoader(other, sp.scale, width, device, log=log)
    total = [0]

    def compute(q, k, st: Step, overlap):
        out = pairwise(
            q, k, hq[st.q0 : st.q1], hk[st.k0 : st.k1], self_mode=self_mode,
            row_base=st.q0, col_base=st.k0, cap=cap, blocks=blocks, overlap=overlap,
            max_pairs=limit - total[0], **launch,
        )  # fmt: skip
        total[0] += out.shape[0]
        if progress:
            progress(1)
        return out.cpu().numpy()

    with torch.inference_mode():
        found = list(run_steps(steps, load_q, load_k, self_mode, compute))
    cand = np.concatenate(found) if found else np.zeros((0, 2), np.int64)
    return recheck(x, other, cand[:, 0], cand[:, 1], threshold)


def _triton_why_not() -> str | None:
    import torch

    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'clip-image-deduper[gpu]')"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < MIN_CAPABILITY:
        return (
            f"compute capability {major}.{minor}: Triton supports {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} "
            "and newer (torch-cuda runs instead)"
        )
    return None


MATCHERS.register("triton", priority=40, why_not=_triton_why_not, doc="fused float16 Triton kernel on CUDA")(
    pairs_triton
)

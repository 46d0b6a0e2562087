"""Runs an image model over batches of uint8 images: normalise, forward, L2-normalise.

On CUDA the whole step (normalise -> forward -> L2-normalise) runs at one fixed batch shape captured
in a CUDA graph, so the last, partial batch is padded; host batches are staged through pinned
buffers, and one batch can be in flight while the caller prepares the next (`submit`). The graph
is captured in `fit` on the zero batch, before the caller starts any decoder thread, with
`capture_error_mode="thread_local"`; a batch larger than the fitted shape runs eagerly rather than
capturing again while other threads work. If capture fails (an op that cannot be captured, too
little memory), the runner says so in one log line and runs eagerly.

Every batch's output is checked: rows that are not finite (a float16 overflow) are run again in
float32 (`fp32`, said once); rows still not finite come back as NaN rows, which the caller must
not write. The padding, staging, capture and fallback logic does not depend on CUDA: tests drive
it on CPU with stand-in `capture` functions and a recording stand-in for `torch.cuda`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from clipdedup.ingest.prep import PrepSpec

Step = Callable[[torch.Tensor], torch.Tensor]  # (B, H, W, 3) uint8 -> (B, D) float32
Capture = Callable[[Step, torch.Tensor], Callable[[], torch.Tensor]]


def capture_cuda_graph(step: Step, static_in: torch.Tensor, cuda: Any = None) -> Callable[[], torch.Tensor]:
    """Captures `step(static_in)` in a CUDA graph; returns a replay function giving its output.

    Warm-up runs on a side stream first, as capture requires (cuDNN / cuBLAS pick their kernels).
    "thread_local" capture: only this thread's unsafe calls can break the capture (the default,
    "global", also fails on other threads' allocations). `cuda` stands in for `torch.cuda` in tests.
    """
    cu = torch.cuda if cuda is None else cuda
    side = cu.Stream()
    side.wait_stream(cu.current_stream())
    with cu.stream(side):
        for _ in range(3):
            step(static_in)
    cu.current_stream().wait_stream(side)
    graph = cu.CUDAGraph()
    with cu.graph(graph, capture_error_mode="thread_local"):
        static_out = step(static_in)

    def replay() -> torch.Tensor:
        graph.replay()
        return static_out

    return replay


def capture_eager(step: Step, static_in: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The fixed-shape path without a graph: re-runs `step` on the static buffer (CPU tests)."""
    return lambda: step(static_in)


class Pending:
    """A submitted batch; `result()` waits for it and returns (n, D) float32 (checked rows)."""

    def __init__(
        self,
        out: torch.Tensor,
        n: int,
        event: Any = None,
        check: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        self._out, self._n, self._event, self._check = out, n, event, check

    def result(self) -> np.ndarray:
        if self._event is not None:
            self._event.synchronize()
        vecs = self._out[: self._n].numpy().copy()
        return self._check(vecs) if self._check is not None else vecs


class BatchRunner:
    """Normalise + forward + L2-normalise at a fixed batch size, graph-captured where possible.

    Args:
        forward: the model, (B, 3, H, W) `dtype` on `device` -> (B, D).
        spec: preprocessing (size, mean, std) of the model.
        batch_size: the fixed batch shape (graph / padded mode).
        device: torch device string.
        dtype: model dtype (float32 / float16 / bfloat16).
        fixed_shape: pad every batch to `batch_size` and run through `capture` (default: on CUDA).
        capture: builds the fixed-shape replay; default a CUDA graph.
        channels_last: feed the model NHWC-strided input (helps convolutional stems on CPU).
        log: one-line messages (capture failure, float32 re-runs).
        fp32: builds the model in float32 (called once, on the first non-finite output of a
            lower-precision model); None: non-finite rows are not re-run.
    """

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        spec: PrepSpec,
        *,
        batch_size: int,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        fixed_shape: bool | None = None,
        capture: Capture | None = None,
        channels_last: bool = False,
        log: Callable[[str], None] | None = None,
        fp32: Callable[[], Callable[[torch.Tensor], torch.Tensor]] | None = None,
    ) -> None:
        self.forward, self.spec, self.batch_size = forward, spec, int(batch_size)
        self.device, self.dtype, self.channels_last = torch.device(device), dtype, channels_last
        cuda = self.device.type == "cuda"
        self.fixed_shape = cuda if fixed_shape is None else fixed_shape
        self.capture = capture or (capture_cuda_graph if cuda else capture_eager)
        self.log = log or (lambda line: print(line, file=sys.stderr))
        self.fp32 = fp32
        self._fp32_forward: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.reruns = 0  # rows re-run in float32
        mean = torch.tensor(spec.mean, dtype=torch.float32, device=self.device)
        std = torch.tensor(spec.std, dtype=torch.float32, device=self.device)
        # (x / 255 - mean) / std as one multiply-add per element.
        self._scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1)
        self._shift = (-mean / std).view(1, 3, 1, 1)
        self._replay: Callable[[], torch.Tensor] | None = None
        self._static: torch.Tensor | None = None
        self._graph_failed = False
        self._k = 0  # which of the two staging slots the next batch uses
        self._stage: list[torch.Tensor] = []
        self._out: list[torch.Tensor] = []
        self._events: list[Any] = [None, None]
        self.mode = "eager" if not self.fixed_shape else "not built"  # or "graph", "fixed eager"

    def fit(self, batch_size: int) -> None:
        """Makes `batch_size` the fixed shape and, in fixed-shape mode, builds the buffers and
        captures the graph now, on the zero batch. Call it before starting threads that use the
        device (decoders): capture is then the only device work in flight."""
        if batch_size > 0 and batch_size != self.batch_size:
            self.batch_size, self._static, self._replay = int(batch_size), None, None
            self._events = [None, None]
        if self.fixed_shape and self._replay is None:
            with torch.inference_mode():
                self._make_buffers()  # the replay and the buffers are always dropped together
                self._replay = self._build_replay()

    def step(self, u8: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 on the device -> (B, D) float32, L2-normalised rows."""
        return self._run(u8, self.forward, self.dtype)

    def _run(self, u8: torch.Tensor, forward: Callable, dtype: torch.dtype) -> torch.Tensor:
        b, h, w, _ = u8.shape
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        x = torch.empty((b, 3, h, w), dtype=torch.float32, device=u8.device, memory_format=fmt)
        # One pass from uint8 NHWC to normalised float in the model's layout (a 10x cheaper pass on
        # CPU than converting, normalising and then making it contiguous; same values).
        torch.addcmul(self._shift, u8.permute(0, 3, 1, 2), self._scale, out=x)
        f = forward(x.to(dtype)).float()
        return torch.nn.functional.normalize(f, dim=-1)

    def encode(self, items: Sequence[Any]) -> np.ndarray:
        """(n, D) float32 embeddings of `items` ((H, W, 3) uint8 arrays or device tensors)."""
        out: list[np.ndarray] = []
        prev: Pending | None = None
        for s in range(0, len(items), self.batch_size):
            pending = self.submit(items[s : s + self.batch_size])
            if prev is not None:
                out.append(prev.result())  # at most two batches in flight: two staging slots
            prev = pending
        if prev is not None:
            out.append(prev.result())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def submit(self, items: Sequence[Any]) -> Pending:
        """Starts one batch; `result()` of the return value waits.

        At most two submitted batches may be waiting at a time (two staging slots): call `result()`
        of one before submitting the third. Items may mix numpy arrays and device tensors. A batch
        larger than the fitted shape runs eagerly (no capture while other threads may be working).
        """
        n = len(items)
        if n == 0:
            raise ValueError("submit needs at least one item")
        check = self._checker(items)
        with torch.inference_mode():
            if not self.fixed_shape or (n > self.batch_size and self._replay is not None):
                return Pending(self.step(self._to_device(items)).cpu(), n, check=check)
        if self._replay is None:
            self.fit(max(n, self.batch_size))  # not fitted yet: capture here
        with torch.inference_mode():
            assert self._static is not None and self._replay is not None
            self._fill_static(items)
            out = self._replay()
            k = self._k
            self._k ^= 1
            if self.device.type != "cuda":
                return Pending(out[:n].clone(), n, check=check)
            self._out[k][:n].copy_(out[:n], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            self._events[k] = ev
            return Pending(self._out[k], n, ev, check=check)

    def _checker(self, items: Sequence[Any]) -> Callable[[np.ndarray], np.ndarray]:
        return lambda vecs: self._finite(items, vecs)

    def _finite(self, items: Sequence[Any], vecs: np.ndarray) -> np.ndarray:
        """`vecs` with non-finite rows re-run in float32; rows still not finite are all NaN."""
        bad = ~np.isfinite(vecs).all(axis=1)
        if not bad.any():
            return vecs
        idx = np.flatnonzero(bad)
        if self.fp32 is not None and self.dtype != torch.float32:
            fwd = self._fp32_forward
            if fwd is None:
                self.log(
                    f"clipdedup: the model gave non-finite embeddings in {str(self.dtype).split('.')[-1]}; "
                    "re-running those images in float32"
                )
                fwd = self._fp32_forward = self.fp32()
            with torch.inference_mode():
                u8 = self._to_device([items[int(i)] for i in idx])
                vecs[idx] = self._run(u8, fwd, torch.float32).cpu().numpy()
            self.reruns += idx.size
        vecs[~np.isfinite(vecs).all(axis=1)] = np.nan
        return vecs

    def _to_device(self, items: Sequence[Any]) -> torch.Tensor:
        if not any(isinstance(t, torch.Tensor) for t in items):
            return torch.from_numpy(np.stack(items)).to(self.device)
        return torch.stack(
            [t.to(self.device) if isinstance(t, torch.Tensor) else self._from_host(t) for t in items]
        )

    def _from_host(self, item: Any) -> torch.Tensor:
        return torch.from_numpy(np.array(item, np.uint8)).to(self.device)  # a copy: PIL arrays are read-only

    def _make_buffers(self) -> None:
        from clipdedup.native import empty_pinned

        h, w = self.spec.size
        shape = (self.batch_size, h, w, 3)
        self._static = torch.zeros(shape, dtype=torch.uint8, device=self.device)
        cuda = self.device.type == "cuda"

        def host(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            return empty_pinned(shape, dtype, log=self.log) if cuda else torch.empty(shape, dtype=dtype)

        # Two host slots, so a batch can be staged while the previous one is still copying.
        self._stage = [host(shape, torch.uint8) for _ in range(2)]
        probe = self.step(self._static[:1])
        out_shape = (self.batch_size, int(probe.shape[-1]))
        self._out = [host(out_shape, torch.float32) for _ in range(2)]

    def _fill_static(self, items: Sequence[Any]) -> None:
        """Copies the batch into the static input, item by item: DALI gives device tensors for the
        JPEGs it decoded and PIL numpy arrays for the rest, in one batch."""
        n, static = len(items), self._static
        assert static is not None
        on_host = [i for i, t in enumerate(items) if not isinstance(t, torch.Tensor)]
        if not on_host:
            torch.stack([t.to(self.device) for t in items], out=static[:n])
        if on_host:
            k = self._k
            if self._events[k] is not None:
                self._events[k].synchronize()  # the slot's previous copy has finished
            stage = self._stage[k]
            view = stage.numpy()
            for i in on_host:
                view[i] = items[i]
            # One copy of the first n rows; rows of device items are overwritten just below, in
            # stream order, so the staged rows there (stale) never reach the model.
            static[:n].copy_(stage[:n], non_blocking=True)
            for i, t in enumerate(items):
                if isinstance(t, torch.Tensor):
                    static[i].copy_(t)
        if n < self.batch_size:
            # Padding rows: zeros, never the previous batch's images (their outputs are dropped,
            # but stale rows would make a batch's result depend on the one before it).
            static[n:].zero_()

    def _build_replay(self) -> Callable[[], torch.Tensor]:
        assert self._static is not None
        self._static.zero_()  # capture on the zero batch
        if not self._graph_failed:
            try:
                replay = self.capture(self.step, self._static)
                self.mode = "fixed eager" if self.capture is capture_eager else "graph"
                return replay
            except Exception as e:  # any capture failure: run the same step eagerly
                self._graph_failed = True
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                self.log(f"clipdedup: CUDA graph capture failed ({first}); running the model eagerly")
        self.mode = "fixed eager"
        return capture_eager(self.step, self._static)

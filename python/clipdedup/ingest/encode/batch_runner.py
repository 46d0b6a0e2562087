"""Runs an image model over batches of uint8 images: normalise, forward, L2-normalise.

On CUDA the whole step (normalise -> forward -> L2-normalise) runs at one fixed batch shape captured
in a CUDA graph, so the last, partial batch is padded; host batches are staged through pinned
buffers, and one batch can be in flight while the caller prepares the next (`submit`). If capture
fails (an op that cannot be captured, too little memory), the runner says so in one log line and
runs eagerly. The padding, staging and fallback logic does not depend on CUDA: tests drive it on CPU
with a stand-in `capture` function.
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


def capture_cuda_graph(step: Step, static_in: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Captures `step(static_in)` in a CUDA graph; returns a replay function giving its output.

    Warm-up runs on a side stream first, as capture requires (cuDNN / cuBLAS pick their kernels).
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(static_in)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step(static_in)

    def replay() -> torch.Tensor:
        graph.replay()
        return static_out

    return replay


def capture_eager(step: Step, static_in: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The fixed-shape path without a graph: re-runs `step` on the static buffer (CPU tests)."""
    return lambda: step(static_in)


class Pending:
    """A submitted batch; `result()` waits for it and returns (n, D) float32."""

    def __init__(self, out: torch.Tensor, n: int, event: Any = None) -> None:
        self._out, self._n, self._event = out, n, event

    def result(self) -> np.ndarray:
        if self._event is not None:
            self._event.synchronize()
        return self._out[: self._n].numpy().copy()


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
        log: one-line messages (capture failure).
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
    ) -> None:
        self.forward, self.spec, self.batch_size = forward, spec, int(batch_size)
        self.device, self.dtype, self.channels_last = torch.device(device), dtype, channels_last
        cuda = self.device.type == "cuda"
        self.fixed_shape = cuda if fixed_shape is None else fixed_shape
        self.capture = capture or (capture_cuda_graph if cuda else capture_eager)
        self.log = log or (lambda line: print(line, file=sys.stderr))
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
        """Makes `batch_size` the fixed shape (a batch of 8 is not padded to 32 every time); the
        buffers and the graph are rebuilt on the next submit when it changes."""
        if batch_size > 0 and batch_size != self.batch_size:
            self.batch_size, self._static, self._replay = int(batch_size), None, None
            self._events = [None, None]

    def step(self, u8: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 on the device -> (B, D) float32, L2-normalised rows."""
        b, h, w, _ = u8.shape
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        x = torch.empty((b, 3, h, w), dtype=torch.float32, device=u8.device, memory_format=fmt)
        # One pass from uint8 NHWC to normalised float in the model's layout (a 10x cheaper pass on
        # CPU than converting, normalising and then making it contiguous; same values).
        torch.addcmul(self._shift, u8.permute(0, 3, 1, 2), self._scale, out=x)
        f = self.forward(x.to(self.dtype)).float()
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
        """Starts one batch of at most `batch_size` items; `result()` of the return value waits.

        At most two submitted batches may be waiting at a time (two staging slots): call `result()`
        of one before submitting the third. A batch larger than `batch_size` makes that the new
        fixed shape.
        """
        n = len(items)
        if n == 0:
            raise ValueError("submit needs at least one item")
        if n > self.batch_size:
            self.fit(n)  # a larger batch than the shape captured: grow (capture again on CUDA)
        with torch.inference_mode():
            if not self.fixed_shape:
                return Pending(self.step(self._to_device(items)).cpu(), n)
            self._ensure_buffers(items[0])
            assert self._static is not None
            self._fill_static(items)
            if self._replay is None:
                self._replay = self._build_replay()
            out = self._replay()
            k = self._k
            self._k ^= 1
            if self.device.type != "cuda":
                return Pending(out[:n].clone(), n)
            self._out[k][:n].copy_(out[:n], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            self._events[k] = ev
            return Pending(self._out[k], n, ev)

    def _to_device(self, items: Sequence[Any]) -> torch.Tensor:
        if isinstance(items[0], torch.Tensor):
            return torch.stack([t.to(self.device) for t in items])
        return torch.from_numpy(np.stack(items)).to(self.device)

    def _ensure_buffers(self, first: Any) -> None:
        if self._static is not None:
            return
        h, w = self.spec.size
        shape = (self.batch_size, h, w, 3)
        self._static = torch.zeros(shape, dtype=torch.uint8, device=self.device)
        pin = self.device.type == "cuda"
        # Two host slots, so a batch can be staged while the previous one is still copying.
        self._stage = [torch.empty(shape, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        probe = self.step(self._static[:1])
        dim = int(probe.shape[-1])
        out_shape = (self.batch_size, dim)
        self._out = [torch.empty(out_shape, dtype=torch.float32, pin_memory=pin) for _ in range(2)]

    def _fill_static(self, items: Sequence[Any]) -> None:
        n, static = len(items), self._static
        assert static is not None
        if isinstance(items[0], torch.Tensor):
            torch.stack([t.to(self.device) for t in items], out=static[:n])
        else:
            k = self._k
            if self._events[k] is not None:
                self._events[k].synchronize()  # the slot's previous copy has finished
            stage = self._stage[k]
            np.stack(items, out=stage[:n].numpy())
            static[:n].copy_(stage[:n], non_blocking=True)
        if n < self.batch_size:
            # Padding rows: zeros, never the previous batch's images (their outputs are dropped,
            # but stale rows would make a batch's result depend on the one before it).
            static[n:].zero_()

    def _build_replay(self) -> Callable[[], torch.Tensor]:
        assert self._static is not None
        if not self._graph_failed:
            try:
                replay = self.capture(self.step, self._static)
                self.mode = "graph" if self.capture is capture_cuda_graph else "fixed eager"
                return replay
            except Exception as e:  # any capture failure: run the same step eagerly
                self._graph_failed = True
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                self.log(f"clipdedup: CUDA graph capture failed ({first}); running the model eagerly")
        self.mode = "fixed eager"
        return capture_eager(self.step, self._static)

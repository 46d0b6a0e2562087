"""How the CPU cores are shared between decoder threads and torch while encoding."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class ThreadPlan:
    torch_threads: int  # torch intra-op threads (0: no torch model, torch's own setting is left alone)
    decoders: int  # decoder threads
    prefetch: int  # batches decoded ahead of the encoder (0: decoding and inference take turns)


def thread_plan(device: str, cores: int | None = None, *, torch_model: bool = True) -> ThreadPlan:
    """The split for encoding on `device` with `cores` CPU cores.

    On CUDA, or for an encoder without a torch model (builtin:dct), the CPU only decodes: every
    core decodes, two batches ahead. A CPU model needs the same cores as decoding, so the two take
    turns, each with every core: the next batch is decoded while torch waits, then torch runs on
    all cores while the decoders wait. Running them side by side instead oversubscribes the cores,
    and an OpenMP region waits for its slowest thread, so one preempted torch thread stalls them
    all; giving each a fixed share of the cores idles torch's share while it waits for nothing
    (bench/bench_encode.py measures all three).
    """
    cores = cores or os.cpu_count() or 1
    if not torch_model:  # nothing to ask torch: a run of builtin:dct need not import it
        return ThreadPlan(0, max(1, min(16, cores)), 2)
    import torch

    if torch.device(device).type != "cpu":
        return ThreadPlan(torch.get_num_threads(), max(1, min(16, cores)), 2)
    return ThreadPlan(cores, cores, 0)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Sets torch's intra-op thread count for the block, then restores it (n = 0: leaves it)."""
    if n <= 0:
        yield
        return
    import torch

    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)

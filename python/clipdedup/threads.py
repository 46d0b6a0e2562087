"""How the CPU cores are split between decoder threads and torch while encoding."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


def thread_split(device: str, cores: int | None = None, *, torch_model: bool = True) -> tuple[int, int]:
    """(torch intra-op threads, decoder threads) for encoding on `device` with `cores` CPU cores.

    On CUDA, or for an encoder without a torch model (builtin:dct), every core decodes. On CPU the
    model needs nearly all the time (ViT-B-32: ~40 ms of 2-core compute per image vs ~6 ms to
    decode and resize a draft-mode JPEG), so torch keeps every core and one decoder thread per 4
    cores (at least one) runs beside it; the oversubscription costs less than idling a core
    (bench/bench_encode.py measures the splits).
    """
    import torch

    cores = cores or os.cpu_count() or 1
    if torch.device(device).type != "cpu" or not torch_model:
        return torch.get_num_threads(), max(1, min(16, cores))
    return cores, max(1, cores // 4)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Sets torch's intra-op thread count for the block, then restores it."""
    import torch

    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)

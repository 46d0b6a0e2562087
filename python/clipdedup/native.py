"""The only importer of the compiled clipdedup._native module.

Paths cross into C++ as bytes (os.fsencode), so names that are not valid UTF-8 round-trip. Every
function here fills or returns memory that Python owns; the C++ side releases the GIL while it works.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from clipdedup import _native

ScanOutput = _native.ScanOutput


def default_threads() -> int:
    return max(1, min(16, (os.cpu_count() or 1) * 2))


def npy_dim(path: str | os.PathLike[str]) -> tuple[int | None, str | None]:
    """(D, None) for a valid one-vector float32 .npy file, else (None, reason)."""
    dim, _offset, err = _native.npy_header(os.fsencode(path))
    return dim, err


def read_npy_into(
    paths: Sequence[str | os.PathLike[str]],
    out: np.ndarray,
    threads: int | None = None,
    rows: np.ndarray | None = None,
) -> list[tuple[int, str]]:
    """Reads each one-vector .npy file into its row of `out`.

    Each file must hold dtype '<f4' and shape (D,) (or (1, D)) with D = out.shape[1], and nothing
    after the vector; anything else is a per-file reason, never an exception.

    Args:
        paths: K file paths.
        out: float32 array of shape (M, D), C-contiguous and writable; owned by the caller (a
            numpy array, or the `.numpy()` view of a pinned torch tensor, see `alloc_rows`).
        threads: reader threads; default twice the core count (I/O bound), at most 16.
        rows: int64 (K,) row of `out` for each path; default row k for path k (then M == K).

    Returns:
        (k, reason) for each path k that could not be read; its row is left untouched.
    """
    _check_matrix(out)
    encoded = [os.fsencode(p) for p in paths]
    return list(_native.read_npy_into(encoded, out, threads or default_threads(), rows))


def read_npz_into(
    paths: Sequence[str | os.PathLike[str]],
    out: np.ndarray,
    threads: int | None = None,
    rows: np.ndarray | None = None,
) -> list[tuple[int, str]]:
    """As `read_npy_into`, for the original tool's `.npz` files (array `clip_embedding`, '<f4').

    Stored and deflated members are read natively when the build has zlib (`npz_supported()`);
    every file it cannot read is reported, so the caller can retry it with np.load.
    """
    _check_matrix(out)
    encoded = [os.fsencode(p) for p in paths]
    return list(_native.read_npz_into(encoded, out, threads or default_threads(), rows))


def npz_supported() -> bool:
    """Whether this build reads `.npz` files natively."""
    return bool(_native.npz_supported())


def scan_tree(
    root: bytes,
    suffixes: list[bytes] | None,
    exclude: list[bytes],
    follow_symlinks: bool,
    threads: int,
    cross_devices: bool = False,
    system_devices: Sequence[int] = (),
    progress: np.ndarray | None = None,
) -> ScanOutput:
    """The native walk; use `clipdedup.scan.scan_tree`, which wraps this."""
    return _native.scan_tree(
        root, suffixes, exclude, follow_symlinks, threads, cross_devices, list(system_devices), progress
    )


def construct(cls: type, names: Sequence[str], columns: Sequence[Sequence]) -> list:
    """[cls instances] with attribute names[j] = columns[j][i], built without running __init__.

    Only for plain dataclasses whose __init__ does nothing but set its fields (no __post_init__,
    no __slots__); it is what a frozen dataclass's __init__ does, at a fraction of the cost.
    Reference: `[cls(*row) for row in zip(*columns)]`.
    """
    return _native.construct(cls, list(names), list(columns))


def row_hashes(mat: np.ndarray, threads: int = 1) -> np.ndarray:
    """uint64 (N,) checksum of each row of a float32 (N, D) C-contiguous matrix."""
    _check_matrix(mat, writable=False)
    return _native.row_hashes(mat, threads)


def gather_rows(
    path: str | os.PathLike[str] | int,
    data_offset: int,
    src: np.ndarray,
    dst: np.ndarray,
    expect: np.ndarray,
    out: np.ndarray,
    threads: int | None = None,
) -> tuple[str | None, list[int]]:
    """Reads rows `src[k]` of the float32 matrix stored at `data_offset` of `path` into `out[dst[k]]`.

    Args:
        path: the file, or a descriptor of it open for reading (read with pread only; it stays
            open, and a rename over the path does not change what it reads).
        data_offset: byte offset of row 0 in the file; rows are `out.shape[1]` float32 each.
        src, dst: int64 (K,) row indices in the file and in `out`.
        expect: uint64 (K,) checksum (`row_hashes`) each copied row must have.
        out: float32 (M, D) C-contiguous, writable.
        threads: reader threads; default one per core (the copy from the page cache is
            CPU-bound, unlike opening many small files).

    Returns:
        (fatal, bad): fatal is a reason when the file cannot be opened (nothing was read), else
        None; bad lists the k whose row was short or failed its checksum.
    """
    _check_matrix(out)
    where = path if isinstance(path, int) else os.fsencode(path)
    return _native.gather_rows(where, data_offset, src, dst, expect, out, threads or os.cpu_count() or 1)


@dataclass(frozen=True)
class WarpParams:
    """The shape of a check part and the constants of builtin:dct's check; clipdedup.match.verify.warp_check
    fills it from its own constants, which stay their only spelling."""

    side: int
    margin: int
    chroma: int
    iters: int
    grid: int
    colourless: float
    sd_log: float
    cm_log: float
    mu_log: float
    scale_lim: float
    offset_lim: float
    floor: float
    flat: float
    damp: float


def warp_scores(
    a: np.ndarray, b: np.ndarray, pairs: np.ndarray, params: WarpParams, threads: int | None = None
) -> np.ndarray:
    """Scores of builtin:dct's check (`clipdedup.match.verify.warp_check.warp_score_ref`, float64 throughout).

    Args:
        a: float32 (N, V) C-contiguous check parts, V = side^2 + 2 chroma^2.
        b: float32 (M, V) C-contiguous (may be `a` itself).
        pairs: int64 (P, 2) rows (i of a, j of b).
        params: the shape and constants of the definition.
        threads: worker threads; default one per core (CPU-bound).

    Returns:
        float64 (P,): the score of each pair, -1 where the gates refuse it.

    Raises:
        ValueError: a matrix, pairs or params of the wrong shape; IndexError: a row out of range.
    """
    _check_matrix(a, writable=False)
    _check_matrix(b, writable=False)
    pairs = np.ascontiguousarray(pairs, np.int64)
    if pairs.size == 0:
        pairs = pairs.reshape(0, 2)
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must be (P, 2), got shape {pairs.shape}")
    out = np.full(len(pairs), np.nan)
    _native.warp_scores(a, b, pairs, out, **asdict(params), threads=threads or os.cpu_count() or 1)
    return out


def _check_matrix(a: np.ndarray, writable: bool = True) -> None:
    if (
        a.dtype != np.float32
        or a.ndim != 2
        or not a.flags.c_contiguous
        or (writable and not a.flags.writeable)
    ):
        raise ValueError("expected a C-contiguous float32 (N, D) array" + (", writable" if writable else ""))


def cuda_present() -> bool:
    """Whether torch sees a CUDA device, without importing torch on a machine with no NVIDIA driver."""
    if "torch" not in sys.modules and not os.path.exists("/proc/driver/nvidia/version"):
        return False
    import torch

    return bool(torch.cuda.is_available())


def alloc_rows(n: int, dim: int, *, pinned: bool | None = None) -> np.ndarray:
    """An uninitialised float32 (n, dim) C-contiguous matrix for the readers to fill.

    Args:
        n, dim: the shape.
        pinned: True: page-locked memory from torch (`pin_memory=True`), so the copy to the GPU
            is a direct DMA; False: a plain numpy array; None: pinned when CUDA is present.

    Returns:
        The array. When pinned it is the `.numpy()` view of the torch tensor, which it keeps alive.
        Note that torch's pinned allocator rounds a block up to a power of two by default.
    """
    if pinned is None:
        pinned = cuda_present()
    if not pinned or n * dim == 0:
        return np.empty((n, dim), np.float32)
    return empty_pinned((n, dim)).numpy()


_said_pageable: list[str] = []


def empty_pinned(
    shape: tuple[int, ...], dtype: Any = None, *, log: Callable[[str], None] | None = None
) -> Any:
    """An uninitialised page-locked torch tensor, or a pageable one when page-locking fails.

    Page-locked memory can run out long before RAM does (limits, and torch's pinned allocator rounds
    each block up to a power of two). The fallback only makes host-to-device copies slower, so it
    is said once per process (on stderr, or to `log`) and the run goes on.
    """
    import torch

    dt = torch.float32 if dtype is None else dtype
    try:
        return torch.empty(shape, dtype=dt, pin_memory=True)
    except RuntimeError as e:
        if not _said_pageable:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            _said_pageable.append(first)
            line = f"clipdedup: page-locked host memory unavailable ({first}); using pageable memory"
            (log or (lambda msg: print(msg, file=sys.stderr)))(line)
        return torch.empty(shape, dtype=dt)

"""The screen section of the match cache: each row's screening operands, kept for the next run.

A rerun that matches only new or changed rows still needs every row's screening operands (the
columns every new row is screened against). Building them reads and projects every row of the
store, a pass linear in N that dominates a rerun's match once the collection is large. So a run
that writes the match cache appends its `ScreenRows` (match/screen/store_screen.py): the projection, the
norm bound, and per row the rounded scaled projection, its float64 squared norm and whether the row
is finite. The next run takes the unchanged rows' operands from it and projects only the new or
changed rows with the same projection, which is exact as long as those rows are within the stored
norm bound (else, or on any doubt, the operands are built again from the store: the pairs never
depend on where the operands came from, only the time does).

Section layout (little-endian), after the match cache's body: SECTION_HEAD (with a CRC-32 of
itself), then the projection float32 (k, D) when there is one, finite uint8 [N], squared norms
float64 [N], the rounded columns (N, k) in the recipe's type, and a CRC-32 of everything after the
head. It is read in bounded chunks, scattered straight into the new run's operands.
"""

from __future__ import annotations

import math
import struct
import zlib
from io import BufferedIOBase
from typing import IO, Any

import numpy as np

from clipdedup.db.rowstore import RowStore
from clipdedup.match.core import squared_norms
from clipdedup.match.screen.project import Projection
from clipdedup.match.screen.store_screen import ScreenRows, new_screen_rows

SECTION_MAGIC = b"CDSCREEN"
# magic, recipe name, k, dim, rows, sigma, eps, rx, has projection, head crc
SECTION_HEAD = struct.Struct("<8s16sIIQdddII")
CHUNK = 1 << 15  # rows per streamed chunk: 8 MiB of bfloat16 columns at k = 128


def _itemsize(sr: ScreenRows) -> int:
    return sr.cols.element_size()


def section_size(sr: ScreenRows, dim: int) -> int:
    """Bytes `write_section` writes for `sr` (rows of width `dim`)."""
    n = len(sr.na0)
    proj = 0 if sr.proj is None else 4 * sr.k * dim
    return SECTION_HEAD.size + proj + 9 * n + n * sr.k * _itemsize(sr) + 4


def write_section(f: IO[Any], sr: ScreenRows, dim: int) -> None:
    """Writes `sr` to `f` (see the module docstring)."""
    n = len(sr.na0)
    proj = sr.proj
    head = SECTION_HEAD.pack(
        SECTION_MAGIC,
        sr.recipe_name.encode(),
        sr.k,
        dim,
        n,
        0.0 if proj is None else proj.sigma,
        0.0 if proj is None else proj.eps,
        sr.rx,
        proj is not None,
        0,
    )[:-4]
    f.write(head + struct.pack("<I", zlib.crc32(head)))
    crc = 0
    parts = [] if proj is None else [np.ascontiguousarray(proj.p, "<f4").tobytes()]
    parts += [sr.finite.astype(np.uint8).tobytes(), np.ascontiguousarray(sr.na0, "<f8").tobytes()]
    for part in parts:
        crc = zlib.crc32(part, crc)
        f.write(part)
    import torch

    for s in range(0, n, CHUNK):
        part = sr.cols[s : s + CHUNK, : sr.k].contiguous().view(torch.uint8).numpy().tobytes()
        crc = zlib.crc32(part, crc)
        f.write(part)
    f.write(struct.pack("<I", crc))


class _Reader:
    """Reads a section's parts in order, keeping the running CRC."""

    def __init__(self, f: BufferedIOBase, size: int) -> None:
        self.f, self.left, self.crc = f, size, 0

    def read(self, nbytes: int, buf: bytearray | None = None) -> memoryview:
        if nbytes > self.left:
            raise ValueError("damaged: the screen section is shorter than its head says")
        view = memoryview(bytearray(nbytes) if buf is None else buf)[:nbytes]
        if self.f.readinto(view) != nbytes:
            raise ValueError("damaged: the screen section ends early")
        self.left -= nbytes
        self.crc = zlib.crc32(view, self.crc)
        return view


def read_screen(
    f: BufferedIOBase, size: int, old_of_new: np.ndarray, dim: int, recipe_name: str, k: int
) -> tuple[ScreenRows | None, str]:
    """`ScreenRows` for N = len(old_of_new) rows from the section at `f`'s position (`size` bytes):
    the rows kept from the cache filled, the others left for `project_changed`; or (None, why not).

    Args:
        old_of_new: int64 (N,): each row's row in the cache when it is unchanged there, else -1.
        dim: the rows' width; recipe_name, k: the screen this run uses (a section of another
            recipe or width is not used).
    """
    try:
        return _read(f, size, old_of_new, dim, recipe_name, k)
    except ValueError as e:
        return None, str(e)


def _read(
    f: BufferedIOBase, size: int, old_of_new: np.ndarray, d: int, recipe_name: str, k: int
) -> tuple[ScreenRows | None, str]:
    import torch

    raw = f.read(SECTION_HEAD.size)
    if len(raw) < SECTION_HEAD.size or size < SECTION_HEAD.size + 4:
        return None, "damaged: no screen section head"
    magic, recipe, sk, dim, n_old, sigma, eps, rx, has_proj, head_crc = SECTION_HEAD.unpack(raw)
    if magic != SECTION_MAGIC or zlib.crc32(raw[:-4]) != head_crc:
        return None, "damaged: screen section head"
    if recipe.rstrip(b"\0").decode("ascii", "replace") != recipe_name or sk != min(k, d):
        return None, "its operands are of another screen"
    if dim != d:
        return None, "its operands are of another dim"
    r = _Reader(f, size - SECTION_HEAD.size - 4)
    proj = None
    if has_proj:
        p = np.frombuffer(r.read(4 * sk * dim), "<f4").reshape(sk, dim).copy()
        proj = Projection(p, sigma, eps)
    finite_old = np.frombuffer(r.read(n_old), np.uint8).astype(bool)
    na0_old = np.frombuffer(r.read(8 * n_old), "<f8")
    sr = new_screen_rows(len(old_of_new), recipe_name, sk, proj, rx)
    same = np.flatnonzero(old_of_new >= 0)
    if len(same) and int(old_of_new[same].max()) >= n_old:
        return None, "damaged: rows and operands disagree"
    sr.na0[same] = na0_old[old_of_new[same]]
    sr.finite[same] = finite_old[old_of_new[same]]
    del finite_old, na0_old
    new_of_old = np.full(n_old, -1, np.int64)
    new_of_old[old_of_new[same]] = same
    width = sk * sr.cols.element_size()
    buf = bytearray(min(CHUNK, max(n_old, 1)) * width)
    for s in range(0, n_old, CHUNK):
        e = min(n_old, s + CHUNK)
        chunk = np.frombuffer(r.read((e - s) * width, buf), np.uint8)
        dst = new_of_old[s:e]
        hit = np.flatnonzero(dst >= 0)
        if len(hit):
            cols = torch.from_numpy(chunk.reshape(e - s, width)).view(sr.cols.dtype)
            sr.cols[torch.from_numpy(dst[hit]), :sk] = cols[torch.from_numpy(hit)]
    crc = r.crc
    if r.left or struct.unpack("<I", f.read(4))[0] != crc:
        return None, "damaged: screen section checksum"
    return sr, ""


def project_changed(sr: ScreenRows, store: RowStore, ids: np.ndarray) -> tuple[ScreenRows | None, str]:
    """Fills the rows `ids` (int64) of `sr` from the store with its projection, unless one of them
    is longer than its norm bound (then None, why)."""
    step = CHUNK // 8  # 4096 full rows: 20 MiB at D = 1280
    buf = np.empty((min(len(ids), step), store.dim), np.float32)
    for s in range(0, len(ids), step):
        part = ids[s : s + step]
        blk = store.take(part, buf)
        fin = np.isfinite(blk).all(axis=1)
        if not fin.all():
            blk[~fin] = 0
        top = float(squared_norms(blk).max(initial=0.0))
        if math.sqrt(top) * (1 + 2.0**-20) > sr.rx:
            return None, "a new row is longer than the stored operands' bound"
        sr.fill(part, blk, fin)
    return sr, ""

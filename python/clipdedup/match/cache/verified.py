"""A verified model's matching (builtin:dct) through the match cache: a rerun screens and checks only
the candidates that touch new or changed rows.

The cache keeps every screened candidate (each pair within the screening threshold) with its exact
float64 screening distance and its check score (match/cache/matches.py, `MatchCache.check`). A
rerun reuses the candidates among unchanged rows within its threshold with their scores (a score
depends only on the two rows' check parts, whose bytes the checksums pin), screens the new or
changed rows against all rows (`pairs_of_matrix` on the screening parts) and scores only those new
candidates. The candidates, distances, scores and decisions are `match_verified_store`'s (a test
compares them over random sequences of changes).

The cache's section holds every row's screening part (float32 (N, S): 572 bytes a row for
builtin:dct), so a rerun reads from the store only the new or changed rows, not every full row
(17 KB each). When nothing changed, match/cache/run.py answers from the cache before this module
is reached.
"""

from __future__ import annotations

import struct
import sys
import time
import zlib
from collections.abc import Callable
from io import RawIOBase

import numpy as np
from tqdm import tqdm

from clipdedup.db.rowstore import RowStore
from clipdedup.match.cache.matches import MatchCache, Reuse, cache_path, plan_reuse, read_cache, write_cache
from clipdedup.match.verify.store import score_pairs
from clipdedup.match.verify.verifier import Verified, Verifier
from clipdedup.records import DBMeta


def match_verified_with_cache(
    store: RowStore,
    keys: list[str],
    db_dir: str,
    meta: DBMeta | None,
    threshold: float,
    verifier: Verifier,
    *,
    backend: str | None,
    write: bool = True,
    say: Callable[[str], object] = lambda line: print(line, file=sys.stderr),
    progress: bool = False,
    read: tuple[MatchCache | None, str] | None = None,
) -> tuple[Verified, str]:
    """`match_verified_store(store, threshold, verifier, backend=backend)`'s answer, and how the
    cache was used ("reused ...", "unchanged: ...", "full match (why)").

    Args:
        store: the rows; keys: their image paths (the cache's row identity, with the checksums).
        db_dir: where the cache lives; meta: the DB's model and dim (None: no cache).
        write: write the cache afterwards (never in a dry run).
        say: one line when a cache is there but cannot be used, or cannot be written.
        read: `read_cache(db_dir)`'s answer when the caller has it already.
    """
    reuse, why, section = None, "the DB has no metadata", (0, 0, 0)
    if meta is not None:
        cache, why = read if read is not None else read_cache(db_dir)
        if cache is not None:
            plan = (cache, keys, store.hashes, meta.model_id, meta.dim, threshold, verifier.measure)
            reuse, why = plan_reuse(*plan)
            section = (cache.screen_at, cache.screen_len, len(cache.keys))
        del cache
    if reuse is None and why != "missing":
        say(f"{cache_path(db_dir)}: not used, screening all rows: {why}")
    if reuse is not None and 2 * len(reuse.changed) >= store.n:
        reuse = None  # most rows changed: a full screen is no slower
    t = time.perf_counter()
    xs = None if reuse is None else _parts_of_cache(db_dir, section, reuse, store, verifier.screen_dims)
    kept_parts = xs is not None
    xs = store.to_matrix(verifier.screen_dims) if xs is None else xs
    t_read = time.perf_counter() - t
    pairs, d64, scores, seconds = _screen_and_score(store, xs, reuse, threshold, verifier, backend, progress)
    seconds["screen"] += t_read
    if reuse is not None:
        how = f"reused {len(reuse.pairs)} candidates, screened {len(reuse.changed)} new or changed rows"
        how += (
            f", screening parts of {store.n - len(reuse.changed)} rows from the cache" if kept_parts else ""
        )
    else:
        how = "full match" + (f" ({why})" if why else "")
    if write and meta is not None:
        try:
            c = MatchCache(meta.model_id, meta.dim, threshold, keys, store.hashes, pairs, d64)
            c.check, c.scores = verifier.measure, scores
            write_cache(db_dir, c, screen_parts=xs)
        except OSError as e:
            say(f"{cache_path(db_dir)}: not written: {e.strerror or e}")
    return _verified(pairs, d64, scores, verifier, seconds), how


def _scores(reuse: Reuse) -> np.ndarray:
    return reuse.scores if reuse.scores is not None else np.full(len(reuse.pairs), np.nan)


def _parts_of_cache(
    db_dir: str, section: tuple[int, int, int], reuse: Reuse, store: RowStore, s: int
) -> np.ndarray | None:
    """Every row's screening part (float32 (N, s)): unchanged rows' from the cache's section at
    `section` (offset, length, the cache's rows), the others read from the store; None when the
    section is missing, of another width or damaged (then every row is read from the store).

    The section is read straight into the answer, run by run (its rows keep their order among the
    unchanged rows, as the paths do), checksummed as it goes: no copy of it in between."""
    at, size, n_old = section
    if size != 4 * n_old * s + 4:
        return None
    xs = np.empty((store.n, s), np.float32)
    try:
        with open(cache_path(db_dir), "rb", buffering=0) as f:
            f.seek(at)
            crc = _read_runs(f, xs, reuse.old, n_old, s)
            tail = f.read(4)
    except OSError:
        return None
    if crc is None or len(tail) != 4 or crc != struct.unpack("<I", tail)[0]:
        return None
    if len(reuse.changed):
        xs[reuse.changed] = store.take(reuse.changed)[:, :s]
    return xs


def _read_runs(f: RawIOBase, xs: np.ndarray, old: np.ndarray, n_old: int, s: int) -> int | None:
    """Reads the n_old rows of width s at f's position: row old[i] into xs[i] (old[i] >= 0), the
    rows no one wants into a scratch buffer; returns the CRC-32 of all their bytes, or None when
    the file is short. Rows wanted out of order are read whole first, then copied."""
    dst = np.flatnonzero(old >= 0)
    src = old[dst]
    try:
        if len(src) > 1 and np.any(np.diff(src) <= 0):  # out of order: the whole section, then a copy
            raw = np.empty((n_old, s), np.float32)
            crc = _read_into(f, raw, 0)
            xs[dst] = raw[src]
            return crc
        # runs of rows consecutive both in the section and in xs
        brk = np.flatnonzero((np.diff(src) != 1) | (np.diff(dst) != 1)) + 1
        starts = np.concatenate([[0], brk]).astype(np.int64) if len(src) else np.zeros(0, np.int64)
        ends = np.concatenate([brk, [len(src)]]).astype(np.int64) if len(src) else starts
        scratch = np.empty((max(1, min(n_old, 4096)), s), np.float32)
        crc, pos = 0, 0  # pos: the next section row to read
        for r0, r1 in zip(starts.tolist(), ends.tolist()):
            first = int(src[r0])
            crc, pos = _skip(f, scratch, first, pos, crc)
            crc = _read_into(f, xs[int(dst[r0]) : int(dst[r0]) + (r1 - r0)], crc)
            pos = first + (r1 - r0)
        crc, _ = _skip(f, scratch, n_old, pos, crc)
        return crc
    except EOFError:
        return None


def _skip(f: RawIOBase, scratch: np.ndarray, upto: int, pos: int, crc: int) -> tuple[int, int]:
    """Reads section rows pos:upto that no one wants (for the checksum only)."""
    while pos < upto:
        k = min(upto - pos, len(scratch))
        crc = _read_into(f, scratch[:k], crc)
        pos += k
    return crc, pos


def _read_into(f: RawIOBase, block: np.ndarray, crc: int) -> int:
    """Fills the C-contiguous `block` from f; returns the running CRC-32 with its bytes.

    Raises:
        EOFError: the file ended first.
    """
    view = memoryview(block).cast("B")  # type: ignore[arg-type]
    got = 0
    while got < len(view):
        k = f.readinto(view[got:])
        if not k:
            raise EOFError
        got += k
    return zlib.crc32(view, crc)


def _screen_and_score(
    store: RowStore,
    xs: np.ndarray,
    reuse: Reuse | None,
    threshold: float,
    verifier: Verifier,
    backend: str | None,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float]]:
    """Every candidate (pairs, float64 distances, scores): the reused ones and those screened and
    scored now (the ones touching `reuse.changed`; all of them without `reuse`)."""
    from clipdedup.match.cache.incremental import pairs_of_matrix  # imports torch's screens

    t = time.perf_counter()
    rows = None if reuse is None else reuse.changed
    bar = tqdm(desc=f"match ({backend or 'auto'})", unit="tile", disable=not progress, file=sys.stderr)
    if rows is not None and len(rows) == 0:
        pairs, d64 = np.zeros((0, 2), np.int64), np.zeros(0, np.float64)
    else:
        pairs, d64 = pairs_of_matrix(xs, rows, threshold, backend, bar.update)
    bar.close()
    t1 = time.perf_counter()
    scores = score_pairs(store, pairs, verifier)
    if reuse is not None:
        old = _scores(reuse).copy()
        again = np.flatnonzero(np.isnan(old))
        if len(again):
            old[again] = score_pairs(store, reuse.pairs[again], verifier)
        both = np.concatenate([reuse.pairs.reshape(-1, 2), pairs])
        order = np.lexsort((both[:, 1], both[:, 0]))
        pairs = both[order]
        d64 = np.concatenate([reuse.dist, d64])[order]
        scores = np.concatenate([old, scores])[order]
    return pairs, d64, scores, {"screen": t1 - t, "verify": time.perf_counter() - t1}


def _verified(
    pairs: np.ndarray, d64: np.ndarray, scores: np.ndarray, verifier: Verifier, seconds: dict[str, float]
) -> Verified:
    ms = verifier.min_score
    return Verified(pairs, d64.astype(np.float32), scores, scores >= ms, ms, verifier.measure, seconds)

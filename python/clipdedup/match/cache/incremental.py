"""A run's matching: the row store's pairs, through the DB's match cache when it can be reused.

`match_with_cache` reads `clipdedup-matches.bin` (match/cache/matches.py), reuses its pairs among unchanged
rows, matches only the new or changed rows against all rows (`find_pairs_store(rows=...)`, or
`find_pairs` on the matrix for the reference), and writes the cache again unless told not to. The
GPU backends stream the store's rows to the device (`match.backends.stream`). The CPU row-store
backends also take the unchanged rows' screening operands from the cache
(match/cache/screen.py) and write them back. The pairs and distances are those of a full
`find_pairs`.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from clipdedup.db.rowstore import RowStore
from clipdedup.match import find_pairs
from clipdedup.match.backends import stream
from clipdedup.match.cache.matches import (
    MatchCache,
    cache_path,
    merge_pairs,
    plan_reuse,
    read_cache,
    write_cache,
)
from clipdedup.match.cache.screen import project_changed, read_screen
from clipdedup.match.core import recheck
from clipdedup.match.screen.project import PROJECT_DIM
from clipdedup.match.screen.store_screen import ScreenRows, finish_screen, screen_rows
from clipdedup.match.store import find_pairs_store, tile_count
from clipdedup.records import DBMeta

# Backends whose screen runs on a row store (match/store.py), and the recipe each uses there.
STORE_RECIPES = {"cpu-bf16": "bfloat16", "cpu-int16": "int16", "cpu-fp32": "float32"}


@dataclass
class Matched:
    """pairs int64 (P, 2) sorted, i < j; dist float32 (P,); how the cache was used; the seconds
    spent matching (reading the cache included, writing it not)."""

    pairs: np.ndarray
    dist: np.ndarray
    how: str
    seconds: float = 0.0


def match_with_cache(
    store: RowStore,
    keys: list[str],
    db_dir: str,
    meta: DBMeta | None,
    threshold: float,
    *,
    backend: str,
    write: bool = True,
    say: Callable[[str], object] = lambda line: print(line, file=sys.stderr),
    progress: bool = False,
    read: tuple[MatchCache | None, str] | None = None,
) -> Matched:
    """All pairs of the store's rows within `threshold`, as `find_pairs` with `backend` gives them.

    Args:
        store: the rows; keys: their image paths (the cache's row identity, with the checksums).
        db_dir: where the cache lives; meta: the DB's model and dim (None: no cache).
        write: write the cache afterwards (never in a dry run).
        say: one line when a cache is there but cannot be used, or cannot be written.
        progress: a progress bar of tiles on stderr.
        read: `read_cache(db_dir)`'s answer when the caller has it already.
    """
    t0 = time.perf_counter()
    reuse, why, section = None, "the DB has no metadata", (0, 0)
    if meta is not None:
        cache, why = read if read is not None else read_cache(db_dir)
        if cache is not None:
            reuse, why = plan_reuse(cache, keys, store.hashes, meta.model_id, meta.dim, threshold)
            section = (cache.screen_at, cache.screen_len)
        del cache
    if reuse is None and why != "missing":
        say(f"{cache_path(db_dir)}: not used, matching all rows: {why}")
    if reuse is not None and 2 * len(reuse.changed) >= store.n:
        reuse = None  # most rows changed: a full match is no slower
    rows = None if reuse is None else reuse.changed
    # GPU backends count steps, planned inside (their number depends on the device's memory)
    total = tile_count(store.n, None if rows is None else len(rows)) if backend in STORE_RECIPES else None
    bar = tqdm(desc=f"match ({backend})", unit="tile", total=total, disable=not progress, file=sys.stderr)
    sr: ScreenRows | None = None
    kept_operands = False
    if backend in STORE_RECIPES:
        recipe = STORE_RECIPES[backend]
        if reuse is not None and section[1]:
            sr, why_not = operands_of_cache(db_dir, section, reuse.old, store, recipe)
            kept_operands = sr is not None
            if sr is None:
                say(f"{cache_path(db_dir)}: screening operands not used, building them: {why_not}")
        sr = sr or screen_rows(store, recipe)
        scr = finish_screen(sr, threshold)
        pairs, d64 = find_pairs_store(
            store, threshold, rows=rows, recipe=recipe, progress=bar.update, screen=scr
        )
        del scr
    elif backend in stream.GPU_STORE_BACKENDS:  # rows stream from the store to the device
        pairs, d64 = stream.find_pairs_store_gpu(
            store, threshold, rows=rows, backend=backend, progress=bar.update, log=say
        )
    else:  # the reference takes the matrix
        pairs, d64 = pairs_of_matrix(store.to_matrix(), rows, threshold, backend, bar.update)
    bar.close()
    if reuse is not None:
        pairs, d64 = merge_pairs(reuse.pairs, reuse.dist, pairs, d64)
        how = f"reused {len(reuse.pairs)} pairs, matched {len(reuse.changed)} new or changed rows"
        if kept_operands:
            how += f", screening operands of {store.n - len(reuse.changed)} rows from the cache"
    else:
        how = "full match" + (f" ({why})" if why else "")
    seconds = time.perf_counter() - t0
    if write and meta is not None:
        try:
            c = MatchCache(meta.model_id, meta.dim, threshold, keys, store.hashes, pairs, d64)
            write_cache(db_dir, c, sr)
        except OSError as e:
            say(f"{cache_path(db_dir)}: not written: {e.strerror or e}")
    return Matched(pairs, d64.astype(np.float32), how, seconds)


def operands_of_cache(
    db_dir: str, section: tuple[int, int], old: np.ndarray, store: RowStore, recipe: str
) -> tuple[ScreenRows | None, str]:
    """The store's screening operands from the cache's screen section at `section` (offset, length),
    unchanged rows (`old` >= 0) read from it, the others projected; or (None, why not)."""
    try:
        with open(cache_path(db_dir), "rb") as f:
            f.seek(section[0])
            sr, why = read_screen(f, section[1], old, store.dim, recipe, PROJECT_DIM)
    except OSError as e:
        return None, f"unreadable: {e.strerror or e}"
    return (None, why) if sr is None else project_changed(sr, store, np.flatnonzero(old < 0))


def pairs_of_matrix(
    x: np.ndarray,
    rows: np.ndarray | None,
    threshold: float,
    backend: str | None,
    progress: Callable[[int], None],
) -> tuple[np.ndarray, np.ndarray]:
    """`find_pairs_store`'s answer from the matrix with any backend: pairs i < j touching `rows`
    (None: all), sorted, with float64 distances (the ones find_pairs rounds to float32)."""
    if rows is None:
        pairs, _ = find_pairs(x, threshold, backend=backend, progress=progress)
    else:
        part, _ = find_pairs(x[rows], threshold, y=x, backend=backend, progress=progress)
        a, b = rows[part[:, 0]], part[:, 1]
        inside = np.zeros(len(x), bool)
        inside[rows] = True
        keep = (a != b) & ((a < b) | ~inside[b])
        pairs = np.stack([np.minimum(a, b)[keep], np.maximum(a, b)[keep]], 1).reshape(-1, 2)
        pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
    _, _, d64 = recheck(x, x, pairs[:, 0], pairs[:, 1], math.inf)
    return pairs, d64

"""A dedup run's matching of its row store through the match cache, for every model.

`match_run` reads the cache once. When nothing changed (every row unchanged and in the cache's
order, and for a verified model every candidate's score kept) the answer is the cache's: no row is
read, no operand built, no backend probed and torch is not imported, which is what makes a rerun
after no change cost little more than its scan. Otherwise it hands over to `match_with_cache`
(pairs within the threshold) or `match_verified_with_cache` (builtin:dct's screened candidates and
their check scores); both match only what touches new or changed rows.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from clipdedup.db.rowstore import RowStore
from clipdedup.match.cache.matches import MatchCache, cache_path, plan_reuse, read_cache
from clipdedup.match.verify.verifier import Verified, Verifier
from clipdedup.records import DBMeta

FROM_CACHE = "match cache"  # the backend named in a run's summary when the cache was the answer


@dataclass
class RunMatch:
    """pairs int64 (P, 2) sorted, i < j; dist float32 (P,): the answer (for a verified model, the
    confirmed candidates); verified: every screened candidate (verified models), else None; how the
    cache was used; the backend's name (FROM_CACHE when none ran); seconds spent matching, and
    before that waiting for torch's import (0 when none was needed)."""

    pairs: np.ndarray
    dist: np.ndarray
    verified: Verified | None
    how: str
    backend: str
    seconds: float
    imported: float = 0.0

    @property
    def timings(self) -> dict[str, float]:
        """The run summary's seconds: "match", and "torch import" when one was waited for."""
        return {"match": self.seconds, **({"torch import": self.imported} if self.imported > 0.01 else {})}


def match_run(
    store: RowStore,
    keys: list[str],
    db_dir: str,
    meta: DBMeta | None,
    threshold: float,
    verifier: Verifier | None,
    *,
    backend: str | None,
    write: bool = True,
    say: Callable[[str], object] = lambda line: print(line, file=sys.stderr),
    progress: bool = False,
) -> RunMatch:
    """The pairs of `store`'s rows within `threshold`, checked by `verifier` when given, as a full
    match with `backend` (None: the best available) gives them (see the module docstring)."""
    t0 = time.perf_counter()
    read = read_cache(db_dir) if meta is not None else (None, "the DB has no metadata")
    same = unchanged(read[0], keys, store, meta, threshold, verifier)
    if same is not None:
        pairs, d64, scores = same
        how = f"unchanged: {len(pairs)} {'candidates' if verifier else 'pairs'} from the cache"
        if verifier is None:
            return RunMatch(pairs, d64.astype(np.float32), None, how, FROM_CACHE, time.perf_counter() - t0)
        ms = verifier.min_score
        seconds = {"screen": time.perf_counter() - t0}
        v = Verified(pairs, d64.astype(np.float32), scores, scores >= ms, ms, verifier.measure, seconds)
        return RunMatch(pairs[v.confirmed], v.distances[v.confirmed], v, how, FROM_CACHE, seconds["screen"])
    t1 = time.perf_counter()
    import torch  # noqa: F401  (seconds, unless a background import finished it: counted apart)

    from clipdedup.match import MATCHERS

    name = MATCHERS.get(backend).name
    imported = time.perf_counter() - t1
    t0 += imported
    kw = dict(backend=name, write=write, say=say, progress=progress, read=read)
    if verifier is None:
        from clipdedup.match.cache.incremental import match_with_cache

        m = match_with_cache(store, keys, db_dir, meta, threshold, **kw)  # type: ignore[arg-type]
        return RunMatch(m.pairs, m.dist, None, m.how, name, m.seconds, imported)
    from clipdedup.match.cache.verified import match_verified_with_cache

    v, how = match_verified_with_cache(store, keys, db_dir, meta, threshold, verifier, **kw)  # type: ignore[arg-type]
    dt = time.perf_counter() - t0
    return RunMatch(v.pairs[v.confirmed], v.distances[v.confirmed], v, how, name, dt, imported)


def unchanged(
    c: MatchCache | None,
    keys: list[str],
    store: RowStore,
    meta: DBMeta | None,
    threshold: float,
    verifier: Verifier | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The cache's answer (pairs, float64 distances, scores or empty) when it describes exactly these
    rows (same keys in the same order, same checksums) for this model, threshold and check; else None."""
    if c is None or meta is None or len(c.keys) != len(keys) or c.keys != keys:
        return None
    check = "" if verifier is None else verifier.measure
    reuse, _ = plan_reuse(c, keys, store.hashes, meta.model_id, meta.dim, threshold, check)
    if reuse is None or not reuse.nothing_changed:
        return None
    scores = reuse.scores if reuse.scores is not None else np.zeros(0, np.float64)
    if verifier is not None and (len(scores) != len(reuse.pairs) or np.isnan(scores).any()):
        return None
    return reuse.pairs, reuse.dist, scores


def import_in_background(module: str) -> threading.Thread:
    """Starts importing `module` on a daemon thread (join it before use): torch takes seconds to
    import, which a run can spend scanning and loading instead."""
    t = threading.Thread(target=importlib.import_module, args=(module,), daemon=True)
    t.start()
    return t


def likely_to_match(db_dir: str, changed: bool) -> bool:
    """Whether a run will match (and so import torch): something changed, or there is no cache to
    answer from. A guess, only for starting the import early; `match_run` is right either way."""
    return changed or not os.path.exists(cache_path(db_dir))

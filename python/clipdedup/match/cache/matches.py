"""The match cache: what a dedup run matched, kept beside its DB so that a rerun matches only news.

`clipdedup-matches.bin` at the DB root holds the rows a run matched (each by its DB key and the
checksum of its embedding bytes, `native.row_hashes`), the model, the dim, the threshold and every
pair within it with its exact float64 distance; for a model whose candidates are verified
(builtin:dct, match/verify/verifier.py) the pairs are the screened candidates, each with its check
score and the name of the measure that gave it. A later run with the same model and dim and a
threshold at most the stored one (`plan_reuse`):

- keeps the stored pairs between rows whose key and checksum are unchanged and whose distance is
  within the new threshold (the distance is the reference's, so this is the reference's answer);
- matches only the new or changed rows against all rows (`match.store.find_pairs_store(rows=...)`);
- drops the pairs of removed rows (their keys are gone).

A row is "unchanged" when its embedding's bytes are, whatever happened to its file, so pairs follow
the data exactly. Anything else (another model or dim, a larger threshold, a damaged or unreadable
file) means a full match, with the reason. Like the snapshot it is a cache: deleting it is always
safe; it is written atomically (temp file, then rename), so a run killed while writing leaves the
old cache or none, never a torn one, and each part is checked (CRC-32) when read.

Layout (little-endian): HEADER, then the body: model id (UTF-8), check measure (UTF-8, empty
without a verifier), row checksums uint64 [N], pair rows int64 i [P], int64 j [P], distances float64
[P], check scores float64 [P] (only with a measure), then the N keys joined by NUL bytes;
then, when the run screened on a row store, the screen section (`screen_len` bytes,
match/cache/screen.py): every row's screening operands, so that a rerun projects only its new rows.
"""

from __future__ import annotations

import itertools
import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from clipdedup.match.cache.screen import section_size, write_section
from clipdedup.match.screen.store_screen import ScreenRows
from clipdedup.util.fsutil import atomic_file

CACHE_NAME = "clipdedup-matches.bin"
MAGIC = b"CDMATCH\x01"
VERSION = 3  # 3: check measure and scores (builtin:dct's candidates)
# magic, version, dim, rows, pairs, threshold, model_len, check_len, body_len, screen_len, body_crc,
# header_crc
HEADER = struct.Struct("<8sIIQQdIIQQII")


@dataclass
class MatchCache:
    """One run's matching: rows (keys, checksums), model, dim, threshold and pairs.

    Attributes:
        keys: N DB keys (image paths relative to the image dir), in row order.
        hashes: uint64 (N,) checksums of the rows' float32 bytes.
        pairs: int64 (P, 2), i < j, every pair within `threshold`; dist: float64 (P,) exact distances.
        screen_at, screen_len: where the screen section lies in the file (0, 0: none).
        check: the verifier's measure the scores come from ("": none, pairs within the threshold
            are the answer); scores: float64 (P,) each candidate's check score, or None.
    """

    model: str
    dim: int
    threshold: float
    keys: list[str]
    hashes: np.ndarray
    pairs: np.ndarray
    dist: np.ndarray
    screen_at: int = 0
    screen_len: int = 0
    check: str = ""
    scores: np.ndarray | None = None


def cache_path(db_dir: str | os.PathLike[str]) -> str:
    return os.path.join(db_dir, CACHE_NAME)


def write_cache(
    db_dir: str | os.PathLike[str],
    c: MatchCache,
    screen: ScreenRows | None = None,
    screen_parts: np.ndarray | None = None,
) -> None:
    """Writes the cache atomically (temp file in the DB root, then a rename), with the rows'
    screening operands when given (rows in the same order as `c.keys`), or for a verified model
    the rows' screening parts (float32 (N, S), match/cache/verified.py) as the section."""
    n, p = len(c.keys), len(c.pairs)
    model, check = c.model.encode(), c.check.encode()
    pairs = np.ascontiguousarray(c.pairs, "<i8").reshape(p, 2)
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))  # sorted by (i, j), as `check_values` wants
    pairs, dist = pairs[order], np.asarray(c.dist)[order]
    scores = [np.ascontiguousarray(np.asarray(c.scores)[order], "<f8").reshape(p).tobytes()] if check else []
    parts = [
        model,
        check,
        np.ascontiguousarray(c.hashes, "<u8").tobytes(),
        np.ascontiguousarray(pairs[:, 0]).tobytes(),
        np.ascontiguousarray(pairs[:, 1]).tobytes(),
        np.ascontiguousarray(dist, "<f8").tobytes(),
        *scores,
        os.fsencode("\0".join(c.keys)),
    ]
    crc, size = 0, 0
    for part in parts:
        crc, size = zlib.crc32(part, crc), size + len(part)
    screen_len = 0 if screen is None else section_size(screen, c.dim)
    if screen_parts is not None:  # written from the array itself: no copy of it (N * 572 bytes for dct)
        raw = memoryview(np.ascontiguousarray(screen_parts, "<f4")).cast("B")  # type: ignore[arg-type]
        screen_len = len(raw) + 4
    head = HEADER.pack(
        MAGIC, VERSION, c.dim, n, p, c.threshold, len(model), len(check), size, screen_len, crc, 0
    )
    head = head[:-4]
    head += struct.pack("<I", zlib.crc32(head))
    with atomic_file(cache_path(db_dir)) as f:
        f.write(head)
        for part in parts:
            f.write(part)
        if screen is not None:
            write_section(f, screen, c.dim)
        elif screen_parts is not None:
            f.write(raw)
            f.write(struct.pack("<I", zlib.crc32(raw)))


def read_cache(db_dir: str | os.PathLike[str]) -> tuple[MatchCache | None, str]:
    """The cache at `db_dir`, or (None, why not): "missing", or what is wrong with it."""
    try:
        with open(cache_path(db_dir), "rb") as f:
            head = f.read(HEADER.size)
            old = struct.unpack_from("<I", head, 8)[0] if len(head) >= 12 else VERSION
            if head[:8] == MAGIC and old != VERSION:
                why = f"written in format {old} by another version of clipdedup (this one reads {VERSION})"
                return None, why
            if len(head) < HEADER.size:
                return None, "damaged: shorter than its header"
            magic, version, dim, n, p, threshold, model_len, check_len, size, screen_len, crc, head_crc = (
                HEADER.unpack(head)
            )
            if magic != MAGIC:
                return None, "damaged: not a clipdedup match cache"
            if zlib.crc32(head[:-4]) != head_crc:
                return None, "damaged: header checksum"
            total = HEADER.size + size + screen_len
            per_pair = 24 + (8 if check_len else 0)
            if size < model_len + check_len + 8 * n + per_pair * p or os.fstat(f.fileno()).st_size != total:
                return None, "damaged: size does not match its header"
            body = f.read(size)
    except FileNotFoundError:
        return None, "missing"
    except OSError as e:
        return None, f"unreadable: {e.strerror or e}"
    if len(body) != size or zlib.crc32(body) != crc:
        return None, "damaged: checksum"
    at = model_len + check_len
    hashes = np.frombuffer(body, "<u8", n, at)
    pi = np.frombuffer(body, "<i8", p, at + 8 * n)
    pj = np.frombuffer(body, "<i8", p, at + 8 * n + 8 * p)
    dist = np.frombuffer(body, "<f8", p, at + 8 * n + 16 * p)
    scores = np.frombuffer(body, "<f8", p, at + 8 * n + 24 * p).copy() if check_len else None
    keys = os.fsdecode(body[at + 8 * n + per_pair * p :]).split("\0") if n else []
    if len(keys) != n or (p and (pi.min() < 0 or pj.max() >= n or np.any(pi >= pj))):
        return None, "damaged: rows and pairs disagree"
    model = body[:model_len].decode("utf-8", "replace")
    check = body[model_len:at].decode("utf-8", "replace")
    pairs = np.stack([pi, pj], 1)
    c = MatchCache(
        model, dim, threshold, keys, hashes.copy(), pairs, dist.copy(), HEADER.size + size, screen_len
    )
    c.check, c.scores = check, scores
    why = check_values(c)
    return (None, f"damaged: {why}") if why else (c, "")


def check_values(c: MatchCache) -> str:
    """Why the values of a cache that passed its checksums cannot be what a run wrote ('' if they
    can). A checksum only says the bytes are the ones written; a file forged with fresh checksums
    (or written by a faulty version) must not be believed: a NaN distance would drop its pair."""
    n = len(c.keys)
    if not (np.isfinite(c.threshold) and c.threshold >= 0) or c.dim < 1:
        return f"threshold {c.threshold!r} or dim {c.dim} out of range"
    if len(set(c.keys)) != n:
        return "a row key appears twice"
    i, j, d = c.pairs[:, 0], c.pairs[:, 1], c.dist
    if len(i) and (i.min() < 0 or j.max() >= n or np.any(i >= j)):
        return "a pair's rows are out of range or not i < j"
    if not (np.isfinite(d).all() and np.all(d >= 0) and np.all(d <= c.threshold)):
        return f"a distance is not a number from 0 to its threshold {c.threshold:g}"
    if len(i) > 1 and not np.all((i[1:] > i[:-1]) | ((i[1:] == i[:-1]) & (j[1:] > j[:-1]))):
        return "pairs not sorted by (i, j), or one repeated"
    if c.scores is not None and not (len(c.scores) == len(i) and np.isfinite(c.scores).all()):
        return "a check score is not a number"
    return ""


@dataclass
class Reuse:
    """What a run takes from the cache.

    Attributes:
        changed: int64 sorted ids of the rows to match against all rows (new or changed).
        old: int64 (N,): each row's row in the cache when unchanged there, else -1.
        pairs: int64 (P, 2) i < j, the cached pairs among unchanged rows within the threshold, in
            this run's row ids; dist: float64 (P,).
        scores: float64 (P,) their check scores (a cache with a check measure; NaN: to be scored
            again), else None.
    """

    changed: np.ndarray
    pairs: np.ndarray
    dist: np.ndarray
    old: np.ndarray
    scores: np.ndarray | None = None

    @property
    def nothing_changed(self) -> bool:
        """Every row is unchanged and in the cache's own order: the cache describes this run."""
        return len(self.changed) == 0 and np.array_equal(self.old, np.arange(len(self.old)))


def plan_reuse(
    c: MatchCache,
    keys: list[str],
    hashes: np.ndarray,
    model: str,
    dim: int,
    threshold: float,
    check: str = "",
) -> tuple[Reuse | None, str]:
    """What of `c` this run (rows `keys` with checksums `hashes`) can reuse, or (None, why not).
    `check`: the measure this run verifies candidates with ("": none); the cache must hold scores
    of the same one."""
    if c.model != model:
        return None, f"it was made with model {c.model}, this run uses {model}"
    if c.dim != dim:
        return None, f"it holds dim {c.dim}, the DB dim {dim}"
    if not threshold <= c.threshold:
        return None, f"threshold {threshold:g} is above its {c.threshold:g}"
    if c.check != check:
        return None, f"it holds {_checked(c.check)}, this run needs {_checked(check)}"
    if keys == c.keys:  # nothing added, removed or reordered: the usual rerun
        old = np.arange(len(keys), dtype=np.int64)
    else:
        where = dict(zip(c.keys, range(len(c.keys))))
        old = np.fromiter(map(where.get, keys, itertools.repeat(-1)), np.int64, len(keys))
        del where
    same = old >= 0
    same[same] = c.hashes[old[same]] == np.asarray(hashes, np.uint64)[same]
    new_of_old = np.full(len(c.keys), -1, np.int64)
    new_of_old[old[same]] = np.flatnonzero(same)
    a, b = new_of_old[c.pairs[:, 0]], new_of_old[c.pairs[:, 1]]
    keep = (a >= 0) & (b >= 0) & (c.dist <= threshold)
    a, b, d = a[keep], b[keep], c.dist[keep]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    old[~same] = -1
    scores = None if c.scores is None else c.scores[keep]
    if scores is not None and np.any(a > b):  # a check may be asymmetric: rows now in the other order
        scores[a > b] = np.nan  # are scored again
    return Reuse(np.flatnonzero(~same), np.stack([lo, hi], 1).reshape(-1, 2), d, old, scores), ""


def _checked(measure: str) -> str:
    return f"candidates checked by {measure}" if measure else "unchecked pairs"


def merge_pairs(
    a: np.ndarray, da: np.ndarray, b: np.ndarray, db: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint sets of pairs (int64 (P, 2), float64 (P,)) as one, sorted by (i, j)."""
    pairs = np.concatenate([a.reshape(-1, 2), b.reshape(-1, 2)])
    d = np.concatenate([da, db])
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))
    return pairs[order], d[order]

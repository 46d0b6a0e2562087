"""The match cache (match/cache/matches.py): reruns that match only new or changed rows give a full run's
pairs on random add / change / delete sequences; anything doubtful means a full match with one
line; a SIGKILL while the cache is written leaves runs that are still exact. Each row-store backend
(and so each screen recipe the cache keeps operands of) is tested on every CPU (helpers.use_backend)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from clipdedup import db as dbmod
from clipdedup.match import exact_distances, find_pairs
from clipdedup.match.cache.incremental import STORE_RECIPES
from clipdedup.match.cache.matches import (
    CACHE_NAME,
    MatchCache,
    cache_path,
    check_values,
    plan_reuse,
    read_cache,
    write_cache,
)
from clipdedup.pipeline import RunOptions, run_dedup
from clipdedup.scan import scan_tree
from helpers import best_cpu_backend, use_backend

D = 24
MODEL = "fabricated/rows"


@pytest.fixture(params=sorted(STORE_RECIPES))
def store_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """A backend that screens a row store and keeps its operands in the cache, usable here."""
    return use_backend(monkeypatch, request.param)


class Collection:
    """An image dir of 1-byte images and a DB of their rows, changed at random."""

    def __init__(
        self, root: Path, seed: int, backend: str | None = None, meta: dbmod.DBMeta | None = None
    ) -> None:
        self.img, self.db = root / "img", root / "db"
        self.backend = backend or best_cpu_backend()
        self.rng = np.random.default_rng(seed)
        self.rows: dict[str, np.ndarray] = {}
        self.next = 0
        self.mtime = 1_600_000_000_000_000_000
        self.meta = meta or dbmod.DBMeta(MODEL, D)
        dbmod.write_meta(self.db, self.meta)

    def put(self, rel: str, v: np.ndarray) -> None:
        self.mtime += 1_000_000_000
        p = self.img / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"\xff")
        os.utime(p, ns=(self.mtime, self.mtime))
        dbmod.write_embedding(self.db, rel, v, self.mtime)
        self.rows[rel] = v

    def vector(self) -> np.ndarray:
        """A random row, or a near copy of an existing one (so that pairs come and go)."""
        if self.rows and self.rng.random() < 0.4:
            base = self.rows[list(self.rows)[self.rng.integers(len(self.rows))]]
            return (base + 0.02 * self.rng.standard_normal(len(base))).astype(np.float32)
        return self.rng.standard_normal(self.meta.dim).astype(np.float32)

    def add(self, k: int) -> None:
        for _ in range(k):
            self.put(f"d{self.next % 4}/i{self.next:05d}.jpg", self.vector())
            self.next += 1

    def change(self, k: int) -> None:
        for rel in self.rng.choice(sorted(self.rows), min(k, len(self.rows)), replace=False):
            self.put(str(rel), self.vector())

    def delete(self, k: int) -> None:
        for rel in self.rng.choice(sorted(self.rows), min(k, len(self.rows)), replace=False):
            os.remove(self.img / rel)
            os.remove(dbmod.npy_path(self.db, str(rel)))
            del self.rows[str(rel)]

    def run(
        self, t: float, *, dry_run: bool = False, backend: str | None = None
    ) -> tuple[set, list[str], str]:
        lines: list[str] = []
        backend = backend or self.backend
        opts = RunOptions(skip_update=True, dry_run=dry_run, threshold=t, backend=backend, log=lines.append)
        s = run_dedup(str(self.img), str(self.db), None, opts)
        pairs = {(a, b, d) for g in s.groups for a, b, d in g.distances + g.links}
        return pairs, lines, s.match_cache

    def reference(self, t: float) -> set:
        rels = [e.rel for e in scan_tree(self.img).entries]
        x = np.stack([self.rows[r] for r in rels]) if rels else np.zeros((0, D), np.float32)
        pairs, d = find_pairs(x, t, backend="reference")
        return {(rels[a], rels[b], float(dd)) for (a, b), dd in zip(pairs.tolist(), d.tolist())}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_sequences_equal_full_runs(tmp_path: Path, seed: int, store_backend: str) -> None:
    c = Collection(tmp_path, seed, store_backend)
    c.add(150)
    t = 0.02 * np.sqrt(D) * 1.3
    pairs, _, how = c.run(t)
    assert pairs == c.reference(t) and how.startswith("full match")
    # a pair exactly at the threshold: kept from the cache at t, and dropped from it just under t
    a, b, d = sorted(pairs)[len(pairs) // 2]
    t_edge = float(exact_distances(c.rows[a][None], c.rows[b][None])[0])
    assert t_edge == np.float32(d) or abs(t_edge - d) < 1e-6
    for step in range(5):
        c.add(int(c.rng.integers(0, 8)))
        c.change(int(c.rng.integers(0, 5)))
        c.delete(int(c.rng.integers(0, 5)))
        tt = [t, t, t_edge, np.nextafter(t_edge, 0), t][step]
        got, lines, how = c.run(tt)
        assert got == c.reference(tt), (step, how)
        assert how.startswith(("reused", "unchanged")) and ("operands of" in how or "unchanged" in how), (
            step,
            how,
            lines,
        )
        assert not [line for line in lines if CACHE_NAME in line]
        t = tt if tt <= t else t
    got, lines, how = c.run(t)  # nothing changed: the cache is the answer
    assert got == c.reference(t) and how.startswith("unchanged") and not lines
    assert c.run(t, dry_run=True)[0] == c.reference(t)


def test_doubt_means_a_full_match_with_one_line(tmp_path: Path, store_backend: str) -> None:
    c = Collection(tmp_path, 7, store_backend)
    c.add(60)
    t = 1.5
    c.run(t)
    got, lines, how = c.run(t * 1.1)  # a larger threshold than the cache's
    assert got == c.reference(t * 1.1) and how.startswith("full match")
    assert len([ln for ln in lines if "threshold" in ln and CACHE_NAME in ln]) == 1
    dbmod.write_meta(c.db, dbmod.DBMeta("another/model", D))
    got, lines, how = c.run(t)
    assert got == c.reference(t) and len([ln for ln in lines if "another/model" in ln]) == 1
    dbmod.write_meta(c.db, dbmod.DBMeta(MODEL, D))
    c.run(t)
    raw = bytearray(Path(cache_path(c.db)).read_bytes())
    raw[len(raw) // 2] ^= 0x40
    Path(cache_path(c.db)).write_bytes(bytes(raw))
    c.change(3)
    got, lines, how = c.run(t)
    assert got == c.reference(t) and len([ln for ln in lines if "damaged" in ln]) == 1
    raw = bytearray(Path(cache_path(c.db)).read_bytes())
    raw[8:12] = (1).to_bytes(4, "little")  # a cache of an older format
    Path(cache_path(c.db)).write_bytes(bytes(raw))
    got, lines, how = c.run(t)
    assert got == c.reference(t) and len([ln for ln in lines if "format 1 by another version" in ln]) == 1
    os.remove(cache_path(c.db))  # deleting it is always safe, and says nothing
    got, lines, how = c.run(t)
    assert got == c.reference(t) and not [ln for ln in lines if CACHE_NAME in ln]


@pytest.mark.parametrize("forgery", ["nan", "above", "negative", "index", "twice"])
def test_a_forged_cache_with_fresh_checksums_is_not_believed(tmp_path: Path, forgery: str) -> None:
    """Checksums only prove the bytes are the ones written: the values are checked too (issue #25,
    item 9), so a forged file means a full match with one line, never pairs silently dropped."""
    c = Collection(tmp_path, 5)
    c.add(60)
    t = 1.5
    c.run(t, backend="cpu-fp32")  # cpu-bf16 needs avx512_bf16
    cache, why = read_cache(c.db)
    assert cache is not None and len(cache.pairs) > 2, why
    if forgery == "nan":
        cache.dist[:] = np.nan  # on main: every stored pair dropped, silently
    elif forgery == "above":
        cache.dist[0] = t * 2
    elif forgery == "negative":
        cache.dist[0] = -0.5
    elif forgery == "index":
        cache.pairs[0] = [0, len(cache.keys)]
    else:
        cache.pairs[1] = cache.pairs[0]
    write_cache(c.db, cache)  # fresh checksums
    got, lines, how = c.run(t, backend="cpu-fp32")
    assert got == c.reference(t) and how.startswith("full match"), how
    assert len([ln for ln in lines if CACHE_NAME in ln and "damaged" in ln]) == 1, lines


def test_check_values_wants_sorted_pairs_within_the_threshold() -> None:
    keys, h = ["a", "b", "c"], np.zeros(3, np.uint64)
    good = MatchCache(MODEL, D, 0.5, keys, h, np.array([[0, 1], [0, 2], [1, 2]]), np.array([0.1, 0.5, 0.0]))
    assert check_values(good) == ""
    unsorted = MatchCache(MODEL, D, 0.5, keys, h, np.array([[1, 2], [0, 1]]), np.array([0.1, 0.2]))
    assert "sorted" in check_values(unsorted)
    assert "i < j" in check_values(MatchCache(MODEL, D, 0.5, keys, h, np.array([[1, 0]]), np.array([0.1])))
    none = np.zeros((0, 2), np.int64)
    assert "threshold" in check_values(MatchCache(MODEL, D, np.nan, keys, h, none, np.zeros(0)))


def test_matrix_backends_use_the_cache_too(tmp_path: Path) -> None:
    c = Collection(tmp_path, 11, "reference")
    c.add(80)
    t = 1.4
    c.run(t, backend="reference")
    c.add(5)
    c.delete(3)
    got, _, how = c.run(t, backend="reference")
    assert got == c.reference(t) and how.startswith("reused")


def test_cache_round_trip_and_plan() -> None:
    keys = ["a", "b", "c", "d"]
    h = np.array([1, 2, 3, 4], np.uint64)
    c = MatchCache(MODEL, D, 0.5, keys, h, np.array([[0, 1], [1, 3], [2, 3]]), np.array([0.1, 0.5, 0.3]))
    r, why = plan_reuse(c, ["b", "c", "d", "e"], np.array([2, 9, 4, 5], np.uint64), MODEL, D, 0.5)
    assert not why and r is not None
    assert r.changed.tolist() == [1, 3]  # c changed, e new; a removed
    assert r.pairs.tolist() == [[0, 2]] and r.dist.tolist() == [0.5]  # b-d kept; a-b gone; c-d changed
    r, _ = plan_reuse(c, ["b", "c", "d", "e"], np.array([2, 9, 4, 5], np.uint64), MODEL, D, 0.4)
    assert r is not None and len(r.pairs) == 0  # 0.5 > 0.4


KILLER = """
import sys, numpy as np
from clipdedup.match.cache.matches import cache_path, read_cache, write_cache
from clipdedup.match.cache.screen import read_screen
db, a_dir, b_dir, recipe = sys.argv[1:]

def load(d):
    c = read_cache(d)[0]
    with open(cache_path(d), "rb") as f:
        f.seek(c.screen_at)
        sr, why = read_screen(f, c.screen_len, np.arange(len(c.keys)), c.dim, recipe, 128)
    assert sr is not None, why
    return c, sr

caches = [load(a_dir), load(b_dir)]
print("ready", flush=True)
i = 0
while True:
    write_cache(db, *caches[i % 2])
    i += 1
"""


def test_sigkill_during_the_cache_write_leaves_exact_runs(tmp_path: Path) -> None:
    # The write is the same for every recipe (reading each one's operands back is tested above):
    # the best row-store backend here is enough.
    store_backend = best_cpu_backend()
    assert store_backend in STORE_RECIPES
    c = Collection(tmp_path / "c", 5, store_backend)
    c.add(3000)
    t = 0.02 * np.sqrt(D) * 1.3
    c.run(t)
    older = tmp_path / "older"
    older.mkdir()
    os.replace(cache_path(c.db), cache_path(older))  # the cache of an older state of the DB
    c.add(40)
    c.change(20)
    c.delete(20)
    c.run(t)
    newer = tmp_path / "newer"
    newer.mkdir()
    os.replace(cache_path(c.db), cache_path(newer))
    want = c.reference(t)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    for delay in (0.0, 0.02, 0.05, 0.1, 0.17):
        p = subprocess.Popen(
            [sys.executable, "-c", KILLER, str(c.db), str(newer), str(older), STORE_RECIPES[store_backend]],
            stdout=subprocess.PIPE,
            env=env,
        )
        assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        cache, why = read_cache(c.db)
        assert cache is not None or why == "missing", why  # the old file or the new one, never torn
        got, lines, how = c.run(t, dry_run=True)
        assert got == want, (delay, how)
        assert cache is None or "operands of" in how or how.startswith("unchanged"), (delay, how, lines)
    got, _, _ = c.run(t)  # a run that writes stays exact
    assert got == want
    left = {os.path.join(c.db, f) for f in os.listdir(c.db) if f.endswith(".clipdedup-tmp")}
    assert left <= set(dbmod.index_db(c.db).temp_files)  # the next update's orphan clean-up removes them

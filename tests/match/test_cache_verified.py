"""builtin:dct in the match cache (match/cache/verified.py): reruns that screen and check only the
candidates touching new or changed rows give a full run's candidates, distances, scores and
decisions on random add / change / delete / threshold sequences; a nothing-changed rerun answers
from the cache without importing torch; a cache of another format or check is one line and a full
match; a SIGKILL while the cache is written costs only the cache."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tests.match.test_cache import Collection

from clipdedup import db as dbmod
from clipdedup.ingest.encode.dct import CHECK_DIM, LAYOUT, MODEL_ID, SCREEN_DIM, VERIFIER
from clipdedup.match.cache.matches import CACHE_NAME, cache_path, read_cache, write_cache
from clipdedup.match.verify.verifier import match_verified
from clipdedup.pipeline import RunOptions, run_dedup
from clipdedup.scan import scan_tree

WIDTH = SCREEN_DIM + CHECK_DIM
META = dbmod.DBMeta(MODEL_ID, WIDTH, preprocess={"layout": LAYOUT})
T = 0.9


class DctCollection(Collection):
    """builtin:dct-shaped rows: unit screening parts, near copies whose check parts are near too (so
    that scores spread around the decision)."""

    def vector(self) -> np.ndarray:
        s = SCREEN_DIM
        if self.rows and self.rng.random() < 0.4:
            base = self.rows[list(self.rows)[self.rng.integers(len(self.rows))]]
            v = base + self.rng.uniform(0.01, 0.4) * self.rng.standard_normal(WIDTH)
            v[s:] += self.rng.uniform(0.0, 2.0) * self.rng.standard_normal(WIDTH - s)  # some fail the check
        else:
            v = self.rng.standard_normal(WIDTH)
        v[:s] /= np.linalg.norm(v[:s])
        return v.astype(np.float32)

    def verified(self, t: float, *, dry_run: bool = False) -> tuple[set, list[str], str]:
        lines: list[str] = []
        opts = RunOptions(
            skip_update=True, dry_run=dry_run, threshold=t, backend="cpu-fp32", log=lines.append
        )
        s = run_dedup(str(self.img), str(self.db), None, opts)
        assert s.verification is not None
        got = {(c.a, c.b, c.distance, c.score, c.confirmed) for c in s.verification.candidates}
        groups = {(a, b) for g in s.groups for a, b, _ in g.distances + g.links}
        assert groups == {(a, b) for a, b, _, _, ok in got if ok}
        return got, lines, s.match_cache

    def verified_reference(self, t: float) -> set:
        rels = [e.rel for e in scan_tree(self.img).entries]
        x = np.stack([self.rows[r] for r in rels]) if rels else np.zeros((0, WIDTH), np.float32)
        v = match_verified(x, t, VERIFIER, backend="reference")
        rows = zip(v.pairs.tolist(), v.distances.tolist(), v.scores.tolist(), v.confirmed.tolist())
        return {(rels[a], rels[b], d, sc, ok) for (a, b), d, sc, ok in rows}


@pytest.mark.parametrize("seed", [1, 2])
def test_random_sequences_equal_full_runs(tmp_path: Path, seed: int) -> None:
    c = DctCollection(tmp_path, seed, meta=META)
    c.add(120)
    got, _, how = c.verified(T)
    want = c.verified_reference(T)
    assert got == want and how.startswith("full match")
    assert len(want) > 10 and 0 < sum(ok for *_, ok in want) < len(want)
    t = T
    for step in range(6):
        c.add(int(c.rng.integers(0, 8)))
        c.change(int(c.rng.integers(0, 5)))
        c.delete(int(c.rng.integers(0, 5)))
        tt = [t, t * 0.97, t * 0.97, t * 0.9, t * 0.9, t * 0.9][step]
        got, lines, how = c.verified(tt)
        assert got == c.verified_reference(tt), (step, how)
        assert how.startswith("unchanged") or "parts of" in how, (step, how, lines)
        assert not [line for line in lines if CACHE_NAME in line]
        t = tt
    got, lines, how = c.verified(t)
    assert got == c.verified_reference(t) and how.startswith("unchanged") and not lines
    assert c.verified(t, dry_run=True)[0] == c.verified_reference(t)


def test_doubt_means_a_full_match_with_one_line(tmp_path: Path) -> None:
    c = DctCollection(tmp_path, 7, meta=META)
    c.add(60)
    c.verified(T)
    got, lines, how = c.verified(T * 1.05)  # above the cache's threshold
    assert got == c.verified_reference(T * 1.05) and how.startswith("full match")
    assert len([ln for ln in lines if "threshold" in ln and CACHE_NAME in ln]) == 1
    cache, _ = read_cache(c.db)
    assert cache is not None and cache.scores is not None
    cache.check = "another measure"  # scores of another check are never reused
    write_cache(c.db, cache)
    got, lines, how = c.verified(T)
    assert got == c.verified_reference(T) and len([ln for ln in lines if "another measure" in ln]) == 1
    raw = bytearray(Path(cache_path(c.db)).read_bytes())
    raw[8:12] = (2).to_bytes(4, "little")  # a cache of the format before scores were kept
    Path(cache_path(c.db)).write_bytes(bytes(raw))
    got, lines, how = c.verified(T)
    assert (
        got == c.verified_reference(T)
        and len([ln for ln in lines if "format 2 by another version" in ln]) == 1
    )
    assert how.startswith("full match")


NO_TORCH = """
import sys
from clipdedup.pipeline import RunOptions, run_dedup
s = run_dedup(sys.argv[1], sys.argv[2], None, RunOptions(threshold=float(sys.argv[3])))
print(s.match_cache)
print('torch' in sys.modules, 'open_clip' in sys.modules)
"""


@pytest.mark.parametrize("verified", [True, False])
def test_a_nothing_changed_rerun_does_not_import_torch(tmp_path: Path, verified: bool) -> None:
    """builtin:dct and a CLIP-shaped DB: the rerun's answer comes from the cache, torch unimported."""
    c = DctCollection(tmp_path, 3, meta=META) if verified else Collection(tmp_path, 3)
    c.add(50)
    t = T if verified else 1.5
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [sys.executable, "-c", NO_TORCH, str(c.img), str(c.db), str(t)]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout.splitlines()
    assert first[0].startswith("full match") and first[1] == "True False"
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout.splitlines()
    assert again[0].startswith("unchanged") and again[1] == "False False", again


KILLER = """
import sys
from clipdedup.match.cache.matches import read_cache, write_cache
db, a_dir, b_dir = sys.argv[1:]
caches = [read_cache(a_dir)[0], read_cache(b_dir)[0]]
print("ready", flush=True)
i = 0
while True:
    write_cache(db, caches[i % 2])
    i += 1
"""


def test_sigkill_during_the_cache_write_costs_only_the_cache(tmp_path: Path) -> None:
    c = DctCollection(tmp_path / "c", 5, meta=META)
    c.add(400)
    c.verified(T)
    older = tmp_path / "older"
    older.mkdir()
    os.replace(cache_path(c.db), cache_path(older))
    c.add(20)
    c.change(10)
    c.delete(10)
    c.verified(T)
    newer = tmp_path / "newer"
    newer.mkdir()
    os.replace(cache_path(c.db), cache_path(newer))
    want = c.verified_reference(T)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    for delay in (0.0, 0.01, 0.03, 0.08):
        p = subprocess.Popen(
            [sys.executable, "-c", KILLER, str(c.db), str(newer), str(older)], stdout=subprocess.PIPE, env=env
        )
        assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        cache, why = read_cache(c.db)
        assert cache is not None or why == "missing", why  # the old file or the new one, never torn
        got, _, how = c.verified(T, dry_run=True)
        assert got == want, (delay, how)


@pytest.mark.parametrize("seed", range(6))
def test_screening_parts_read_run_by_run_equal_the_whole_section(tmp_path: Path, seed: int) -> None:
    """`_read_runs` (the cache's screening parts read straight into their rows, run by run) against
    reading the whole section and indexing it: random insertions, deletions and edits (unchanged
    rows keep their order), a shuffled order, empty sides; a short section is refused."""
    import io
    import zlib

    from clipdedup.match.cache.verified import _read_runs

    rng = np.random.default_rng(seed)
    n_old, s = [0, 1, 7, 4097, 9000, 4097][seed], [5, 1, 143, 5, 143, 7][seed]
    section = rng.standard_normal((n_old, s)).astype(np.float32)
    keep = np.flatnonzero(rng.random(n_old) < [0.0, 1.0, 0.5, 0.97, 1.0, 0.5][seed])
    n = len(keep) + int(rng.integers(0, 50))
    old = np.full(n, -1, np.int64)
    at = np.sort(rng.choice(n, len(keep), replace=False))
    old[at] = keep
    if seed == 5 and len(keep) > 1:  # another order: read whole, then copied
        old[at] = rng.permutation(keep)
    raw = section.tobytes()
    xs = np.full((n, s), np.nan, np.float32)
    crc = _read_runs(io.FileIO(_write(tmp_path / "sec", raw), "rb"), xs, old, n_old, s)
    assert crc == zlib.crc32(raw)
    np.testing.assert_array_equal(xs[at], section[old[at]])
    assert np.isnan(xs[old < 0]).all()  # the changed rows are the caller's
    if n_old:
        short = io.FileIO(_write(tmp_path / "short", raw[:-1]), "rb")
        assert _read_runs(short, np.empty((n, s), np.float32), old, n_old, s) is None


def _write(p: Path, data: bytes) -> str:
    p.write_bytes(data)
    return str(p)

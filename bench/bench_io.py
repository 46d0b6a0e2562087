"""DB scan and load: native scanner, native .npy reader and packed snapshot against the original's ways.

Data (generated once under /tmp/clipdedup-bench-io, page cache warm): N random float32 vectors of
D=1280 as a `.npy` mirror DB, the same vectors as the original tool's `.npz` files
(np.savez_compressed, key clip_embedding), and an image tree of N empty `.jpg` files (plus 5% other
files) in the same 500-per-directory layout. N = 100k, or 10k with --quick.

Rows (each checked against the generated vectors / an os.walk listing; every row of a table is
timed in the same number of rounds, interleaved):
- load: the original's approach (`.npz` + multiprocessing.Pool np.load, pool start included), a
  plain `np.load` loop over the `.npy` files, and the native reader (`native.read_npy_into`);
- snapshot: the raw snapshot read, GB/s: into a fresh (pinnable) buffer with `native.gather_rows`,
  and mapped copy-on-write (the CPU path), both checking every row's checksum, against an unchecked
  np.memmap + copy; and the whole `load_db` (scan of the DB dir + snapshot) against `load_db`
  reading every `.npy`;
- scan: os.walk + os.path.getmtime (the original), the Python reference walker, the native scanner;
- rss: peak RSS of a fresh process during `load_db` (with and without snapshot) and during the
  original approach, against 1.2 x the embedding bytes + 100 MB.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from clipdedup import db as dbmod
from clipdedup import native
from clipdedup.db import snapshot
from clipdedup.db.load import SnapshotPrefetch
from clipdedup.scan import scan_tree, scan_tree_ref
from common import Row, interleaved, main

ROOT = Path("/tmp/clipdedup-bench-io")
DIM = 1280
PER_DIR = 500


def _rel(k: int) -> str:
    return f"d{k // (PER_DIR * 100):02d}/s{(k // PER_DIR) % 100:02d}/img_{k:07d}.jpg"


def make_data(n: int) -> Path:
    """The DB, the .npz copies and the image tree for N files; reused when already there."""
    base = ROOT / f"n{n}_d{DIM}"
    if (base / "done").exists():
        return base
    rng = np.random.default_rng(n)
    truth = rng.standard_normal((n, DIM)).astype(np.float32)
    head = dbmod.npy_bytes(np.zeros(DIM, np.float32))[: -DIM * 4]
    for k in range(n):
        rel = _rel(k)
        for sub in ("db", "npz", "images"):
            (base / sub / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / "db" / (rel + ".npy")).write_bytes(head + truth[k].tobytes())
        np.savez_compressed(base / "npz" / (rel + ".npz"), clip_embedding=truth[k])
        (base / "images" / rel).write_bytes(b"")
        if k % 20 == 0:
            (base / "images" / (rel + ".txt")).write_bytes(b"")
    dbmod.write_meta(base / "db", dbmod.DBMeta("bench-random", DIM))
    np.save(base / "truth.npy", truth)
    (base / "done").write_text("ok")
    return base


def _load_npz(path: str) -> np.ndarray:
    with np.load(path) as z:
        return z["clip_embedding"]


def original_load(paths: list[str]) -> np.ndarray:
    """The original tool's load: a process pool np.load-ing every .npz, then np.stack."""
    with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
        vecs = pool.map(_load_npz, paths, chunksize=256)
    return np.stack(vecs)


def npload_loop(paths: list[str]) -> np.ndarray:
    return np.stack([np.load(p) for p in paths])


def native_load(paths: list[str]) -> np.ndarray:
    out = native.alloc_rows(len(paths), DIM, pinned=False)
    if native.read_npy_into(paths, out):
        raise RuntimeError("native reader reported errors")
    return out


def native_npz_load(paths: list[str]) -> np.ndarray:
    out = native.alloc_rows(len(paths), DIM, pinned=False)
    if native.read_npz_into(paths, out):
        raise RuntimeError("native .npz reader reported errors")
    return out


def original_scan(root: str) -> list[tuple[str, float]]:
    """The original tool's walk: os.walk, relpath, os.path.getmtime, image suffix filter."""
    out = []
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            if os.path.splitext(f)[1].lower() in (".jpg", ".jpeg", ".png", ".webp"):
                out.append((os.path.relpath(p, root), os.path.getmtime(p)))
    return out


def _load_rows(n: int, truth: np.ndarray, db: Path, npz: Path, repeat: int) -> list[Row]:
    rels = [_rel(k) for k in range(n)]
    npy_paths = [str(db / (r + ".npy")) for r in rels]
    npz_paths = [str(npz / (r + ".npz")) for r in rels]
    orig, loop, nat = "original: .npz + Pool np.load", "np.load loop (.npy)", "native reader (.npy)"
    todo = {orig: (original_load, npz_paths)}
    if native.npz_supported():
        todo["native reader (.npz)"] = (native_npz_load, npz_paths)
    todo |= {loop: (npload_loop, npy_paths), nat: (native_load, npy_paths)}
    for fn, paths in todo.values():
        fn(paths[: min(n, 2000)])  # warm the page cache and the code paths
    timed = interleaved(
        {impl: (lambda fn=fn, paths=paths: fn(paths)) for impl, (fn, paths) in todo.items()},
        repeat,
        lambda impl, got: np.array_equal(got, truth),
    )
    rows = []
    for impl, tm in timed.items():
        base = None if impl == orig else orig
        rows.append(Row("load", impl, n, tm.seconds, n / tm.seconds, "files/s", tm.ok, base))
    rows.append(
        Row("load", nat + " ", n, timed[nat].seconds, n / timed[nat].seconds, "files/s", timed[nat].ok, loop)
    )
    return rows


def _snapshot_rows(n: int, truth: np.ndarray, db: Path, repeat: int) -> list[Row]:
    """The zero-padded names sort in generation order, so the DB's row order is truth's."""
    gb = truth.nbytes / 1e9
    info = dbmod.LoadInfo()
    dbmod.load_db(db, info=info)
    if info.from_files:  # rows written within the racy window are vouched for by a later load
        time.sleep(snapshot.RACY_NS / 1e9)
        dbmod.load_db(db)
    snap, why = snapshot.read_snapshot(db)
    assert snap is not None and len(snap.keys) == n, why
    idx = np.arange(n, dtype=np.int64)

    def gather() -> np.ndarray:
        out = native.alloc_rows(n, DIM, pinned=False)
        fatal, bad = native.gather_rows(snap.path, snapshot.DATA_OFFSET, idx, idx, snap.hashes, out)
        assert fatal is None and not bad
        return out

    def memmap_copy() -> np.ndarray:
        mm = np.memmap(snap.path, np.float32, "r", snapshot.DATA_OFFSET, (n, DIM))
        out = np.array(mm)
        del mm
        return out

    def mapped() -> np.ndarray:
        pre = SnapshotPrefetch(db, DIM, False)
        got = pre.take(snap.keys)
        assert got is not None and pre.fatal is None and not pre.bad
        return got

    mm = "np.memmap + copy"
    raw = {mm: memmap_copy, "native gather_rows (checked)": gather, "mapped COW + checked": mapped}
    for fn in raw.values():
        fn()
    timed = interleaved(raw, repeat, lambda impl, got: np.array_equal(got, truth))
    rows = [
        Row("snapshot", impl, n, tm.seconds, gb / tm.seconds, "GB/s", tm.ok, None if impl == mm else mm)
        for impl, tm in timed.items()
    ]

    every = "load_db, every .npy"

    def load_every() -> tuple[list[str], np.ndarray, dbmod.LoadInfo]:
        os.replace(snap.path, snap.path + ".off")  # microseconds, beside a load of n files
        try:
            info = dbmod.LoadInfo()
            return (*dbmod.load_db(db, info=info, write_snapshot=False), info)
        finally:
            os.replace(snap.path + ".off", snap.path)

    def load_snap() -> tuple[list[str], np.ndarray, dbmod.LoadInfo]:
        info = dbmod.LoadInfo()
        return (*dbmod.load_db(db, info=info), info)

    def loaded_ok(impl: str, got: tuple[list[str], np.ndarray, dbmod.LoadInfo]) -> bool:
        paths, x, info = got
        ok = paths == [_rel(k) for k in range(n)] and np.array_equal(x, truth)
        return ok and info.from_snapshot == (0 if impl == every else n)

    timed = interleaved({every: load_every, "load_db via snapshot": load_snap}, repeat, loaded_ok)
    for impl, tm in timed.items():
        base = None if impl == every else every
        rows.append(
            Row(
                "snapshot",
                impl,
                n,
                tm.seconds,
                gb / tm.seconds,
                "GB/s",
                tm.ok,
                base,
                {"files/s": n / tm.seconds},
            )
        )
    return rows


def _scan_rows(n: int, images: Path, repeat: int) -> list[Row]:
    """Every walker must list exactly the N generated images; the native scanner's mtimes must
    equal the original's os.walk + getmtime (taken once outside the timing) and its result the
    Python reference walker's."""
    root = str(images)
    orig = "original: os.walk + getmtime"
    images_made = sorted(_rel(k) for k in range(n))  # ASCII names: str order is byte order
    walk = sorted(original_scan(root))
    ref = scan_tree_ref(root)

    def check(impl: str, got) -> bool:
        if impl == orig:
            return [r for r, _ in sorted(got)] == images_made
        listed = [(e.rel, e.mtime_ns) for e in got.entries]
        ok = [r for r, _ in listed] == images_made
        ok = ok and all(abs(ns / 1e9 - m) < 1e-6 for (_, ns), (_, m) in zip(listed, walk))
        return ok and (impl == "Python reference (os.scandir)" or got == ref)

    fns = {
        orig: lambda: original_scan(root),
        "Python reference (os.scandir)": lambda: scan_tree_ref(root),
        "native scanner, 1 thread": lambda: scan_tree(root, threads=1),
        "native scanner": lambda: scan_tree(root, threads=None),
    }
    timed = interleaved(fns, repeat, check)
    return [
        Row(
            "scan",
            impl,
            n,
            tm.seconds,
            n / tm.seconds,
            "files/s",
            tm.ok,
            None if "native" not in impl else orig,
        )
        for impl, tm in timed.items()
    ]


_RSS_CHILD = """
import json, sys, numpy as np
mode, db, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path.insert(0, {bench!r})
import bench_io
from clipdedup import db as dbmod
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
before = rss("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # restart VmHWM: the peak of the load alone
if mode == "original":
    npz = bench_io.ROOT / f"n{{n}}_d{{bench_io.DIM}}" / "npz"
    x = bench_io.original_load([str(npz / (bench_io._rel(k) + ".npz")) for k in range(n)])
else:
    paths, x = dbmod.load_db(db, write_snapshot=False, info=(info := dbmod.LoadInfo()))
    assert (info.from_snapshot == n) == (mode == "snapshot"), info
print(json.dumps({{"before": before, "peak": rss("VmHWM:"), "rows": len(x)}}))
"""


def _rss_rows(n: int, db: Path) -> list[Row]:
    emb = n * DIM * 4
    limit = 1.2 * emb + 100e6
    code = _RSS_CHILD.format(bench=str(Path(__file__).resolve().parent))
    rows = []
    for mode, impl in (
        ("original", "original: .npz + Pool (parent)"),
        ("files", "load_db, every .npy"),
        ("snapshot", "load_db via snapshot"),
    ):
        if mode == "files":
            os.replace(db / snapshot.SNAPSHOT_NAME, db / "snap.off")
        t = time.perf_counter()
        try:
            out = subprocess.run(
                [sys.executable, "-c", code, mode, str(db), str(n)], capture_output=True, text=True
            )
        finally:
            if mode == "files":
                os.replace(db / "snap.off", db / snapshot.SNAPSHOT_NAME)
        t = time.perf_counter() - t
        if out.returncode != 0:
            raise RuntimeError(f"rss child {mode}: {out.stderr.strip().splitlines()[-1]}")
        r = json.loads(out.stdout)
        ok = r["rows"] == n and (mode == "original" or r["peak"] <= limit)
        extra = {
            "peak_MB": r["peak"] / 1e6,
            "before_load_MB": r["before"] / 1e6,
            "embedding_MB": emb / 1e6,
            "limit_MB": limit / 1e6,
        }
        rows.append(
            Row(
                "rss", impl, n, t, r["peak"] / 1e6, "MB peak", None if mode == "original" else ok, None, extra
            )
        )
    return rows


def run(quick: bool) -> list[Row]:
    n = 10_000 if quick else 100_000
    repeat = 2 if quick else 3
    base = make_data(n)
    truth = np.load(base / "truth.npy")
    rows = _scan_rows(n, base / "images", repeat)
    rows += _load_rows(n, truth, base / "db", base / "npz", repeat)
    rows += _snapshot_rows(n, truth, base / "db", repeat)
    rows += _rss_rows(n, base / "db")
    return rows


if __name__ == "__main__":
    t0 = time.perf_counter()
    main(run, __doc__.split("\n")[0])
    print(f"{time.perf_counter() - t0:.1f}s")

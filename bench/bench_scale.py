"""Scale: peak RSS per image and wall time of whole `--skip-update -n` runs against N, today's
design (the (N, D) float32 matrix in memory) beside the row store, and the incremental rerun
(1k images added) against a full match.

A fabricated DB stands in for a real collection: N planted unit rows (D = 1280, 5% near copies, as
in bench_match) in the `.npy` mirror and a 1-byte image per row. `--skip-update` never loads a
model, so each run exercises scan, load, match and the dry-run act. Each run is its own process;
its peak RSS is that child's ru_maxrss (os.wait4), and the per-image figure is the difference
against the same run on 1k images, divided by N - 1k.

Per N: (1) a run that writes the packed snapshot and the match cache (a full match: "full match,
writes cache"); (2) 1k images added, then `--skip-update -n` with the cache ("incremental rerun");
(3) today's design on the same N + 1k images (matrix load + find_pairs + grouping in one process,
"baseline: matrix in RAM"), whose pairs the incremental rerun must equal; (4) `--skip-update -n`
without the cache ("row store, full match"), the figure the memory goal is about.

    python bench/bench_scale.py [--quick] [--json PATH] [--plot PATH] [--sizes 100000,300000] [--data DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import Row, best_cpu_backend, table, write_json  # noqa: E402

SMALL = 1000  # the reference size of the per-image figures
ADDED = 1000  # images added before the incremental rerun
THRESHOLD = 0.1
CLI = [sys.executable, "-c", "from clipdedup.cli import dedup_main; dedup_main()"]


def fabricate(
    root: str, n: int, d: int = 1280, seed: int = 0, per_dir: int = 1000, start: int = 0
) -> tuple[str, str]:
    """An image dir and a DB dir of `n` planted rows numbered from `start` (added to what is there);
    returns (image_dir, db_dir)."""
    from bench_match import planted
    from clipdedup import db as dbmod

    img, dbd = os.path.join(root, "img"), os.path.join(root, "db")
    if start == 0:
        dbmod.write_meta(dbd, dbmod.DBMeta("fabricated/random-rows", d))
    header = dbmod.npy_bytes(np.zeros(d, np.float32))[: -4 * d]
    mtime = 1_600_000_000_000_000_000
    for s in range(start, start + n, 8192):
        x = planted(min(8192, start + n - s), d, seed=seed + s)
        for k in range(x.shape[0]):
            i = s + k
            rel = f"{i // per_dir:05d}/{i:08d}.jpg"
            if i % per_dir == 0 or i == start:
                os.makedirs(os.path.join(img, f"{i // per_dir:05d}"), exist_ok=True)
                os.makedirs(os.path.join(dbd, f"{i // per_dir:05d}"), exist_ok=True)
            p = os.path.join(img, rel)
            with open(p, "wb") as f:
                f.write(b"\xff")
            os.utime(p, ns=(mtime, mtime))
            q = dbmod.npy_path(dbd, rel)
            with open(q, "wb") as f:
                f.write(header + x[k].tobytes())
            os.utime(q, ns=(mtime, mtime))
    return img, dbd


def baseline(image_dir: str, db_dir: str, threshold: float) -> dict:
    """Today's design in this process: scan, the (N, D) matrix (`load_embeddings`), `find_pairs` with
    the best CPU backend this CPU has, grouping; returns the run's summary in the CLI's JSON shape
    (groups with distances)."""
    from clipdedup.ingest.update import load_embeddings, scan_images
    from clipdedup.match import find_pairs
    from clipdedup.trash.group import group_pairs

    t0 = time.perf_counter()
    entries = scan_images(image_dir).entries
    kept, x, _, _ = load_embeddings(db_dir, entries, dim=None, dry_run=True)
    t1 = time.perf_counter()
    backend = best_cpu_backend()
    pairs, d = find_pairs(x, threshold, backend=backend)
    t2 = time.perf_counter()
    groups = group_pairs(len(kept), pairs)
    dist = [[kept[a].rel, kept[b].rel, float(dd)] for (a, b), dd in zip(pairs.tolist(), d.tolist())]
    return {
        "pairs": len(pairs),
        "groups": [{"members": [kept[k].rel for k in g], "distances": []} for g in groups]
        + [{"distances": dist}],
        "seconds": {"load": t1 - t0, "match": t2 - t1},
        "backend": backend,
    }


def pairs_digest(summary: dict) -> str:
    """A digest of every (a, b, distance) of a run's JSON summary (order-free)."""
    rows = sorted(f"{a}\0{b}\0{d!r}" for g in summary["groups"] for a, b, d in g["distances"])
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]


def _child(cmd: list[str]) -> tuple[dict, float, int]:
    """Runs cmd; returns (its JSON stdout, wall seconds, peak RSS in bytes of that child alone)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(HERE).parent / "python"), HERE]))
    t = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL, env=env)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t
        out.seek(0)
        text = out.read().decode()
    if p.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(cmd[:4])} ...: exit {p.returncode}")
    return json.loads(text), wall, usage.ru_maxrss * 1024


def _cli(img: str, db: str, *extra: str) -> list[str]:
    return [*CLI, "-i", img, "-d", db, "--skip-update", "-q", "--json", "-th", str(THRESHOLD), *extra]


def _base_cmd(img: str, db: str) -> list[str]:
    code = f"import json, bench_scale as b; print(json.dumps(b.baseline({img!r}, {db!r}, {THRESHOLD})))"
    return [sys.executable, "-c", code]


def measure(root: str, n: int, log=print, full_store: bool = True) -> dict:
    """Steps (1)-(4) of the module docstring on a fabricated collection of n (+ 1k) images; without
    `full_store`, (1)-(3) only."""
    from clipdedup.match.cache.matches import cache_path

    d = os.path.join(root, str(n))
    img, db = os.path.join(d, "img"), os.path.join(d, "db")
    marker = os.path.join(d, "complete")
    if not os.path.exists(marker):
        shutil.rmtree(d, ignore_errors=True)
        fabricate(d, n)
        Path(marker).touch()
    for stray in (cache_path(db), os.path.join(db, "clipdedup-snapshot.bin")):
        if os.path.exists(stray):
            os.remove(stray)
    added = sorted(Path(img).glob("a*"))  # rows a previous measurement added
    for p in added:
        shutil.rmtree(p)
        shutil.rmtree(os.path.join(db, p.name), ignore_errors=True)
    time.sleep(2.1)  # the snapshot only vouches for files older than its racy window
    out: dict = {"n": n}
    s, wall, rss = _child(_cli(img, db))
    out["full"] = {"wall": wall, "rss": rss, "match": s["seconds"]["match"], "pairs": s["pairs"]}
    log(f"   n={n}: full match (writes cache) {s['seconds']['match']:.1f}s, {s['pairs']} pairs")
    _add_rows(d, n)
    s, wall, rss = _child(_cli(img, db, "-n"))
    out["incremental"] = {"wall": wall, "rss": rss, "match": s["seconds"]["match"], "pairs": s["pairs"]}
    inc_digest = pairs_digest(s)
    log(f"   n={n}: incremental rerun {s['seconds']['match']:.2f}s")
    s, wall, rss = _child(_base_cmd(img, db))
    out["baseline"] = {"wall": wall, "rss": rss, "match": s["seconds"]["match"], "pairs": s["pairs"]}
    out["baseline"]["backend"] = s["backend"]
    out["incremental"]["correct"] = pairs_digest(s) == inc_digest
    log(f"   n={n}: baseline {wall:.1f}s, {rss / 2**20:.0f} MiB")
    if not full_store:
        return out
    os.replace(cache_path(db), cache_path(db) + ".away")
    s, wall, rss = _child(_cli(img, db, "-n"))
    os.replace(cache_path(db) + ".away", cache_path(db))
    out["store"] = {"wall": wall, "rss": rss, "match": s["seconds"]["match"], "pairs": s["pairs"]}
    out["store"]["backend"] = s.get("backend")
    out["store"]["correct"] = pairs_digest(s) == inc_digest
    log(f"   n={n}: row store {wall:.1f}s, {rss / 2**20:.0f} MiB")
    return out


def _add_rows(d: str, n: int) -> None:
    """ADDED new images and rows, in their own top-level dir (a1, a2, ... each run a fresh one)."""
    img = os.path.join(d, "img")
    k = len(list(Path(img).glob("a*"))) + 1
    tmp = os.path.join(d, f"add{k}")
    fabricate(tmp, ADDED, seed=10_000_000 + n + k)
    for sub in ("img", "db"):
        os.replace(os.path.join(tmp, sub, "00000"), os.path.join(d, sub, f"a{k}"))
    shutil.rmtree(tmp)


def rows_of(results: list[dict]) -> list[Row]:
    """Table rows: RSS per image over the 1k run, wall time, the incremental rerun's match."""
    small = next((r for r in results if r["n"] == SMALL), None)
    rows = []
    for r in results:
        n = r["n"] + ADDED
        for key, impl, base in (
            ("baseline", "baseline: matrix in RAM", None),
            ("store", "row store, full match", "baseline: matrix in RAM"),
        ):
            if key not in r:
                continue
            m = r[key]
            per = None
            if small is not None and r["n"] > SMALL:
                per = (m["rss"] - small[key]["rss"]) / (r["n"] - SMALL)
            extra = {"peak_rss_mib": m["rss"] / 2**20, "rss_per_image_bytes": per, "match_s": m["match"]}
            extra["backend"] = m.get("backend")
            correct = m.get("correct")
            rows.append(Row("scale", impl, n, m["wall"], n / m["wall"], "images/s", correct, base, extra))
        inc, full = r["incremental"], r["full"]
        extra = {
            "full_match_s": full["match"],
            "ratio": inc["match"] / full["match"] if full["match"] else None,
        }
        rows.append(
            Row(
                "scale-inc",
                "full match (writes cache)",
                r["n"],
                full["match"],
                r["n"] / full["match"],
                "images/s",
            )
        )
        rows.append(
            Row(
                "scale-inc",
                f"incremental: +{ADDED} images",
                r["n"],
                inc["match"],
                r["n"] / inc["match"],
                "images/s",
                inc["correct"],
                "full match (writes cache)",
                extra,
            )
        )
    return rows


def plot(results: list[dict], path: str) -> str | None:
    """Peak RSS and wall time against N for both designs (log-log)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    ns = [r["n"] + ADDED for r in results]
    for key, label in (("baseline", "baseline: matrix in RAM"), ("store", "row store")):
        if any(key not in r for r in results):
            continue
        a.plot(ns, [r[key]["rss"] / 2**20 for r in results], "o-", label=label)
        b.plot(ns, [r[key]["wall"] for r in results], "o-", label=label)
    b.plot(ns, [r["incremental"]["wall"] for r in results], "s--", label=f"incremental rerun (+{ADDED})")
    for ax, ylabel in ((a, "peak RSS (MiB)"), (b, "wall time of the run (s)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N images")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("clip-image-deduper --skip-update -n, D = 1280 (bench/bench_scale.py)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(quick: bool, sizes: list[int] | None = None, data: str | None = None, log=print) -> list[Row]:
    """bench/run.py's entry: quick measures 2k images only (three runs, no per-image figure); else
    1k, 100k, 300k, and 1M when the disk has room for it (about 13 GB)."""
    if sizes is None:
        sizes = [2000] if quick else [SMALL, 100_000, 300_000]
        if not quick and shutil.disk_usage(data or tempfile.gettempdir()).free > 40 * 2**30:
            sizes.append(1_000_000)
    root = data or tempfile.mkdtemp(prefix="clipdedup-scale-")
    saved = Path(root, "results.json")
    # earlier runs into the same --data dir: kept for the plot (a size measured again replaces them)
    earlier = {r["n"]: r for r in json.loads(saved.read_text())} if data and saved.exists() else {}
    results = []
    try:
        for n in sorted(set(sizes if quick else [SMALL, *sizes])):
            results.append(measure(root, n, log, full_store=not quick))
            merged = {**earlier, **{r["n"]: r for r in results}}
            saved.write_text(json.dumps([merged[k] for k in sorted(merged)], indent=1))
    finally:
        if data is None:
            shutil.rmtree(root, ignore_errors=True)
    global LAST
    LAST = sorted({**earlier, **{r["n"]: r for r in results}}.values(), key=lambda r: r["n"])
    return rows_of(results)


LAST: list[dict] = []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=os.path.join(HERE, "out", "scale.png"))
    ap.add_argument("--sizes", default="", help="comma-separated N (the 1k reference is always run)")
    ap.add_argument(
        "--data",
        default=None,
        help="keep the fabricated collections and results.json here (reused; the plot shows all N there)",
    )
    args = ap.parse_args()
    sizes = [int(v) for v in args.sizes.split(",") if v.strip()] or None
    rows = run(args.quick, sizes, args.data)
    print(table(rows))
    for r in rows:
        if r.extra.get("rss_per_image_bytes") is not None:
            print(
                f"{r.impl} n={r.n}: {r.extra['rss_per_image_bytes']:.0f} bytes/image peak RSS over the 1k run"
            )
        if r.extra.get("ratio") is not None:
            print(f"incremental n={r.n}: match {r.extra['ratio'] * 100:.1f}% of a full match")
    if args.json:
        write_json(rows, args.json)
    if args.plot and plot(LAST, args.plot):
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()

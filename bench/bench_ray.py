"""What Ray adds: the DB update and the matching on a local 2-CPU Ray cluster against the
single-process pipeline, on the same machine, interleaved.

Encode: N synthetic 320x240 JPEGs into a fresh DB with builtin:dct (the cheapest encoder, so the
time is the pipeline's, not the model's), by `update_db` as the CLI runs it, then as `--ray local`
runs it (`update_db(..., encoder=RayCluster.load_encoder(...))` on `ray.init(num_cpus=2)`, started
once and timed apart). Two sizes separate Ray's fixed cost per run (model meta task, node probe, actor
start) from its cost per image: extra['per image ms'] is the slope of (ray - local) seconds over N.
The Ray DB must equal the local DB byte for byte (correct=False otherwise).

Match: N random unit rows (D=256, a tenth near-duplicated) with `find_pairs` against the tiles as
Ray tasks; the pairs must be equal.

Needs the `ray` extra. `python bench/bench_ray.py [--quick] [--json PATH]`.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from clipdedup.cluster import RayCluster
from clipdedup.ingest.update import update_db
from clipdedup.match import find_pairs
from common import Row, main


def make_images(root: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:240, 0:320]
    for k in range(n):
        fx, fy, ph = rng.uniform(0.01, 0.08, 2).tolist() + [rng.uniform(0, 6.28)]
        base = 127 + 100 * np.sin(fx * xx + ph) * np.cos(fy * yy)
        px = np.stack([base, base[::-1], base[:, ::-1]], -1) + rng.normal(0, 8, (240, 320, 3))
        p = root / f"{k // 100:02d}" / f"{k:05d}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(px, 0, 255).astype(np.uint8)).save(p, quality=90)


def _npy(db: Path) -> dict[str, bytes]:
    return {p.relative_to(db).as_posix(): p.read_bytes() for p in sorted(db.rglob("*.npy"))}


def _update(pics: Path, db: Path, cluster: RayCluster | None) -> float:
    """Seconds of one fresh-DB update; on Ray the remote model-meta task is part of it."""
    shutil.rmtree(db, ignore_errors=True)
    t = time.perf_counter()
    enc = cluster.load_encoder("builtin:dct") if cluster else None
    update_db(str(pics), str(db), "builtin:dct", encoder=enc, log=lambda line: None)
    return time.perf_counter() - t


def bench_encode(root: Path, sizes: list[int], repeat: int, cluster: RayCluster) -> list[Row]:
    rows: list[Row] = []
    local_s, ray_s = {}, {}
    for n in sizes:
        pics = root / f"pics{n}"
        make_images(pics, n)
        t_local, t_ray = [], []
        for _ in range(repeat):  # interleaved, so both see the same machine load
            t_local.append(_update(pics, root / "db_local", None))
            t_ray.append(_update(pics, root / "db_ray", cluster))
        same = _npy(root / "db_local") == _npy(root / "db_ray") and len(_npy(root / "db_ray")) == n
        local_s[n], ray_s[n] = min(t_local), min(t_ray)
        rows.append(Row("encode", "single process (update_db)", n, local_s[n], n / local_s[n], "img/s"))
        rows.append(
            Row(
                "encode",
                "ray: 2-CPU local cluster",
                n,
                ray_s[n],
                n / ray_s[n],
                "img/s",
                correct=same,
                baseline="single process (update_db)",
                extra={"ray - local s": ray_s[n] - local_s[n], "runs": repeat},
            )
        )
    if len(sizes) >= 2:
        a, b = sizes[0], sizes[-1]
        slope = ((ray_s[b] - local_s[b]) - (ray_s[a] - local_s[a])) / (b - a)
        fixed = (ray_s[a] - local_s[a]) - slope * a
        for r in rows:
            if r.correct is not None:
                r.extra |= {"per image ms": round(1e3 * slope, 3), "fixed s": round(fixed, 2)}
    return rows


def bench_match(n: int, cluster: RayCluster) -> list[Row]:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, 256)).astype(np.float32)
    k = n // 10
    x[:k] = x[k : 2 * k] + 0.01 * rng.standard_normal((k, 256)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    t = time.perf_counter()
    want = find_pairs(x, 0.1)
    t_local = time.perf_counter() - t
    t = time.perf_counter()
    got = cluster.find_pairs(x, 0.1)
    t_ray = time.perf_counter() - t
    same = np.array_equal(want[0], got[0]) and np.array_equal(want[1], got[1])
    tiles = (-(-n // cluster.block_rows)) * (-(-n // cluster.block_rows) + 1) // 2
    return [
        Row("match", "find_pairs (single process)", n, t_local, n / t_local, "rows/s"),
        Row(
            "match",
            f"ray: {tiles} tiles of {cluster.block_rows}",
            n,
            t_ray,
            n / t_ray,
            "rows/s",
            correct=same,
            baseline="find_pairs (single process)",
            extra={"pairs": int(len(want[0]))},
        ),
    ]


def run(quick: bool) -> list[Row]:
    import ray

    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    started = time.perf_counter() - t
    rows = [Row("ray", "ray.init(num_cpus=2)", 1, started, 1 / started, "starts/s")]
    try:
        with tempfile.TemporaryDirectory(prefix="bench_ray_") as tmp:
            with RayCluster("local", block_rows=2048 if quick else 4096) as cluster:
                sizes = [50, 200] if quick else [200, 3000]
                rows += bench_encode(Path(tmp), sizes, 1 if quick else 2, cluster)
                rows += bench_match(4000 if quick else 12000, cluster)
    finally:
        ray.shutdown()
    return rows


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0])

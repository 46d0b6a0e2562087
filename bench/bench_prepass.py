"""Exact-copy pre-pass: finding byte-identical files among N files (page cache warm).

The fast path (clipdedup.ingest.prepass.identical_classes) reads only files whose size collides, first
64 KiB head + tail, and hashes in full only what still collides. The baseline hashes every file
with sha256 (the obvious way); its classes are also the reference answer, and at small N the
whole-file comparison reference (identical_classes_ref) is checked too.

Files: random bytes of 20-80 KB (random sizes collide now and then, as photo sizes do) and 10% exact
copies of other files. Rate: files/s; extra['MB/s'] counts all bytes of all files.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from clipdedup.ingest.prepass import identical_classes, identical_classes_ref
from common import Row, best_of, main


def make_files(root: Path, n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    rng = np.random.default_rng(seed)
    paths, sizes = [], []
    blobs: list[bytes] = []
    for k in range(n):
        if blobs and rng.random() < 0.1:
            data = blobs[int(rng.integers(len(blobs)))]
        else:
            data = rng.integers(0, 256, int(rng.integers(20_000, 80_000)), dtype=np.uint8).tobytes()
            blobs.append(data)
        p = root / f"{k // 1000:03d}" / f"{k:06d}.jpg"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(data)
        paths.append(str(p))
        sizes.append(len(data))
    return paths, sizes


def sha256_classes(paths: list[str]) -> list[int | None]:
    """Baseline: sha256 of every whole file, grouped by digest; labels as identical_classes gives them."""
    first: dict[bytes, int] = {}
    digests = []
    for k, p in enumerate(paths):
        with open(p, "rb") as f:
            d = hashlib.sha256(f.read()).digest()
        digests.append(d)
        first.setdefault(d, k)
    count: dict[bytes, int] = {}
    for d in digests:
        count[d] = count.get(d, 0) + 1
    return [first[d] if count[d] > 1 else None for d in digests]


def run(quick: bool) -> list[Row]:
    sizes_n = [300, 1500] if quick else [1000, 5000, 20000]
    rows: list[Row] = []
    for n in sizes_n:
        with tempfile.TemporaryDirectory(prefix="bench-prepass-") as tmp:
            paths, sizes = make_files(Path(tmp), n, seed=n)
            total_mb = sum(sizes) / 1e6
            t_ref, ref = best_of(lambda p=paths: sha256_classes(p), 2)
            if n <= 1000:
                assert identical_classes_ref(paths) == ref, "sha256 classes disagree with byte compare"
            rows.append(
                Row(
                    "copies",
                    "baseline: sha256 every file",
                    n,
                    t_ref,
                    n / t_ref,
                    "files/s",
                    extra={"MB/s": round(total_mb / t_ref, 1)},
                )
            )
            for workers, label in ((1, "size+probe+blake3, 1 thread"), (None, "size+probe+blake3, threads")):
                t, got = best_of(lambda w=workers, p=paths, s=sizes: identical_classes(p, s, workers=w), 3)
                rows.append(
                    Row(
                        "copies",
                        label,
                        n,
                        t,
                        n / t,
                        "files/s",
                        correct=got == ref,
                        baseline="baseline: sha256 every file",
                        extra={"MB/s": round(total_mb / t, 1), "threads": workers or os.cpu_count()},
                    )
                )
    return rows


if __name__ == "__main__":
    t0 = time.perf_counter()
    main(run, __doc__.split("\n")[0])
    print(f"{time.perf_counter() - t0:.1f}s")

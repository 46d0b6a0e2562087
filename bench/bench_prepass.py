"""Exact-copy pre-pass: finding byte-identical files among N files (page cache warm).

The fast path (clipdedup.ingest.prepass.identical_classes) reads only files whose size collides, first
64 KiB head + tail, and hashes in full only what still collides. The baseline hashes every file
with sha256 (the obvious way); its classes are also the reference answer, and at small N the
whole-file comparison reference (identical_classes_ref) is checked too. All rows are timed in the
same 3 rounds, interleaved, and each round's answer is checked.

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
from common import Row, interleaved, main


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
            ref = sha256_classes(paths)  # the reference answer, taken outside the timing
            if n <= 1000:
                assert identical_classes_ref(paths) == ref, "sha256 classes disagree with byte compare"
            base = "baseline: sha256 every file"
            fns = {
                base: lambda p=paths: sha256_classes(p),
                "size+probe+blake3, 1 thread": lambda p=paths, s=sizes: identical_classes(p, s, workers=1),
                "size+probe+blake3, threads": lambda p=paths, s=sizes: identical_classes(p, s, workers=None),
            }
            timed = interleaved(fns, 3, lambda impl, got, ref=ref: got == ref)
            for impl, tm in timed.items():
                extra = {"MB/s": round(total_mb / tm.seconds, 1), "rounds": tm.rounds}
                if impl != base:
                    extra["threads"] = 1 if impl.endswith("1 thread") else os.cpu_count()
                rows.append(
                    Row(
                        "copies",
                        impl,
                        n,
                        tm.seconds,
                        n / tm.seconds,
                        "files/s",
                        correct=None if impl == base else tm.ok,  # the baseline is the reference
                        baseline=None if impl == base else base,
                        extra=extra,
                    )
                )
    return rows


if __name__ == "__main__":
    t0 = time.perf_counter()
    main(run, __doc__.split("\n")[0])
    print(f"{time.perf_counter() - t0:.1f}s")

"""Row-store checks: GPU matching of a `RowStore` through `match_with_cache` (a full match, then an
incremental rerun that reuses the match cache) against `find_pairs_store` on the CPU, and the
pinned DB load against the `.npy` files."""

from __future__ import annotations

import numpy as np

from gpucheck.core import Ctx
from gpucheck.match import planted_unit, same


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def _stores(n: int, d: int, seed: int):
    """Two versions of a collection: x, then x with some rows changed and rows appended (copies
    of earlier rows, slightly moved), as (rows, keys) each."""
    x, _ = planted_unit(n, d, max(4, n // 100), seed)
    rng = np.random.default_rng(seed + 1)
    keys = [f"img{k:07d}.jpg" for k in range(n)]
    x2 = x.copy()
    changed = rng.choice(n, max(2, n // 50), replace=False)
    x2[changed] = _unit(x[rng.choice(n, len(changed))] + 0.003)
    extra = _unit(x[rng.choice(n, max(2, n // 40))] + 0.002)
    return (x, keys), (np.concatenate([x2, extra]), keys + [f"new{k:07d}.jpg" for k in range(len(extra))])


def part_store(ctx: Ctx) -> None:
    from clipdedup.db.rowstore import store_of_matrix
    from clipdedup.match.cache.incremental import match_with_cache
    from clipdedup.match.store import find_pairs_store
    from clipdedup.records import DBMeta

    n, d = (300, 48) if ctx.cpu else (50_000, 1280)
    (x1, k1), (x2, k2) = _stores(n, d, 7)
    t = 0.25
    names = ["cpu-fp32 (cpu stand-in for triton / torch-cuda)"] if ctx.cpu else ["triton", "torch-cuda"]
    for name in names:
        backend = name.split(" ")[0]

        def run(backend: str = backend) -> tuple[bool, str]:
            db = ctx.tmp / f"store-{backend}"
            db.mkdir(parents=True, exist_ok=True)
            meta = DBMeta("m", d)
            lines: list[str] = []
            out = []
            for x, keys in ((x1, k1), (x2, k2)):
                with store_of_matrix(x) as st:
                    m = match_with_cache(st, keys, str(db), meta, t, backend=backend, say=lines.append)
                    want, d64 = find_pairs_store(st, t, recipe="float32")
                    ok, detail = same((m.pairs, m.dist), (want, d64.astype(np.float32)))
                    out.append((ok, detail, m.how))
            ok = all(o for o, _, _ in out) and out[1][2].startswith("reused") and not lines
            said = f"; said: {' / '.join(lines)}" if lines else ""
            return ok, f"full: {out[0][1]}; rerun ({out[1][2]}): {out[1][1]}{said}"

        ctx.run("store", f"{name} row store, full then incremental, {n:,} x {d}", run, est=(60, 15))
    ctx.run(
        "store",
        "pinned DB load (snapshot and files) vs the .npy files",
        lambda: _pinned(ctx),
        est=(40, 10),
        needs_cuda=True,
    )


def _pinned(ctx: Ctx) -> tuple[bool, str]:
    """load_embeddings twice (files, then the snapshot the first load wrote) into page-locked rows."""
    import torch

    from clipdedup import db as dbmod
    from clipdedup.db import snapshot as snap_mod
    from clipdedup.ingest.update import load_embeddings
    from clipdedup.records import FileEntry

    root = ctx.tmp / "pinned-db"
    x = np.random.default_rng(3).standard_normal((3000, 512)).astype(np.float32)
    entries = []
    for k, v in enumerate(x):
        dbmod.write_embedding(root, f"p{k:05d}.jpg", v)
        entries.append(FileEntry(f"p{k:05d}.jpg", 0, 1))
    dbmod.write_meta(root, dbmod.DBMeta("m", 512))
    racy, snap_mod.RACY_NS = snap_mod.RACY_NS, 0  # let the second load reuse rows written just now
    try:
        details, ok = [], True
        for label in ("files", "snapshot"):
            info = dbmod.LoadInfo()
            kept, mat, errors, missing = load_embeddings(root, entries, dim=512, info=info)
            info.wait()
            pinned = torch.from_numpy(mat).is_pinned()
            good = len(kept) == len(x) and not errors and np.array_equal(mat, x) and pinned
            ok = ok and good
            equal = np.array_equal(mat, x)
            details.append(f"{label}: pinned {pinned}, equal {equal}, {info.from_snapshot} from snapshot")
        ok = ok and info.from_snapshot == len(x)
    finally:
        snap_mod.RACY_NS = racy
    return ok, "; ".join(details)

"""Ray with the machine's GPU (or CPUs): a local cluster whose encode actors (one per GPU, fitted
before decoding) build a DB equal to the local path's, and whose matching tasks (one GPU each)
read the rows from the DB's snapshot and return `find_pairs_store`'s pairs."""

from __future__ import annotations

import os
import shutil

import numpy as np

from gpucheck.core import Ctx
from gpucheck.decode import mixed_folder, random_model
from gpucheck.match import planted_unit, same


def part_ray(ctx: Ctx) -> None:
    import importlib.util

    why = None if importlib.util.find_spec("ray") else "ray is not installed"
    gpus = 0 if ctx.cpu else 1
    ctx.run(
        "ray",
        f"local cluster, {gpus} GPU: encode actors + matching tasks",
        lambda: _ray(ctx, gpus),
        est=(120, 60),
        needs=why,
    )


def _ray(ctx: Ctx, gpus: int) -> tuple[bool, str]:
    import ray

    from clipdedup import cluster as cl
    from clipdedup.cluster.match import find_pairs_ray
    from clipdedup.db import write_embedding
    from clipdedup.ingest.update import update_db
    from clipdedup.match.store import find_pairs_store

    device = "cpu" if ctx.cpu else "cuda"
    model = random_model(ctx.tmp / "ray-tiny", None)
    folder = ctx.tmp / "ray-images"
    mixed_folder(folder, copies=3 if ctx.cpu else 12)
    quiet = lambda line: None  # noqa: E731
    local = update_db(folder, ctx.tmp / "ray-db-local", model, device=device, batch_size=8, log=quiet)
    x, _ = planted_unit(400 if ctx.cpu else 40_000, 32 if ctx.cpu else 512, 20, 5)
    mdb = ctx.tmp / "ray-match-db"
    for k, v in enumerate(x):
        write_embedding(mdb, f"m{k:06d}.jpg", v)
    ray.init(
        num_cpus=2 if ctx.cpu else min(8, os.cpu_count() or 1),
        num_gpus=gpus,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
    )
    try:
        kw = dict(actor_cpus=2, block_rows=256) if ctx.cpu else dict(block_rows=16384)  # 1 CPU actor, 3 tiles
        with cl.RayCluster("local", match=True, **kw) as c:
            remote = update_db(
                folder,
                ctx.tmp / "ray-db",
                model,
                device=device,
                batch_size=8,
                log=quiet,
                encoder=c.load_encoder(model, device=device),
            )
            with _open(mdb, x.shape[1]) as store:
                got = find_pairs_ray(c, store, 0.3)
                want, d64 = find_pairs_store(store, 0.3, recipe="float32")
                shipped = c.shipped_rows
            seen_gpus = c.gpus()
    finally:
        ray.shutdown()
        shutil.rmtree(mdb, ignore_errors=True)
    a, b = _vectors(ctx.tmp / "ray-db-local"), _vectors(ctx.tmp / "ray-db")
    cos = min((float(a[k] @ b[k]) for k in a), default=float("nan"))
    enc_ok = a.keys() == b.keys() and cos >= 0.9999 and remote.failed == local.failed and len(a) > 10
    m_ok, m_detail = same(got, (want, d64.astype(np.float32)))
    ok = enc_ok and m_ok and shipped == 0 and seen_gpus == gpus
    return ok, (
        f"{seen_gpus} GPU; {len(b)} vectors, min cosine vs local {cos:.6f}, failures equal "
        f"{remote.failed == local.failed}; match: {m_detail}, {shipped} rows shipped (rest from the snapshot)"
    )


def _open(root, dim: int):
    from clipdedup import db as dbmod
    from clipdedup.db.rowstore import rows_of
    from clipdedup.db.store_load import open_store

    idx = dbmod.index_db(root)
    files = [idx.files[r] for r in sorted(idx.files)]
    store, ok, _ = open_store(root, rows_of(root, files), dim, started_ns=idx.started_ns)
    return store


def _vectors(db) -> dict[str, np.ndarray]:
    return {p.relative_to(db).as_posix(): np.load(p) for p in sorted(db.rglob("*.npy"))}

"""Encoding on Ray: the update's decode + encode step run by actors, written by the driver.

`encode_into_db` takes the same arguments as `ingest.update._encode_into_db` and fills the same
summary: the driver splits the images to encode into one shard per `EncodeActor`
(cluster/actors.py); each actor loads the model once, fits it before its decoder starts, and runs
one decode -> encode pipeline over its shard with the decoder registry (`ingest.decode.iter_batches`:
the same choice of decoder and the same preprocessing as a local run), streaming (index, vector,
failure reason) rows back. The driver's one `AsyncWriter` writes the vectors (atomic temp file +
rename, the image's mtime stamped) or keeps them in memory in a dry run.

Faults: Ray restarts a killed actor and the driver hands it the rest of its shard; a batch's rows
come back whole or not at all, and nothing on a worker touches the DB, so a dead worker cannot
leave a truncated `.npy`. At the end the driver checks that every planned image has its vector
written or a reason, and records a reason for any that has neither.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from clipdedup import db as dbmod
from clipdedup.cluster.actors import stream_results
from clipdedup.cluster.session import RaySession, task_error
from clipdedup.errors import UserError

PROBE_BYTES = 1 << 16
LOST = "no result came back from the Ray cluster"
MISSING = "its vector is missing after the run"


def _use_gpus(cluster: RaySession, device: str | None) -> bool:
    if device == "cpu":
        return False
    gpus = cluster.gpus()
    if device and device.startswith("cuda") and gpus == 0:
        raise UserError(f"--ray {cluster.address}: device {device} asked for, but the cluster has no GPU")
    return gpus > 0


def _encoder_meta(model_id: str, device: str) -> dict[str, Any]:
    from clipdedup.ingest.encode import load_encoder

    enc = load_encoder(model_id, device=device, batch_size=1)
    keys = ("model_id", "dim", "input_size", "preprocess")
    return {k: getattr(enc, k) for k in keys}


def _remote_only(*_: Any) -> Any:
    raise RuntimeError("this encoder runs on the Ray cluster (clipdedup.cluster.encode)")


def remote_encoder(cluster: RaySession, model_id: str, device: str | None) -> Any:
    """An `Encoder` that describes the model as a worker loads it (id, dim, preprocessing), without
    loading it on the driver; `update_db` encodes with it through the cluster (its `encode_into_db`).

    Raises:
        ModelError: the model cannot load on a worker (the worker's one-line reason).
    """
    from clipdedup.ingest.encode import Encoder, canonical_model_id

    ray = cluster.connect()
    gpu = _use_gpus(cluster, device)
    if model_id.startswith("builtin:"):  # no weights, no GPU: the same description without a task
        gpu, meta = False, _encoder_meta(model_id, "cpu")
    else:
        task = ray.remote(_encoder_meta).options(num_gpus=1 if gpu else 0, num_cpus=1, max_retries=3)
        try:
            meta = ray.get(task.remote(canonical_model_id(model_id), "cuda" if gpu else "cpu"))
        except Exception as e:
            raise task_error(e) from None
    run = functools.partial(encode_into_db, cluster)
    device = "cuda" if gpu else "cpu"
    return Encoder(prepare=_remote_only, encode_batch=_remote_only, device=device, encode_into_db=run, **meta)


def _read_probe(path: str) -> str:
    """sha256 of the first PROBE_BYTES of `path`, or 'error: why'."""
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read(PROBE_BYTES)).hexdigest()
    except OSError as e:
        return f"error: {e.strerror or e}"


def probe_nodes(cluster: RaySession, path: str) -> None:
    """Every alive node reads the start of `path`; a node that cannot, or reads other bytes, is a
    UserError naming it (the image dir must be one shared filesystem at the same path everywhere)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray = cluster.connect()
    want = _read_probe(path)
    task = ray.remote(_read_probe)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    tasks = [
        task.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
        for n in nodes
    ]
    probe_verdict(nodes, ray.get([t.remote(path) for t in tasks]), want, path)


def probe_verdict(nodes: Sequence[dict], got: Sequence[str], want: str, path: str) -> None:
    """Raises a UserError naming the first node whose probe (`_read_probe`) differs from `want`."""
    for n, h in zip(nodes, got):
        if h != want:
            why = h[len("error: ") :] if h.startswith("error: ") else "it reads different bytes"
            raise UserError(
                f"--ray: node {n.get('NodeManagerAddress', '?')} cannot read {path} ({why}); every node "
                "must see the image dir at the same path (a shared filesystem, see docs/cluster.md)"
            )


def encode_into_db(
    cluster: RaySession,
    enc: Any,
    image_dir: Any,
    db_dir: Any,
    todo: Sequence[Any],
    batch_size: int,
    dry_run: bool,
    s: Any,
    progress: bool,
    log: Any,
) -> None:
    """Decode -> encode on the cluster -> write on the driver (see the module docstring).

    Arguments as `ingest.update._encode_into_db`; `enc` is `remote_encoder`'s (its model id and device
    tell the actors what to load). Fills `s.encoded`, `s.failed` and, in a dry run, `s.in_memory`.
    """
    from clipdedup.db.writer import AsyncWriter
    from clipdedup.ingest.update import store_vector

    image_dir = os.path.abspath(os.fspath(image_dir))
    paths = [os.path.join(image_dir, e.rel) for e in todo]
    probe_nodes(cluster, paths[0])
    done = np.zeros(len(todo), bool)
    first_failure = len(s.failed)
    bar = tqdm(total=len(todo), desc="encode (ray)", unit="img", disable=not progress, file=sys.stderr)
    with contextlib.ExitStack() as stack:
        writer = None if dry_run else stack.enter_context(AsyncWriter(db_dir))
        try:
            for b in _results(cluster, enc, image_dir, todo, batch_size):
                fresh = 0
                for k, vec, reason in zip(b["idx"].tolist(), b["vec"], b["reason"]):
                    if done[k]:
                        continue  # a retried batch already delivered: the first copy counts
                    done[k], fresh = True, fresh + 1
                    if reason:
                        s.failed.append((paths[k], str(reason)))
                        log(f"{paths[k]}: skipped: {reason}")
                    else:
                        store_vector(s, writer, todo[k], paths[k], vec, log)
                bar.update(fresh)
                if cluster.on_batch is not None:
                    cluster.on_batch(int(done.sum()))
        except UserError:
            raise
        except Exception as e:
            raise task_error(e) from None
    bar.close()
    # Batches arrive in any order; the reasons are listed in plan order, as a local run lists them.
    order = {p: k for k, p in enumerate(paths)}
    s.failed[first_failure:] = sorted(s.failed[first_failure:], key=lambda f: order.get(f[0], -1))
    check_planned(todo, paths, done, db_dir, dry_run, s, log)


def _results(
    cluster: RaySession, enc: Any, image_dir: str, todo: Sequence[Any], batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """The result batches of the actors. Through Ray Client (`ray://`) the actors' streams are
    driven by one actor inside the cluster, which hands the batches to this process."""
    if not cluster.address.startswith("ray://"):
        yield from stream_results(cluster, enc, image_dir, todo, batch_size)
        return
    ray = cluster.connect()
    runner = ray.remote(PipelineRunner).options(num_cpus=0)
    handle = runner.remote(cluster.actor_cpus, enc, image_dir, list(todo), batch_size)
    try:
        while got := ray.get(handle.take.remote(8)):
            yield from got
    finally:
        ray.kill(handle)


class PipelineRunner:
    """`_results` inside the cluster, for a Ray Client driver: an actor (a full Ray driver there)
    that owns the actors' result streams and hands out their batches when asked."""

    def __init__(self, actor_cpus: int, enc: Any, image_dir: str, todo: list[Any], batch_size: int) -> None:
        inner = RaySession("auto", actor_cpus=actor_cpus)
        self._it = stream_results(inner, enc, image_dir, todo, batch_size)

    def take(self, k: int) -> list[dict[str, np.ndarray]]:
        """Up to k more result batches; [] at the end."""
        out: list[dict[str, np.ndarray]] = []
        for b in self._it:
            out.append(b)
            if len(out) >= k:
                break
        return out


def check_planned(
    todo: Sequence[Any], paths: list[str], done: np.ndarray, db_dir: Any, dry_run: bool, s: Any, log: Any
) -> None:
    """The driver's last check: every planned image has its vector or a reason.

    Args:
        todo: the planned entries; paths: their image paths.
        done: bool (len(todo),): a result (vector or reason) came back for that entry.
        db_dir, dry_run: where the vectors went (the DB, or `s.in_memory` in a dry run).
        s: the update summary; an entry without a result, or whose vector is not where it should
            be, gets a reason in `s.failed` (and leaves `s.encoded`).
    """
    failed = {p for p, _ in s.failed}
    for k in np.flatnonzero(~done).tolist():
        s.failed.append((paths[k], LOST))
        log(f"{paths[k]}: skipped: {LOST}")
    for k in np.flatnonzero(done).tolist():
        rel = todo[k].rel
        there = rel in s.in_memory if dry_run else os.path.isfile(dbmod.npy_path(db_dir, rel))
        if paths[k] not in failed and not there:
            s.encoded -= 1
            s.failed.append((paths[k], MISSING))
            log(f"{paths[k]}: skipped: {MISSING}")

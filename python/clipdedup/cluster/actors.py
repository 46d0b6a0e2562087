"""Ray encode actors that live for the whole run, and the driver's side of their result streams.

One `EncodeActor` per GPU (`num_gpus=1`), or per `actor_cpus` CPUs. An actor loads the model once
and fits its batch runner (`BatchRunner.fit`: the CUDA graph is captured on the zero batch) before
any decoder thread of its process starts, as the local path does (`ingest.update._encode_into_db`).
It then runs one decode -> encode pipeline over its whole shard of the images: the decoder (DALI or
the Pillow pool) and its prefetch thread live as long as the shard, and batch k+1 is submitted to
the encoder before batch k's vectors are collected, so decoding overlaps encoding exactly as in a
local run. Results stream back batch by batch (a Ray streaming generator), as (idx, vec, reason).

Faults: Ray restarts an actor that dies (`max_restarts`); once it answers again the driver hands it
the part of its shard that has not come back (`stream_results`), up to RETRIES times; images still
without a result get a reason at the end (`encode.check_planned`). The driver ignores a second copy.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from clipdedup.cluster.session import RaySession, task_error
from clipdedup.errors import UserError

# Test fault: a file path; the first actor that claims the file (by removing it) kills itself with
# SIGKILL when its shard starts, so the shard is in flight when the process dies.
KILL_ONCE_ENV = "CLIPDEDUP_RAY_TEST_KILL_ONCE"
RETRIES = 4  # restarts of one actor's shard before its remaining images are given up
RESTART_WAIT = 600.0  # seconds a dead actor may take to come back (its model loads again)


class EncodeActor:
    """A Ray actor: a shard of (idx, rel) rows -> a stream of (idx, vec, reason) batches.

    Args:
        model_id: canonical model id (local paths absolute, as the driver resolved them).
        image_dir: the image tree, at the same path on every node.
        device: torch device of this actor ("cuda" is the GPU Ray assigned to it).
        batch_size: encoder batch.
        cpus: the CPUs Ray reserved for this CPU actor (decoder threads and torch threads); None
            for a GPU actor (decoder threads from the node's cores, as a local GPU run).
    """

    def __init__(self, model_id: str, image_dir: str, device: str, batch_size: int, cpus: int | None) -> None:
        from clipdedup.ingest.encode import load_encoder
        from clipdedup.util.threads import thread_plan

        self.error: UserError | None = None
        self.fitted = False
        try:
            self.enc = load_encoder(model_id, device=device, batch_size=batch_size)
        except UserError as e:  # handed to the driver by `run` (a constructor's error loses its type)
            self.error = e
            return
        self.image_dir, self.batch_size = image_dir, batch_size
        self.plan = thread_plan(self.enc.device, cores=cpus, torch_model=self.enc.runner is not None)
        if self.enc.runner is not None:
            self.enc.runner.fit(batch_size)  # capture now: no decoder thread runs in this process yet
        self.fitted = self.enc.runner is not None

    def info(self) -> dict[str, Any]:
        """What the actor holds (tests): its pid, and whether the runner was fitted at start."""
        mode = None if self.error is not None else getattr(self.enc.runner, "mode", None)
        return {"pid": os.getpid(), "fitted": self.fitted, "mode": mode}

    def run(self, idx: np.ndarray, rels: Sequence[bytes]) -> Iterator[dict[str, np.ndarray]]:
        """Decodes and encodes the images `rels` (os.fsencode'd, relative to the image dir) in one
        pipeline; yields one result batch per decoded batch, idx taken from `idx` (int64)."""
        from clipdedup.ingest.decode import iter_batches
        from clipdedup.util.threads import torch_threads

        if self.error is not None:
            raise self.error
        _test_fault()
        enc = self.enc
        paths = [os.path.join(self.image_dir, os.fsdecode(r)) for r in rels]
        with torch_threads(self.plan.torch_threads):
            batches = iter_batches(
                paths,
                enc.prepare,
                batch_size=self.batch_size,
                min_size=enc.input_size,
                workers=self.plan.decoders,
                prefetch=self.plan.prefetch,
                spec=enc.spec,
                device=enc.device,
            )
            in_flight: tuple[Any, Any] | None = None
            for b in batches:
                job = None
                if b.items:
                    job = enc.submit(b.items) if enc.submit else _Done(enc.encode_batch(b.items))
                if in_flight is not None:
                    yield _rows(idx, *in_flight, enc.dim)
                in_flight = (b, job)
            if in_flight is not None:
                yield _rows(idx, *in_flight, enc.dim)


class _Done:
    def __init__(self, vecs: np.ndarray) -> None:
        self.vecs = vecs

    def result(self) -> np.ndarray:
        return self.vecs


def _rows(idx: np.ndarray, b: Any, job: Any, dim: int) -> dict[str, np.ndarray]:
    """A decoded batch `b` and its encoder job as result rows (NaN vectors for the failures)."""
    k = len(b.indices)
    at = np.array(list(b.indices) + [i for i, _ in b.failures], np.int64)
    vecs = np.full((len(at), dim), np.nan, np.float32)  # [n, D]; NaN: not encoded
    if job is not None:
        vecs[:k] = job.result()
    reasons = [""] * k + [r for _, r in b.failures]
    return {"idx": np.asarray(idx, np.int64)[at], "vec": vecs, "reason": np.array(reasons, object)}


def _test_fault() -> None:
    flag = os.environ.get(KILL_ONCE_ENV)
    if not flag:
        return
    try:
        os.unlink(flag)  # only one process can remove it
    except FileNotFoundError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


def actor_pool(cluster: RaySession, enc: Any, image_dir: str, n: int, batch_size: int) -> list[Any]:
    """The run's `EncodeActor`s: one per GPU (one CPU reserved each), else one per `actor_cpus`
    CPUs; never more than there are batches."""
    ray = cluster.connect()
    gpu = enc.device.startswith("cuda")
    cpus = 1 if gpu else cluster.actor_cpus
    pool = cluster.gpus() if gpu else max(1, cluster.cpus() // cpus)
    pool = max(1, min(pool, -(-n // batch_size)))
    cls = ray.remote(EncodeActor).options(
        num_cpus=cpus, num_gpus=1 if gpu else 0, max_restarts=-1, max_task_retries=0
    )
    return [
        cls.remote(enc.model_id, image_dir, enc.device, batch_size, None if gpu else cpus)
        for _ in range(pool)
    ]


def stream_results(
    cluster: RaySession, enc: Any, image_dir: str, todo: Sequence[Any], batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """The result batches of every actor as they come. Shards are contiguous runs of whole batches,
    one per actor; a shard whose actor dies is handed again, less what came back, to the same
    (restarted) actor."""
    ray = cluster.connect()
    actors = actor_pool(cluster, enc, image_dir, len(todo), batch_size)
    nb = -(-len(todo) // batch_size)
    cuts = [min(len(todo), c * batch_size) for c in np.linspace(0, nb, len(actors) + 1).round().astype(int)]
    shards = [np.arange(a, b, dtype=np.int64) for a, b in zip(cuts, cuts[1:])]
    got = np.zeros(len(todo), bool)
    tries = [0] * len(actors)
    streams: dict[Any, int] = {}

    def start(k: int) -> None:
        rest = shards[k][~got[shards[k]]]
        if len(rest):
            rels = [os.fsencode(todo[i].rel) for i in rest.tolist()]
            streams[actors[k].run.options(num_returns="streaming").remote(rest, rels)] = k

    probes: dict[Any, tuple[int, float]] = {}  # an actor's `info` call after it died: up again?

    def probe(k: int, since: float) -> None:
        if time.monotonic() - since < RESTART_WAIT:
            probes[actors[k].info.remote()] = (k, since)

    for k in range(len(actors)):
        start(k)
    try:
        while streams or probes:
            ready, _ = ray.wait([*streams, *probes], num_returns=1, timeout=1.0)
            for ref in ready:
                if ref in probes:
                    k, since = probes.pop(ref)
                    try:
                        ray.get(ref)
                    except ray.exceptions.RayActorError as e:
                        if getattr(e, "actor_init_failed", False):
                            raise  # its constructor raised (the model cannot load there)
                        time.sleep(0.5)  # still restarting (or gone for good: RESTART_WAIT ends it)
                        probe(k, since)
                        continue
                    start(k)  # the rest of the shard, on the restarted actor
                    continue
                k = streams[ref]
                try:
                    out = ray.get(next(ref))
                except StopIteration:
                    del streams[ref]
                    continue
                except ray.exceptions.RayActorError as e:
                    if getattr(e, "actor_init_failed", False):
                        raise
                    del streams[ref]
                    tries[k] += 1
                    if tries[k] <= RETRIES:
                        probe(k, time.monotonic())
                    continue
                got[out["idx"]] = True
                yield out
    except Exception as e:
        raise task_error(e) from None
    finally:
        for a in actors:
            ray.kill(a)

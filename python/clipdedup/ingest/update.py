"""DB update: scan the image tree, plan, decode + encode what is new or changed, write, clean up."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from clipdedup import db as dbmod
from clipdedup.db.writer import AsyncWriter
from clipdedup.errors import UserError
from clipdedup.ingest import prepass
from clipdedup.ingest import unreadable as unread
from clipdedup.ingest.decode.base import iter_batches
from clipdedup.ingest.encode.base import (
    DEFAULT_MODEL,
    Encoder,
    LazyEncoder,
    canonical_model_id,
    check_layout,
    layout_mismatch,
    load_encoder,
)
from clipdedup.records import FileEntry, ScanResult, UpdateSummary
from clipdedup.scan import scan_tree
from clipdedup.util.threads import thread_plan, torch_threads


def read_meta_as_is(db_dir: str | os.PathLike[str]) -> dbmod.DBMeta | None:
    """The metadata of a DB that a run reads without updating it (--skip-update); None when it has
    none. Raises DBMismatchError when this version cannot read its rows (another row layout)."""
    meta = dbmod.read_meta(db_dir)
    if meta is not None:
        check_layout(db_dir, meta, fix="re-encode it with --force-update (without --skip-update)")
    return meta


def encoder_meta(enc: Encoder) -> dbmod.DBMeta:
    return dbmod.DBMeta(model_id=enc.model_id, dim=enc.dim, preprocess=enc.preprocess)


def scan_images(
    image_dir: str | os.PathLike[str],
    exclude: Sequence[str | os.PathLike[str]] = (),
    *,
    follow_symlinks: bool = False,
    cross_devices: bool = False,
    progress: bool = False,
) -> ScanResult:
    """Scans an image tree. The bar counts the directory entries walked so far while the walk
    runs (no ETA: the total is unknown until it ends), so a long walk shows it is alive."""
    if not os.path.isdir(image_dir):
        raise UserError(f"{image_dir}: image directory does not exist")
    bar = tqdm(desc=f"scan {os.fspath(image_dir)}", unit="entry", disable=not progress, file=sys.stderr)

    def seen(n: int) -> None:
        bar.update(n - bar.n)

    res = scan_tree(
        image_dir,
        exclude=list(exclude),
        follow_symlinks=follow_symlinks,
        cross_devices=cross_devices,
        progress=seen if progress else None,
    )
    bar.close()
    return res


def resolve_model_id(model_id: str | None, *db_dirs: str | os.PathLike[str]) -> str:
    """`model_id`, else the model the first of `db_dirs` that records one was built with, else the
    default model."""
    if model_id:
        return model_id
    for db_dir in db_dirs:
        meta = dbmod.read_meta(db_dir)
        if meta is not None:
            return meta.model_id
    return DEFAULT_MODEL


def update_db(
    image_dir: str | os.PathLike[str],
    db_dir: str | os.PathLike[str],
    model_id: str | None = None,
    *,
    device: str | None = None,
    batch_size: int = 32,
    force: bool = False,
    clean_orphans: bool = True,
    dry_run: bool = False,
    encoder: Encoder | LazyEncoder | None = None,
    scan: ScanResult | None = None,
    exclude: Sequence[str | os.PathLike[str]] = (),
    progress: bool = False,
    log=None,
    use_ctime: bool = True,
    retry_unreadable: bool = False,
) -> UpdateSummary:
    """Brings the DB at `db_dir` up to date with the images under `image_dir`.

    Args:
        image_dir: the image tree.
        db_dir: its mirror; created if missing (unless `dry_run`).
        model_id: encoder id (see `load_encoder`); None: the DB's own model, or the
            default model for a new DB.
        encoder: an encoder to use instead of `model_id`: a loaded one, or a `LazyEncoder` that is
            loaded only when some image really needs the model.
        force: re-encode every image.
        clean_orphans: remove DB files whose image is gone.
        dry_run: encode into `summary.in_memory` and change nothing on disk.
        scan: a scan of `image_dir` already made (else one is made, skipping `exclude`).
        log: callable taking one line of text for per-file messages (default: stderr).
        use_ctime: an image whose ctime is newer than its DB file is re-encoded (content rewritten
            with its size and mtime put back); False for file systems whose ctime is unreliable.
        retry_unreadable: decode again the images remembered as unreadable although they have not
            changed (ingest/unreadable.py); by default they are reported from the record.

    Returns:
        What was encoded, skipped and removed, with times per stage in `seconds`.

    Raises:
        UserError: a missing directory, a model that cannot load, or a DB of another model.
    """
    log = log or (lambda line: print(line, file=sys.stderr))
    s = UpdateSummary()
    t0 = time.perf_counter()
    scan = scan or scan_images(image_dir, exclude, progress=progress)
    s.scanned, s.scan_errors = len(scan.entries), list(scan.errors)
    for path, reason in scan.errors:
        log(f"{path}: {reason}")
    index = dbmod.index_db(db_dir)
    have = dbmod.read_meta(db_dir)
    s.seconds["scan"] = time.perf_counter() - t0

    if isinstance(encoder, Encoder):
        encoder = LazyEncoder.of(encoder)
    if have is not None and not (encoder is not None and encoder.loaded) and model_id is not None:
        # Catch a wrong -m even when nothing needs encoding (and no model would be loaded).
        asked = canonical_model_id(model_id)
        if asked != have.model_id:
            raise dbmod.mismatch_error(db_dir, have, f"model {asked}")
    # Rows of an older layout would be misread: refused, or all re-encoded (--force-update).
    relayout = have is not None and layout_mismatch(have) is not None
    if have is not None and not force:
        check_layout(db_dir, have, fix="re-encode it with --force-update, or use a separate --db-dir")
    dim = have.dim if have else None
    plan = dbmod.plan_update(scan.entries, index, dim=dim, force=force, use_ctime=use_ctime)
    s.up_to_date, s.orphans = len(plan.up_to_date), plan.orphans
    old_unreadable, skipped = unread.leave_out(image_dir, db_dir, plan, retry_unreadable, s, log)
    for img in plan.unnamable:
        path = os.path.join(image_dir, img.rel)
        s.failed.append((path, dbmod.unnamable_reason(img.rel)))
        log(f"{path}: {dbmod.unnamable_reason(img.rel)}")
    if plan.to_encode or have is None:
        copies = None
        if have is not None:
            # Copies of up-to-date images need no model: find them before loading one.
            copies = _plan_copies(image_dir, plan, index, have.dim, s)
        if copies is None or copies.to_encode:
            t = time.perf_counter()
            if encoder is None:
                encoder = LazyEncoder.of(
                    load_encoder(resolve_model_id(model_id, db_dir), device=device, log=log)
                )
            want = encoder_meta(encoder.get())
            s.seconds["model load"] = time.perf_counter() - t
            s.meta = dbmod.check_meta(db_dir, want) or want
            if relayout:
                s.meta = want
            if (have is None or relayout) and not dry_run:
                if index.files and have is None:
                    log(f"{db_dir}: no {dbmod.META_NAME}; adopting this DB for {want.describe()}")
                dbmod.write_meta(db_dir, want)
        else:
            s.meta = have
        if copies is None:
            assert s.meta is not None  # set from the loaded encoder just above
            copies = _plan_copies(image_dir, plan, index, s.meta.dim, s)
        if copies.to_encode:
            t = time.perf_counter()
            assert encoder is not None  # the branch above loaded it (copies was None or had work)
            enc = encoder.get()
            encode = enc.encode_into_db or _encode_into_db  # a cluster's encoder brings its own
            encode(enc, image_dir, db_dir, copies.to_encode, batch_size, dry_run, s, progress, log)
            s.seconds["encode"] = time.perf_counter() - t
        prepass.finish_update(copies, image_dir, db_dir, s, dry_run=dry_run, log=log)
    else:
        s.meta = have
    if clean_orphans and plan.orphans and not dry_run:
        s.removed = dbmod.remove_orphans(db_dir, plan.orphans)
    if not dry_run:
        unread.update_record(image_dir, db_dir, old_unreadable, skipped, plan.to_encode, s.failed)
    if not (plan.to_encode or s.removed):  # no embedding file written or removed: the index holds
        s.db_columns = index.columns
    return s


def reencode_damaged(
    image_dir: str | os.PathLike[str],
    db_dir: str | os.PathLike[str],
    entries: Sequence[FileEntry],
    load_errors: Sequence[tuple[str, str]],
    encoder: LazyEncoder,
    model_id: str | None,
    device: str | None,
    batch_size: int,
    log: Callable[[str], object],
    *,
    into: UpdateSummary,
) -> bool:
    """Re-encodes the images among `entries` whose .npy failed to load (`load_errors`) although it
    looked up to date (right size and mtime, but a bad header or dtype): left alone, such a file
    would be skipped on every run. Adds what it did to `into`; returns whether it did anything
    (then the caller loads again)."""
    by_npy = {dbmod.npy_path(db_dir, e.rel): e for e in entries}
    damaged = [(by_npy[p], why) for p, why in load_errors if p in by_npy]
    if not damaged:
        return False
    for e, why in damaged:
        log(f"{dbmod.npy_path(db_dir, e.rel)}: damaged ({why}); re-encoding {e.rel}")
    again = update_db(
        image_dir,
        db_dir,
        model_id,
        device=device,
        batch_size=batch_size,
        force=True,  # they look up to date
        clean_orphans=False,  # this scan holds only the damaged images
        scan=ScanResult([e for e, _ in damaged], []),
        log=log,
        encoder=encoder,
    )
    into.encoded += again.encoded
    into.copied += again.copied
    into.failed += again.failed
    return True


def _plan_copies(image_dir, plan: dbmod.UpdatePlan, index: dbmod.DBIndex, dim: int, s: UpdateSummary):
    t = time.perf_counter()
    copies = prepass.plan_copies(image_dir, plan.to_encode, plan.up_to_date, index, dim)
    s.seconds["exact copies"] = time.perf_counter() - t
    return copies


def store_vector(
    s: UpdateSummary, writer: AsyncWriter | None, e: FileEntry, path: str, vec: np.ndarray, log: Any
) -> None:
    """One image's embedding into the DB (`s.in_memory` without a writer), counted in `s.encoded`;
    a vector that is not finite is a reason in `s.failed` instead (matching would drop it silently)."""
    if not np.isfinite(vec).all():
        s.failed.append((path, "the model's embedding is not finite"))
        log(f"{path}: skipped: the model's embedding is not finite")
    elif writer is None:
        s.in_memory[e.rel] = np.array(vec, np.float32)
        s.encoded += 1
    else:
        writer.put(e.rel, vec, e.mtime_ns)
        s.encoded += 1


def _encode_into_db(
    enc: Encoder,
    image_dir,
    db_dir,
    todo: Sequence[FileEntry],
    batch_size: int,
    dry_run: bool,
    s: UpdateSummary,
    progress: bool,
    log,
) -> None:
    """Decode -> encode -> write.

    For a GPU model, decoder threads (or DALI) run two batches ahead and batch k+1 is submitted to
    the encoder before batch k's vectors are collected; for a CPU model, decoding and inference take
    turns, each with every core (`threads.thread_plan`). A writer thread writes the .npy files; in
    a dry run the vectors go to `s.in_memory` and nothing is written.
    """
    paths = [os.path.join(image_dir, e.rel) for e in todo]
    bar = tqdm(total=len(todo), desc="encode", unit="img", disable=not progress, file=sys.stderr)
    plan = thread_plan(enc.device, torch_model=enc.runner is not None)
    if enc.runner is not None:
        enc.runner.fit(batch_size)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch_threads(plan.torch_threads))
        writer = None if dry_run else stack.enter_context(AsyncWriter(db_dir))
        batches = iter_batches(
            paths,
            enc.prepare,
            batch_size=batch_size,
            min_size=enc.input_size,
            workers=plan.decoders,
            prefetch=plan.prefetch,
            spec=enc.spec,
            device=enc.device,
            log=log,
        )

        def collect(indices: list[int], vecs: np.ndarray) -> None:
            for i, v in zip(indices, vecs):
                store_vector(s, writer, todo[i], paths[i], v, log)
            bar.update(len(indices))

        in_flight: tuple[list[int], Any] | None = None
        for batch in batches:
            for i, reason in batch.failures:
                s.failed.append((paths[i], reason))
                log(f"{paths[i]}: skipped: {reason}")
            bar.update(len(batch.failures))
            if not batch.items:
                continue
            job = enc.submit(batch.items) if enc.submit else _Done(enc.encode_batch(batch.items))
            if in_flight is not None:
                collect(in_flight[0], in_flight[1].result())
            in_flight = (batch.indices, job)
        if in_flight is not None:
            collect(in_flight[0], in_flight[1].result())
    bar.close()


class _Done:
    """An encoder result that is already there (encoders without `submit`)."""

    def __init__(self, vecs: np.ndarray) -> None:
        self.vecs = vecs

    def result(self) -> np.ndarray:
        return self.vecs


def load_embeddings(
    db_dir: str | os.PathLike[str],
    entries: Sequence[FileEntry],
    *,
    dim: int | None,
    in_memory: dict[str, np.ndarray] | None = None,
    dry_run: bool = False,
    info: dbmod.LoadInfo | None = None,
) -> tuple[list[FileEntry], np.ndarray, list[tuple[str, str]], int]:
    """The embeddings of `entries` that the DB (or `in_memory`) holds, in entry order.

    Reads through the DB's packed snapshot and refreshes it afterwards (see `db.load_files`),
    except in a dry run (`dry_run`, or any `in_memory` vectors), which writes nothing.

    Returns:
        (entries with an embedding, float32 (N, D) matrix, DB read errors, count not in the DB).
    """
    in_memory = in_memory or {}
    # The snapshot is read while the DB is scanned; a dry run's merged set differs, so no bet there.
    prefetch = None if in_memory else dbmod.SnapshotPrefetch(db_dir, dim, None)
    index = dbmod.index_db(db_dir)
    on_disk: list[tuple[FileEntry, dbmod.DBFile]] = []
    missing = 0
    for e in entries:
        f = None if e.rel in in_memory else index.files.get(e.rel)
        if f is not None:
            on_disk.append((e, f))
        elif e.rel not in in_memory:
            missing += 1
    if dim is None and in_memory:
        dim = next(iter(in_memory.values())).shape[0]
    mat, ok, errors = dbmod.load_files(
        db_dir,
        [f for _, f in on_disk],
        dim,
        started_ns=index.started_ns,
        write_snapshot=not (dry_run or in_memory),
        info=info,
        prefetch=prefetch,
    )
    kept = [e for (e, _), good in zip(on_disk, ok) if good]
    if not in_memory:
        return kept, mat, errors, missing
    # Dry run: merge the in-memory vectors, keeping scan order.
    by_rel = {e.rel: mat[k] for k, e in enumerate(kept)}
    by_rel.update(in_memory)
    kept = [e for e in entries if e.rel in by_rel]
    out = np.zeros((len(kept), mat.shape[1] if dim is None else dim), np.float32)
    for k, e in enumerate(kept):
        out[k] = by_rel[e.rel]
    return kept, out, errors, missing

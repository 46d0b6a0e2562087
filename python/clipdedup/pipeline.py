"""A whole run: update the DB(s), load, match, group, choose what to keep, move the rest.

`run_dedup` dedupes one image dir; `run_import` moves the files of an import dir that have a
duplicate in a base dir (the base dir is only read).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from tqdm import tqdm

from clipdedup import db as dbmod
from clipdedup.cluster import RayCluster
from clipdedup.db.load import snapshot_lines
from clipdedup.db.rowstore import RowStore
from clipdedup.db.store_load import encoded_as_scanned, index_columns, open_embeddings
from clipdedup.errors import UserError
from clipdedup.ingest.encode import base as encode
from clipdedup.ingest.encode.base import DEFAULT_MODEL, Encoder, LazyEncoder, default_threshold, load_encoder
from clipdedup.ingest.update import (
    load_embeddings,
    read_meta_as_is,
    reencode_damaged,
    resolve_model_id,
    scan_images,
    update_db,
)
from clipdedup.match import MATCHERS, find_pairs, nearest_by_name
from clipdedup.match.backends import stream
from clipdedup.match.cache.matches import cache_path
from clipdedup.match.cache.run import import_in_background, likely_to_match, match_run
from clipdedup.match.verify.store import match_verified_store
from clipdedup.match.verify.verifier import match_verified
from clipdedup.records import FileEntry, Group, RunSummary, UpdateSummary
from clipdedup.trash.chains import group_record, plan_groups
from clipdedup.trash.keep import STRATEGIES
from clipdedup.trash.move import Mover
from clipdedup.util.fsutil import check_import_dirs, check_run_dirs
from clipdedup.util.lock import run_locks


@dataclass
class RunOptions:
    model_id: str | None = None  # None: each DB's own model, or the default model for a new DB
    device: str | None = None
    batch_size: int = 32
    force: bool = False
    clean_orphans: bool = True
    skip_update: bool = False
    retry_unreadable: bool = False  # decode again images that failed before and have not changed
    dry_run: bool = False
    threshold: float | None = None  # None: the model's default
    keeping_logic: str = "largest"
    backend: str | None = None
    top_k: int = 0  # > 0: record each image's k nearest within the threshold in the summary
    progress: bool = False
    log: Callable[[str], object] | None = None
    follow_symlinks: bool = False  # scan through symlinks to files and dirs (loops are cut)
    cross_devices: bool = False  # a followed symlink may lead onto another file system
    use_ctime: bool = True  # a newer ctime than the DB file's means changed (False: --no-ctime)
    cluster: RayCluster | None = None  # encode there (docs/cluster.md); match there too with .match

    def say(self, line: str) -> None:
        (self.log or (lambda s: print(s, file=sys.stderr)))(line)


def _update_or_read(
    image_dir: str,
    db_dir: str,
    opts: RunOptions,
    exclude: list[str],
    label: str,
    s: RunSummary,
    encoder: LazyEncoder,
    *,
    read_only: bool = False,
) -> tuple[UpdateSummary, list[FileEntry]]:
    """Scans `image_dir` and brings its DB up to date. `read_only` (import mode's base DB): images
    missing from the DB or newer than their entry are encoded in memory only, and nothing is
    written to or removed from the DB."""
    links = dict(follow_symlinks=opts.follow_symlinks, cross_devices=opts.cross_devices)
    scan = scan_images(image_dir, exclude, progress=opts.progress, **links)
    entries = scan.entries
    if opts.skip_update:
        u = UpdateSummary(scanned=len(scan.entries), scan_errors=list(scan.errors))
        u.meta = read_meta_as_is(db_dir)
        dim, ctime = u.meta.dim if u.meta else None, opts.use_ctime
        u.db_columns = idx = index_columns(db_dir)  # nothing is written: the load reuses it
        entries = encoded_as_scanned(
            image_dir, db_dir, entries, dim, u.failed, opts.say, use_ctime=ctime, index=idx
        )
    else:
        u = update_db(
            image_dir,
            db_dir,
            opts.model_id,
            device=opts.device,
            batch_size=opts.batch_size,
            force=opts.force,
            retry_unreadable=opts.retry_unreadable,
            clean_orphans=opts.clean_orphans and not read_only,
            dry_run=opts.dry_run or read_only,
            scan=scan,
            progress=opts.progress,
            log=opts.say,
            encoder=encoder,
            use_ctime=opts.use_ctime,
        )
    s.updates[label], s.dirs[label] = u, (image_dir, db_dir)
    return u, entries


def _load_repaired(
    load, image_dir, db_dir, entries, dim, u: UpdateSummary, opts: RunOptions, encoder, index=None
):
    """`load`s a DB's rows (open_embeddings or load_embeddings) -> (entries, rows, errors, missing,
    info). A run that may write re-encodes the images whose DB file failed to load although it
    looked up to date (a bad header, NaN or infinity in its numbers) and loads again. `index`:
    the DB's `index_columns` for the first load (open_embeddings only); the second reads its own."""

    def once(**kw: Any) -> tuple:
        info = dbmod.LoadInfo()
        got = load(db_dir, entries, dim=dim, in_memory=u.in_memory, dry_run=opts.dry_run, info=info, **kw)
        return (*got, info)

    kept, rows, errors, missing, info = once(**({} if index is None else {"index": index}))
    if errors and not (opts.dry_run or opts.skip_update):
        damaged = (entries, errors, encoder, opts.model_id, opts.device, opts.batch_size, opts.say)
        if reencode_damaged(image_dir, db_dir, *damaged, into=u):
            if isinstance(rows, RowStore):
                rows.close()
            kept, rows, errors, missing, info = once()
    return kept, rows, errors, missing, info


def _lazy_encoder(db_dirs: list[str], opts: RunOptions) -> LazyEncoder:
    """The run's one model, loaded only when some image needs encoding: -m, else the model of the
    first of `db_dirs` that has one, else the default model."""

    def load() -> Encoder:
        loader = opts.cluster.load_encoder if opts.cluster is not None else load_encoder
        return loader(resolve_model_id(opts.model_id, *db_dirs), device=opts.device, log=opts.say)

    return LazyEncoder(load)


def _match(x, y, opts: RunOptions, s: RunSummary, model: str, namer: tuple[Callable, Callable]):
    """Pairs within the threshold; for a model with a verifier (builtin:dct), the screened
    candidates its check confirms (every candidate, named by `namer`, in `s.verification`)."""
    fp = find_pairs
    if opts.cluster is not None and opts.cluster.match:
        fp, opts.cluster.log = opts.cluster.find_pairs, opts.say
    s.backend = MATCHERS.get(opts.backend).name if fp is find_pairs else f"ray: {opts.backend or 'auto'}"
    if fp is find_pairs and isinstance(x, RowStore) and encode.verifier_for(model) is None:
        fp = stream.find_pairs_stores  # a GPU backend streams the store
    bar = tqdm(desc=f"match ({s.backend})", unit="tile", disable=not opts.progress, file=sys.stderr)
    t = time.perf_counter()
    if (verifier := encode.verifier_for(model)) is None:
        pairs, dists = fp(x, s.threshold, y=y, backend=opts.backend, progress=bar.update)
    else:
        # a store: only the screening part in RAM, the check parts of the candidates read from it
        verify = partial(match_verified_store if isinstance(x, RowStore) else match_verified, y=y)
        v = verify(x, s.threshold, verifier, find=fp, backend=opts.backend, progress=bar.update)
        s.verification = v.record(*namer)
        pairs, dists = v.pairs[v.confirmed], v.distances[v.confirmed]
    bar.close()
    s.seconds["match"] = time.perf_counter() - t
    s.pairs = len(pairs)
    return pairs, dists


def _rel(kept: list[FileEntry]) -> Callable[[int], str]:
    return lambda k: kept[k].rel


def _model(opts: RunOptions, *us: UpdateSummary) -> str:
    """The model a run's embeddings come from: the DB's, else -m, else the default."""
    return next((u.meta.model_id for u in us if u.meta), opts.model_id or DEFAULT_MODEL)


def _threshold(opts: RunOptions, u: UpdateSummary) -> float:
    if opts.threshold is not None:
        if not opts.threshold >= 0:
            raise UserError(f"threshold {opts.threshold}: must be >= 0")
        return float(opts.threshold)
    return default_threshold(_model(opts, u))


def _mover(image_dir: str, trash_dir: str | None, opts: RunOptions, mode: str) -> Mover | None:
    if trash_dir is None:
        return None
    return Mover(image_dir, trash_dir, dry_run=opts.dry_run, strategy=opts.keeping_logic, mode=mode)


def _close_mover(mover: Mover | None, s: RunSummary) -> None:
    if mover is not None:
        mover.close()
        s.run_id, s.journal = mover.run_id, mover.journal_path


def run_dedup(image_dir: str, db_dir: str, trash_dir: str | None, opts: RunOptions) -> RunSummary:
    """Dedupes `image_dir`: the kept file of each group stays, the others move to `trash_dir`.

    Without `trash_dir`, or with `opts.dry_run`, nothing moves; the groups are still reported.
    """
    STRATEGIES.get(opts.keeping_logic)
    exclude = check_run_dirs(image_dir, db_dir, trash_dir)
    with contextlib.ExitStack() as locks:
        if not opts.dry_run:  # a dry run writes nothing, so it locks nothing
            run_locks(locks, [db_dir], trash_dir, opts.say)
        return _run_dedup_locked(image_dir, db_dir, trash_dir, opts, exclude)


def _run_dedup_locked(
    image_dir: str, db_dir: str, trash_dir: str | None, opts: RunOptions, exclude: list[str]
) -> RunSummary:
    s = RunSummary()
    t = time.perf_counter()
    encoder = _lazy_encoder([db_dir], opts)
    u, entries = _update_or_read(image_dir, db_dir, opts, exclude, "images", s, encoder)
    if likely_to_match(db_dir, bool(u.encoded or u.copied or u.removed or u.in_memory)):
        import_in_background("torch")  # seconds, overlapping the load (not the GIL-bound update)
    s.seconds["update"] = time.perf_counter() - t
    t = time.perf_counter()
    on_ray = opts.cluster is not None and opts.cluster.match  # Ray tasks read the store's snapshot
    s.threshold = _threshold(opts, u)
    model = _model(opts, u)
    v = encode.verifier_for(model)
    kw: dict[str, Any] = dict(backend=opts.backend, write=not opts.dry_run, progress=opts.progress)
    # Every row is read as the store opens only when a full screen is likely (no cache: that pass
    # keeps what it needs); else unchanged snapshot rows are located, not read (RowStore docstring).
    track = v is None and not os.path.exists(cache_path(db_dir))
    load = partial(open_embeddings, track=track, unchecked=not (track or on_ray))
    kept, store, s.load_errors, s.not_in_db, info = _load_repaired(
        load, image_dir, db_dir, entries, u.meta.dim if u.meta else None, u, opts, encoder, u.db_columns
    )
    with store:
        s.loaded = len(kept)
        s.seconds["load"] = time.perf_counter() - t
        for path, reason in s.load_errors:
            opts.say(f"{path}: skipped: {reason}")
        if on_ray:
            pairs, dists = _match(store, None, opts, s, model, (_rel(kept), _rel(kept)))
        else:  # through the match cache; torch is imported only when something is matched
            keys = [e.rel for e in kept]
            m = match_run(store, keys, db_dir, u.meta, s.threshold, v, say=opts.say, **kw)
            s.match_cache, s.pairs, s.backend = m.how, len(m.pairs), m.backend
            s.seconds.update(m.timings)
            if m.verified is not None:
                s.verification = m.verified.record(_rel(kept), _rel(kept))
            pairs, dists = m.pairs, m.dist
        _act_dedup(image_dir, trash_dir, opts, s, kept, pairs, dists)
    for line in snapshot_lines(db_dir, info):  # written on a thread during the run
        opts.say(line)
    return s


def _act_dedup(image_dir, trash_dir, opts: RunOptions, s: RunSummary, kept, pairs, dists) -> None:
    """Top-k, groups, what to keep, and the moves of a dedup run (filled into `s`)."""
    if opts.top_k > 0:
        names = [e.rel for e in kept]
        s.top_k = nearest_by_name(names, names, pairs, dists, opts.top_k)
    t = time.perf_counter()
    # Each group holds only near-duplicates of its kept file: a chained group is split (trash.chains).
    planned = plan_groups(image_dir, kept, pairs, dists, opts.keeping_logic)
    mover = _mover(image_dir, trash_dir, opts, "dedup")
    try:
        for gid, p in enumerate(planned):
            keep_path = os.path.join(image_dir, kept[p.kept].rel)
            moved = []
            if mover is not None:
                for k in p.rows:
                    if k != p.kept:
                        moved.append(mover.move(kept[k], keep_path, kept[p.kept], gid))
            s.groups.append(group_record(kept, p, moved))
    finally:
        _close_mover(mover, s)
    s.seconds["act"] = time.perf_counter() - t


def run_import(
    base_image_dir: str,
    base_db_dir: str,
    import_image_dir: str,
    import_db_dir: str,
    trash_dir: str | None,
    opts: RunOptions,
) -> RunSummary:
    """Moves the files of `import_image_dir` that have a duplicate in `base_image_dir` to `trash_dir`.

    The base image dir and the base DB are only read: base images that the base DB lacks (or holds
    stale) are encoded in memory for this run and never written back. Only the import DB is locked
    and written.
    """
    check_import_dirs(base_image_dir, base_db_dir, import_image_dir, import_db_dir, trash_dir)
    with contextlib.ExitStack() as locks:
        if not opts.dry_run:
            run_locks(locks, [import_db_dir], trash_dir, opts.say)
        return _run_import_locked(
            base_image_dir, base_db_dir, import_image_dir, import_db_dir, trash_dir, opts
        )


def _run_import_locked(
    base_image_dir: str,
    base_db_dir: str,
    import_image_dir: str,
    import_db_dir: str,
    trash_dir: str | None,
    opts: RunOptions,
) -> RunSummary:
    base_real, imp_real = os.path.realpath(base_image_dir), os.path.realpath(import_image_dir)
    exclude_base = check_run_dirs(base_image_dir, base_db_dir, trash_dir)
    exclude_imp = check_run_dirs(import_image_dir, import_db_dir, trash_dir)
    if imp_real.startswith(base_real + os.sep):
        exclude_base.append(imp_real)
    if base_real.startswith(imp_real + os.sep):
        exclude_imp.append(base_real)
    s = RunSummary(import_mode=True)
    cache = _lazy_encoder([base_db_dir, import_db_dir], opts)
    t = time.perf_counter()
    ub, base_entries = _update_or_read(
        base_image_dir, base_db_dir, opts, exclude_base, "base", s, cache, read_only=True
    )
    if ub.in_memory and not opts.dry_run:
        opts.say(
            f"{base_db_dir}: {len(ub.in_memory)} base images missing from the base DB or newer than "
            "their entry were encoded in memory only (import mode never writes the base DB; run "
            "clip-image-deduper on the base dir to update it)"
        )
    ui, imp_entries = _update_or_read(import_image_dir, import_db_dir, opts, exclude_imp, "import", s, cache)
    s.seconds["update"] = time.perf_counter() - t
    if ub.meta and ui.meta and (ub.meta.model_id, ub.meta.dim) != (ui.meta.model_id, ui.meta.dim):
        raise UserError(
            f"base DB holds {ub.meta.describe()} but import DB holds {ui.meta.describe()}; "
            "both must come from one model"
        )
    t = time.perf_counter()
    either = ub.meta or ui.meta
    dim = either.dim if either else None
    # The base DB is only read: no cache (packed snapshot) is refreshed there either.
    binfo = dbmod.LoadInfo()
    # Screen-then-verify (builtin:dct) reads row stores: only the screening parts in RAM; so do
    # Ray's matching tasks (from the DBs' snapshots) and the GPU backends (streamed).
    model = _model(opts, ub, ui)
    on_ray = opts.cluster is not None and opts.cluster.match
    as_store = encode.verifier_for(model) is not None or on_ray or stream.streams(opts.backend, opts.cluster)
    load: Callable[..., tuple] = open_embeddings if as_store else load_embeddings
    with contextlib.ExitStack() as stores:  # a store's snapshot is written on a thread: lines after
        bkept, xb, eb, nb = load(
            base_db_dir, base_entries, dim=dim, in_memory=ub.in_memory, dry_run=True, info=binfo
        )
        if isinstance(xb, RowStore):
            stores.enter_context(xb)
        # the import DB is written: what failed to load is re-encoded, as in a dedup run
        ikept, xi, ei, ni, iinfo = _load_repaired(
            load, import_image_dir, import_db_dir, imp_entries, dim, ui, opts, cache
        )
        if isinstance(xi, RowStore):
            stores.enter_context(xi)
        s.load_errors, s.not_in_db, s.loaded = eb + ei, nb + ni, len(bkept) + len(ikept)
        s.seconds["load"] = time.perf_counter() - t
        for path, reason in s.load_errors:
            opts.say(f"{path}: skipped: {reason}")
        s.threshold = _threshold(opts, ub if ub.meta else ui)
        namer = (lambda a: ikept[a].rel, lambda b: "base:" + bkept[b].rel)
        pairs, dists = _match(xi, xb, opts, s, model, namer)
    for line in snapshot_lines(base_db_dir, binfo) + snapshot_lines(import_db_dir, iinfo):
        opts.say(line)
    if opts.top_k > 0:
        base_names = [e.rel for e in bkept]
        names = [e.rel for e in ikept]
        s.top_k = nearest_by_name(names, base_names, pairs, dists, opts.top_k, symmetric=False)
    t = time.perf_counter()
    matches: dict[int, list[tuple[int, float]]] = {}
    for (a, b), d in zip(pairs, dists):
        matches.setdefault(int(a), []).append((int(b), float(d)))
    mover = _mover(import_image_dir, trash_dir, opts, "import")
    try:
        for gid, (a, ms) in enumerate(matches.items()):
            ms.sort(key=lambda bd: (bd[1], bd[0]))
            nearest = bkept[ms[0][0]]
            moved = []
            if mover is not None:
                moved.append(mover.move(ikept[a], os.path.join(base_image_dir, nearest.rel), nearest, gid))
            dl = [(ikept[a].rel, bkept[b].rel, d) for b, d in ms]
            base_members = [bkept[b].rel for b, _ in ms]
            s.groups.append(Group([ikept[a].rel], nearest.rel, moved, dl, base_members, kept_in_base=True))
    finally:
        _close_mover(mover, s)
    s.seconds["act"] = time.perf_counter() - t
    return s

"""A whole run: update the DB(s), load, match, group, choose what to keep, move the rest.

`run_dedup` dedupes one image dir; `run_import` moves the files of an import dir that have a
duplicate in a base dir (the base dir is only read).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from clipdedup import db as dbmod
from clipdedup import journal as journalmod
from clipdedup.act import MoveResult, depends_on, is_direct, is_inside, move_duplicate
from clipdedup.encode import DEFAULT_MODEL, default_threshold, load_encoder
from clipdedup.errors import UserError
from clipdedup.group import group_pairs
from clipdedup.keep import STRATEGIES, Candidate, choose_keep
from clipdedup.lock import db_lock, trash_lock
from clipdedup.match import MATCHERS, find_pairs
from clipdedup.scan import FileEntry
from clipdedup.update import UpdateSummary, load_embeddings, resolve_model_id, scan_images, update_db


@dataclass
class RunOptions:
    model_id: str | None = None  # None: each DB's own model, or the default model for a new DB
    device: str | None = None
    batch_size: int = 32
    force: bool = False
    clean_orphans: bool = True
    skip_update: bool = False
    dry_run: bool = False
    threshold: float | None = None  # None: the model's default
    keeping_logic: str = "largest"
    backend: str | None = None
    progress: bool = False
    log: object = None
    follow_symlinks: bool = False  # scan through symlinks to files and dirs (loops are cut)

    def say(self, line: str) -> None:
        (self.log or (lambda s: print(s, file=sys.stderr)))(line)


@dataclass
class Group:
    members: list[str]  # relative paths (import mode: import files, then base files as "base:")
    kept: str
    moved: list[MoveResult]
    distances: list[tuple[str, str, float]]


@dataclass
class RunSummary:
    updates: dict[str, UpdateSummary] = field(default_factory=dict)
    loaded: int = 0
    not_in_db: int = 0
    load_errors: list[tuple[str, str]] = field(default_factory=list)
    threshold: float = 0.0
    backend: str = ""
    pairs: int = 0
    groups: list[Group] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None  # the journal's id for this run's moves (for `undo --run`)
    journal: str | None = None  # the journal file, when something moved

    @property
    def moved(self) -> list[MoveResult]:
        return [m for g in self.groups for m in g.moved if m.dest is not None]

    @property
    def move_skipped(self) -> list[MoveResult]:
        return [m for g in self.groups for m in g.moved if m.dest is None]


def _check_dirs(image_dir: str, db_dir: str, trash_dir: str | None) -> list[str]:
    """Refuses layouts that could move files into themselves; returns dirs to leave out of the scan."""
    if not os.path.isdir(image_dir):
        raise UserError(f"{image_dir}: image directory does not exist")
    img = os.path.realpath(image_dir)
    exclude = []
    for name, d in (("trash", trash_dir), ("DB", db_dir)):
        if d is None:
            continue
        real = os.path.realpath(d)
        if real == img or img.startswith(real + os.sep):
            raise UserError(f"{d}: the {name} dir must not be the image dir or contain it")
        if real.startswith(img + os.sep):
            exclude.append(real)
    return exclude


def _update_or_read(
    image_dir: str,
    db_dir: str,
    opts: RunOptions,
    exclude: list[str],
    label: str,
    s: RunSummary,
    encoder_cache: dict,
    *,
    read_only: bool = False,
) -> tuple[UpdateSummary, list[FileEntry]]:
    """Scans `image_dir` and brings its DB up to date. `read_only` (import mode's base DB): images
    missing from the DB or newer than their entry are encoded in memory only, and nothing is
    written to or removed from the DB."""
    scan = scan_images(image_dir, exclude, follow_symlinks=opts.follow_symlinks)
    entries = scan.entries
    if opts.skip_update:
        u = UpdateSummary(scanned=len(scan.entries), scan_errors=list(scan.errors))
        u.meta = dbmod.read_meta(db_dir)
        entries = _encoded_as_scanned(image_dir, db_dir, entries, u, opts)
    else:
        enc = encoder_cache.get("enc")
        u = update_db(
            image_dir,
            db_dir,
            opts.model_id if enc is None else None,
            device=opts.device,
            batch_size=opts.batch_size,
            force=opts.force,
            clean_orphans=opts.clean_orphans and not read_only,
            dry_run=opts.dry_run or read_only,
            scan=scan,
            progress=opts.progress,
            log=opts.say,
            encoder=enc or _lazy_encoder(opts, encoder_cache, scan, db_dir),
        )
    s.updates[label] = u
    return u, entries


def _encoded_as_scanned(
    image_dir: str, db_dir: str, entries: list[FileEntry], u: UpdateSummary, opts: RunOptions
) -> list[FileEntry]:
    """With --skip-update, the images whose embedding no longer matches them (changed since it was
    made) are left out, with a reason: a run never acts on a stale embedding."""
    index = dbmod.index_db(db_dir)
    plan = dbmod.plan_update(entries, index, dim=u.meta.dim if u.meta else None)
    stale = {e.rel for e in plan.to_encode if e.rel in index.files}
    for rel in sorted(stale, key=os.fsencode):
        path = os.path.join(image_dir, rel)
        u.failed.append((path, "changed since it was encoded; left out (--skip-update)"))
        opts.say(f"{path}: skipped: changed since it was encoded (--skip-update)")
    return [e for e in entries if e.rel not in stale]


def _lazy_encoder(opts: RunOptions, cache: dict, scan, db_dir: str):
    """Loads the model only when some image needs encoding (or the DB has no metadata yet)."""
    index = dbmod.index_db(db_dir)
    have = dbmod.read_meta(db_dir)
    plan = dbmod.plan_update(scan.entries, index, dim=have.dim if have else None, force=opts.force)
    if not plan.to_encode and have is not None:
        return None
    cache["enc"] = load_encoder(resolve_model_id(opts.model_id, db_dir), device=opts.device)
    return cache["enc"]


def _match(x, y, opts: RunOptions, s: RunSummary) -> tuple[np.ndarray, np.ndarray]:
    entry = MATCHERS.get(opts.backend)
    s.backend = entry.name
    bar = tqdm(desc=f"match ({entry.name})", unit="tile", disable=not opts.progress, file=sys.stderr)
    t = time.perf_counter()
    pairs, dists = find_pairs(x, s.threshold, y=y, backend=entry.name, progress=bar.update)
    bar.close()
    s.seconds["match"] = time.perf_counter() - t
    s.pairs = len(pairs)
    return pairs, dists


def _threshold(opts: RunOptions, u: UpdateSummary) -> float:
    if opts.threshold is not None:
        if not opts.threshold >= 0:
            raise UserError(f"threshold {opts.threshold}: must be >= 0")
        return float(opts.threshold)
    model = u.meta.model_id if u.meta else (opts.model_id or DEFAULT_MODEL)
    return default_threshold(model)


def _candidate(image_dir: str, e: FileEntry) -> Candidate:
    return Candidate(e.rel, os.path.join(image_dir, e.rel), e.size, e.mtime_ns)


def _choose_keep(image_dir: str, cands: list[Candidate], strategy: str) -> int:
    """`choose_keep`, restricted to the members that are safe to keep.

    A member that depends on another (a symlink to it or through it, or the same file reached
    through a symlinked directory) is never kept, since moving that other would break it; and a
    file reached through a symlink is kept only when no member is reached directly.
    """
    safe = [
        k for k, c in enumerate(cands) if not any(depends_on(c.path, o.path) for o in cands if o is not c)
    ]
    direct = [k for k in safe if is_direct(cands[k].path, image_dir, cands[k].rel)]
    eligible = direct or safe or list(range(len(cands)))
    return eligible[choose_keep([cands[k] for k in eligible], strategy)]


def _take_locks(
    stack: contextlib.ExitStack, opts: RunOptions, db_dirs: list[str], trash_dir: str | None
) -> None:
    """Locks the DB dirs this run writes and its trash dir; a dry run writes nothing and locks nothing."""
    if opts.dry_run:
        return
    taken: set[str] = set()
    for d in db_dirs:
        if os.path.realpath(d) not in taken:
            taken.add(os.path.realpath(d))
            stack.enter_context(db_lock(d, opts.say))
    if trash_dir is not None:
        stack.enter_context(trash_lock(trash_dir, opts.say))


class _Mover:
    """Moves a run's duplicates through one journal (opened at the first move)."""

    def __init__(self, image_dir: str, trash_dir: str | None, opts: RunOptions, mode: str, s: RunSummary):
        self.image_dir, self.trash_dir, self.opts, self.s = image_dir, trash_dir, opts, s
        self.journal = None
        if trash_dir is not None and not opts.dry_run:
            s.run_id = journalmod.new_run_id()
            header = journalmod.run_header(image_dir, trash_dir, opts.keeping_logic, mode)
            self.journal = journalmod.Journal(trash_dir, s.run_id, header)

    def move(self, entry: FileEntry, kept_path: str, kept_entry: FileEntry, group: int) -> MoveResult:
        assert self.trash_dir is not None
        r = move_duplicate(
            self.image_dir,
            self.trash_dir,
            entry,
            kept_path,
            dry_run=self.opts.dry_run,
            kept_entry=kept_entry,
            journal=self.journal,
            group=group,
            strategy=self.opts.keeping_logic,
        )
        if r.dest is not None and self.journal is not None:
            self.s.journal = self.journal.path
        return r

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()


def run_dedup(image_dir: str, db_dir: str, trash_dir: str | None, opts: RunOptions) -> RunSummary:
    """Dedupes `image_dir`: the kept file of each group stays, the others move to `trash_dir`.

    Without `trash_dir`, or with `opts.dry_run`, nothing moves; the groups are still reported.
    """
    STRATEGIES.get(opts.keeping_logic)
    exclude = _check_dirs(image_dir, db_dir, trash_dir)
    with contextlib.ExitStack() as locks:
        _take_locks(locks, opts, [db_dir], trash_dir)
        return _run_dedup_locked(image_dir, db_dir, trash_dir, opts, exclude)


def _run_dedup_locked(
    image_dir: str, db_dir: str, trash_dir: str | None, opts: RunOptions, exclude: list[str]
) -> RunSummary:
    s = RunSummary()
    t = time.perf_counter()
    u, entries = _update_or_read(image_dir, db_dir, opts, exclude, "images", s, {})
    s.seconds["update"] = time.perf_counter() - t
    t = time.perf_counter()
    dim = u.meta.dim if u.meta else None
    kept, x, s.load_errors, s.not_in_db = load_embeddings(
        db_dir, entries, dim=dim, in_memory=u.in_memory, dry_run=opts.dry_run
    )
    s.loaded = len(kept)
    s.seconds["load"] = time.perf_counter() - t
    for path, reason in s.load_errors:
        opts.say(f"{path}: skipped: {reason}")
    s.threshold = _threshold(opts, u)
    pairs, dists = _match(x, None, opts, s)
    t = time.perf_counter()
    groups = group_pairs(len(kept), pairs)
    group_of = {k: g for g, members in enumerate(groups) for k in members}
    dists_by_group: list[list[tuple[str, str, float]]] = [[] for _ in groups]
    for (a, b), d in zip(pairs.tolist(), dists.tolist()):
        dists_by_group[group_of[a]].append((kept[a].rel, kept[b].rel, d))
    mover = _Mover(image_dir, trash_dir, opts, "dedup", s)
    try:
        for gid, (members, dl) in enumerate(zip(groups, dists_by_group)):
            cands = [_candidate(image_dir, kept[k]) for k in members]
            best = _choose_keep(image_dir, cands, opts.keeping_logic)
            moved = []
            if trash_dir is not None:
                for k, c in zip(members, cands):
                    if c is not cands[best]:
                        moved.append(mover.move(kept[k], cands[best].path, kept[members[best]], gid))
            s.groups.append(Group([c.rel for c in cands], cands[best].rel, moved, dl))
    finally:
        mover.close()
    s.seconds["act"] = time.perf_counter() - t
    return s


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
    _check_import_dirs(base_image_dir, base_db_dir, import_image_dir, import_db_dir, trash_dir)
    with contextlib.ExitStack() as locks:
        _take_locks(locks, opts, [import_db_dir], trash_dir)
        return _run_import_locked(
            base_image_dir, base_db_dir, import_image_dir, import_db_dir, trash_dir, opts
        )


def _check_import_dirs(
    base_image_dir: str, base_db_dir: str, import_image_dir: str, import_db_dir: str, trash_dir: str | None
) -> None:
    """Refuses layouts in which import mode would write into the base image dir or the base DB."""
    if os.path.realpath(base_image_dir) == os.path.realpath(import_image_dir):
        raise UserError("the base and import image dirs must differ")
    if os.path.realpath(base_db_dir) == os.path.realpath(import_db_dir):
        raise UserError("the base and import DB dirs must differ: import mode never writes the base DB")
    for name, d in (("import DB", import_db_dir), ("trash", trash_dir), ("import image", import_image_dir)):
        for ro_name, ro in (("base image dir", base_image_dir), ("base DB dir", base_db_dir)):
            if d is None or (name == "import image" and ro_name == "base image dir"):
                continue  # a nested import dir is left out of the base scan, see below
            if is_inside(d, ro):
                raise UserError(
                    f"{d}: the {name} dir must not be inside the {ro_name} {ro}, which import mode only reads"
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
    exclude_base = _check_dirs(base_image_dir, base_db_dir, trash_dir)
    exclude_imp = _check_dirs(import_image_dir, import_db_dir, trash_dir)
    if imp_real.startswith(base_real + os.sep):
        exclude_base.append(imp_real)
    if base_real.startswith(imp_real + os.sep):
        exclude_imp.append(base_real)
    s = RunSummary()
    cache: dict = {}
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
    dim = (ub.meta or ui.meta).dim if (ub.meta or ui.meta) else None
    # The base DB is only read: no cache (packed snapshot) is refreshed there either.
    bkept, xb, eb, nb = load_embeddings(
        base_db_dir, base_entries, dim=dim, in_memory=ub.in_memory, dry_run=True
    )
    ikept, xi, ei, ni = load_embeddings(
        import_db_dir, imp_entries, dim=dim, in_memory=ui.in_memory, dry_run=opts.dry_run
    )
    s.load_errors, s.not_in_db, s.loaded = eb + ei, nb + ni, len(bkept) + len(ikept)
    s.seconds["load"] = time.perf_counter() - t
    for path, reason in s.load_errors:
        opts.say(f"{path}: skipped: {reason}")
    s.threshold = _threshold(opts, ub if ub.meta else ui)
    pairs, dists = _match(xi, xb, opts, s)
    t = time.perf_counter()
    matches: dict[int, list[tuple[int, float]]] = {}
    for (a, b), d in zip(pairs, dists):
        matches.setdefault(int(a), []).append((int(b), float(d)))
    mover = _Mover(import_image_dir, trash_dir, opts, "import", s)
    try:
        for gid, (a, ms) in enumerate(matches.items()):
            ms.sort(key=lambda bd: (bd[1], bd[0]))
            nearest = bkept[ms[0][0]]
            moved = []
            if trash_dir is not None:
                moved.append(mover.move(ikept[a], os.path.join(base_image_dir, nearest.rel), nearest, gid))
            members = [ikept[a].rel] + ["base:" + bkept[b].rel for b, _ in ms]
            dl = [(ikept[a].rel, "base:" + bkept[b].rel, d) for b, d in ms]
            s.groups.append(Group(members, "base:" + nearest.rel, moved, dl))
    finally:
        mover.close()
    s.seconds["act"] = time.perf_counter() - t
    return s

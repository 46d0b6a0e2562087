"""Exact-copy pre-pass: byte-identical images share one embedding instead of being encoded again.

Before the encoder runs, the files that need encoding are grouped by content. Only files whose size
equals another candidate's are read at all; those are compared first by a hash of their head and
tail (two small reads), and only files that still collide are hashed in full with BLAKE3. Each class
of identical files is then encoded once (or not at all, when one of them already has an up-to-date
embedding in the DB) and every copy gets that vector written as its own `.npy`.

No hash is stored between runs: a hash is only ever compared with hashes read in the same run, so
nothing here can go stale. A file that fails to decode fails for all of its copies, and each copy is
reported as skipped; bad files never get an embedding and so are never grouped.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import blake3
import numpy as np

from clipdedup import db as dbmod
from clipdedup.records import FileEntry

PROBE_BYTES = 64 << 10  # head and tail read by the cheap first stage
CHUNK = 1 << 20


def hash_file(path: str | os.PathLike[str]) -> bytes:
    """BLAKE3 digest (32 bytes) of the whole file."""
    h = blake3.blake3()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.digest()


def probe_file(path: str | os.PathLike[str], size: int) -> bytes:
    """BLAKE3 digest of the first and last PROBE_BYTES (the whole file when it is small)."""
    h = blake3.blake3()
    with open(path, "rb") as f:
        h.update(f.read(PROBE_BYTES))
        if size > PROBE_BYTES:
            f.seek(max(PROBE_BYTES, size - PROBE_BYTES))
            h.update(f.read(PROBE_BYTES))
    return h.digest()


def _map(fn: Callable[[str], bytes], paths: Sequence[str], workers: int | None) -> list[bytes | None]:
    """fn over paths in threads (hashing and reads release the GIL); None for an unreadable file."""

    def safe(p: str) -> bytes | None:
        try:
            return fn(p)
        except OSError:
            return None  # the decoder will meet the same file and report why

    workers = workers or max(1, min(8, os.cpu_count() or 1))
    if len(paths) < 4 or workers == 1:
        return [safe(p) for p in paths]
    with ThreadPoolExecutor(workers, thread_name_prefix="clipdedup-hash") as pool:
        return list(pool.map(safe, paths))


def identical_classes(
    paths: Sequence[str], sizes: Sequence[int], *, workers: int | None = None
) -> list[int | None]:
    """Class label per file: files with the same label are byte-identical.

    Args:
        paths: file paths.
        sizes: their sizes in bytes (from the scan; a file whose size changed since simply fails to
            match).
        workers: hashing threads (default: up to 8).

    Returns:
        For each file, the index of the first file of its class (so labels are positions in
        `paths`), or None when the file has no identical twin in `paths` or cannot be read.
    """
    labels: list[int | None] = [None] * len(paths)
    by_size: dict[int, list[int]] = {}
    for k, s in enumerate(sizes):
        by_size.setdefault(s, []).append(k)
    cand = [k for ks in by_size.values() if len(ks) > 1 for k in ks]
    probes = _map(lambda p: probe_file(p, os.path.getsize(p)), [paths[k] for k in cand], workers)
    by_probe: dict[tuple[int, bytes], list[int]] = {}
    for k, pr in zip(cand, probes):
        if pr is not None:
            by_probe.setdefault((sizes[k], pr), []).append(k)
    # Files no larger than two probes were hashed whole by the probe already.
    full = [k for (s, _), ks in by_probe.items() if len(ks) > 1 and s > 2 * PROBE_BYTES for k in ks]
    digests = dict(zip(full, _map(hash_file, [paths[k] for k in full], workers)))
    by_content: dict[tuple[int, bytes, bytes | None], list[int]] = {}
    for (s, pr), ks in by_probe.items():
        if len(ks) < 2:
            continue
        for k in ks:
            if s > 2 * PROBE_BYTES and digests[k] is None:
                continue
            by_content.setdefault((s, pr, digests.get(k)), []).append(k)
    for ks in by_content.values():
        if len(ks) > 1:
            first = min(ks)
            for k in ks:
                labels[k] = first
    return labels


def identical_classes_ref(paths: Sequence[str]) -> list[int | None]:
    """Plain reference: compare whole file contents."""
    data: list[bytes | None] = []
    for p in paths:
        try:
            with open(p, "rb") as f:
                data.append(f.read())
        except OSError:
            data.append(None)
    labels: list[int | None] = [None] * len(paths)
    for k, d in enumerate(data):
        if d is None:
            continue
        twins = [j for j, e in enumerate(data) if e == d]
        if len(twins) > 1:
            labels[k] = twins[0]
    return labels


@dataclass
class CopyPlan:
    """What the encoder still has to do, and which files take their vector from another file."""

    to_encode: list[FileEntry]  # one file per content class, plus files with unique content
    from_encoded: dict[str, list[FileEntry]] = field(default_factory=dict)  # encoded rel -> copies
    from_db: list[tuple[FileEntry, np.ndarray]] = field(default_factory=list)  # copy, DB vector
    hashed: int = 0  # files read by the pre-pass


def plan_copies(
    image_dir: str | os.PathLike[str],
    to_encode: Sequence[FileEntry],
    up_to_date: Sequence[FileEntry],
    index: dbmod.DBIndex,
    dim: int | None,
    *,
    workers: int | None = None,
) -> CopyPlan:
    """Groups `to_encode` by content, against each other and against up-to-date DB images.

    Up-to-date images are only read when their size equals that of a file to encode. A copy of an
    up-to-date image takes the DB's vector (when that DB file reads back fine); the other classes
    are encoded once, through their first file in scan order.
    """
    sizes_todo = {e.size for e in to_encode}
    known = [e for e in up_to_date if e.size in sizes_todo and e.rel in index.files]
    entries = list(to_encode) + known
    if len(entries) < 2:
        return CopyPlan(list(to_encode))
    paths = [os.path.join(image_dir, e.rel) for e in entries]
    labels = identical_classes(paths, [e.size for e in entries], workers=workers)
    members: dict[int, list[int]] = {}
    for k, lab in enumerate(labels):
        if lab is not None:
            members.setdefault(lab, []).append(k)
    count: dict[int, int] = {}
    for e in entries:
        count[e.size] = count.get(e.size, 0) + 1
    plan = CopyPlan([], hashed=sum(1 for e in entries if count[e.size] > 1))
    n_todo = len(to_encode)
    db_source = {}  # class label -> DB vector of an up-to-date member
    db_ks = [ks for ks in members.values() if any(k >= n_todo for k in ks)]
    if db_ks:
        srcs = [index.files[entries[next(k for k in ks if k >= n_todo)].rel] for ks in db_ks]
        mat, ok, _ = dbmod.load_rows(srcs, dim)
        for ks, row, good in zip(db_ks, mat, ok):
            if good:
                db_source[labels[ks[0]]] = row
    for k, e in enumerate(to_encode):
        lab = labels[k]
        if lab is None:
            plan.to_encode.append(e)
        elif lab in db_source:
            plan.from_db.append((e, db_source[lab]))
        elif lab == k:
            plan.to_encode.append(e)  # first of its class (or its DB twin could not be read)
        else:
            plan.from_encoded.setdefault(entries[lab].rel, []).append(e)
    return plan


def fill_copies(
    plan: CopyPlan,
    image_dir: str | os.PathLike[str],
    db_dir: str | os.PathLike[str],
    failed: Sequence[tuple[str, str]],
    in_memory: dict[str, np.ndarray],
    *,
    dry_run: bool,
    dim: int | None,
) -> tuple[int, list[tuple[str, str]]]:
    """Gives every copy its source's vector, after the encoder has run on `plan.to_encode`.

    Args:
        failed: the encoder's (path, reason) failures; the path may be relative or joined to
            `image_dir`. A copy of a failed file fails with the same reason.
        in_memory: the dry run's vectors (filled here too when `dry_run`).

    Returns:
        (number of copies given a vector, [(copy path, reason)] for copies of files that failed).
    """
    why_failed = {p: r for p, r in failed}
    done = 0
    bad: list[tuple[str, str]] = []

    def put(e: FileEntry, vec: np.ndarray) -> None:
        if dry_run:
            in_memory[e.rel] = np.array(vec, np.float32)
        else:
            dbmod.write_embedding(db_dir, e.rel, vec, e.mtime_ns)

    for e, db_vec in plan.from_db:
        put(e, db_vec)
        done += 1
    for rel, copies in plan.from_encoded.items():
        src = os.path.join(image_dir, rel)
        reason = why_failed.get(rel) or why_failed.get(src)
        vec = None
        if reason is None:
            vec = in_memory.get(rel) if dry_run else _read_back(db_dir, rel, dim)
        if vec is None:
            reason = f"byte-identical to {src}, which was skipped: {reason or 'no embedding'}"
            bad += [(os.path.join(image_dir, c.rel), reason) for c in copies]
            continue
        for c in copies:
            put(c, vec)
            done += 1
    return done, bad


def _read_back(db_dir: str | os.PathLike[str], rel: str, dim: int | None) -> np.ndarray | None:
    path = dbmod.npy_path(db_dir, rel)
    if not os.path.exists(path):
        return None
    st = os.stat(path)
    f = dbmod.DBFile(rel, path, st.st_mtime_ns, st.st_size, False)
    mat, ok, _ = dbmod.load_rows([f], dim)
    return mat[0] if ok[0] else None


def finish_update(plan: CopyPlan, image_dir, db_dir, s, *, dry_run: bool, log) -> None:
    """`fill_copies` for `update_db`: counts copies in `s.copied`, failures in `s.failed`, and logs."""
    dim = s.meta.dim if s.meta is not None else None
    done, bad = fill_copies(plan, image_dir, db_dir, s.failed, s.in_memory, dry_run=dry_run, dim=dim)
    s.copied += done
    for path, reason in bad:
        s.failed.append((path, reason))
        log(f"{path}: skipped: {reason}")

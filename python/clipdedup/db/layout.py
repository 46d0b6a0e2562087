"""The embedding DB: a directory mirroring the image tree, one float32 .npy vector per image.

`pics/a/b.jpg` is stored as `db/a/b.jpg.npy`. `db/clipdedup-db.json` records the model id, the
embedding dim, the dtype and the preprocessing; a DB is never filled from two models. The original
tool's `.npz` files (key `clip_embedding`) are read too.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from clipdedup import native
from clipdedup.db.snapshot import STAT_FIELDS
from clipdedup.errors import DBMismatchError, UserError
from clipdedup.records import FORMAT_VERSION, DBMeta, FileEntry
from clipdedup.scan import scan_native
from clipdedup.util.fsutil import NAME_MAX, TMP_MARK, atomic_file

META_NAME = "clipdedup-db.json"
# A load error: a row with NaN or infinity (or a value whose square overflows float32, as in a random
# body) takes part in no pair, so its image would silently drop out of matching; a run that may
# write the DB re-encodes it (`ingest.update.reencode_damaged`).
NOT_FINITE = "not a usable embedding (NaN, infinity, or values too large to square in float32)"


def usable_rows(blk: np.ndarray) -> np.ndarray:
    """bool (k,): rows of float32 `blk` (k, D) whose float32 sum of squares is finite (so every value
    is finite, and matching can square them)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.isfinite(np.einsum("ij,ij->i", blk, blk))


NPY_SUFFIX = ".npy"
NPZ_SUFFIX = ".npz"
NPZ_KEY = "clip_embedding"


def meta_path(db_dir: str | os.PathLike[str]) -> Path:
    return Path(db_dir) / META_NAME


def read_meta(db_dir: str | os.PathLike[str]) -> DBMeta | None:
    p = meta_path(db_dir)
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UserError(f"{p}: unreadable DB metadata ({e}); move it away to rebuild") from e
    if not isinstance(raw, dict):
        raise UserError(f"{p}: DB metadata is not a JSON object; move it away to rebuild")
    for name, (ok, expected) in _META_RULES.items():
        if name not in raw:
            if name in ("model_id", "dim"):
                raise UserError(f"{p}: incomplete DB metadata (no {name!r}); move it away to rebuild")
            continue
        if not ok(raw[name]):
            raise UserError(
                f"{p}: field {name!r} is {json.dumps(raw[name])[:60]}, expected {expected}; "
                "the file is damaged: move it away to rebuild"
            )
    return DBMeta(**{k: raw[k] for k in DBMeta.__dataclass_fields__ if k in raw})


MAX_DIM = 1 << 16


def _whole(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# What each field of clipdedup-db.json may hold: a check and its description for the error line.
_META_RULES = {
    "model_id": (lambda v: isinstance(v, str) and v.strip() != "", "a model id (a non-empty string)"),
    "dim": (lambda v: _whole(v) and 1 <= v <= MAX_DIM, f"a whole number from 1 to {MAX_DIM}"),
    "dtype": (lambda v: v == "float32", '"float32"'),
    "normalized": (lambda v: isinstance(v, bool), "true or false"),
    "preprocess": (lambda v: isinstance(v, dict), "a JSON object"),
    "format_version": (
        lambda v: _whole(v) and 1 <= v <= FORMAT_VERSION,
        f"a format version up to {FORMAT_VERSION} (a newer clipdedup wrote this DB?)",
    ),
}


def write_meta(db_dir: str | os.PathLike[str], meta: DBMeta) -> None:
    data = json.dumps(asdict(meta), indent=2, sort_keys=True).encode()
    atomic_write(meta_path(db_dir), data)


def check_meta(db_dir: str | os.PathLike[str], want: DBMeta) -> DBMeta | None:
    """Raises DBMismatchError when the DB at `db_dir` was written by another model."""
    have = read_meta(db_dir)
    if have is None:
        return None
    if have.model_id != want.model_id or have.dim != want.dim or have.normalized != want.normalized:
        raise mismatch_error(db_dir, have, want.describe())
    return have


def mismatch_error(db_dir: str | os.PathLike[str], have: DBMeta, uses: str) -> DBMismatchError:
    """The one-line refusal to mix a DB of `have` with a run that uses `uses`."""
    return DBMismatchError(
        f"{db_dir}: DB holds {have.describe()}, this run uses {uses}; "
        "use a separate --db-dir (or -m with the DB's model)"
    )


def npy_path(db_dir: str | os.PathLike[str], rel: str) -> str:
    return os.path.join(db_dir, rel + NPY_SUFFIX)


def atomic_write(path: str | os.PathLike[str], data: bytes, *, mtime_ns: int | None = None) -> None:
    """Writes `data` to `path` atomically (see `clipdedup.util.fsutil.atomic_file`); a stale temp file is
    removed by the next orphan clean-up. `mtime_ns`, if given, is set on the file before the rename."""
    with atomic_file(path, mtime_ns=mtime_ns) as f:
        f.write(data)


def npy_bytes(vec: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(vec, dtype="<f4"), allow_pickle=False)
    return buf.getvalue()


def npy_file_size(dim: int) -> int:
    return len(npy_bytes(np.zeros(dim, np.float32)))


def write_embedding(
    db_dir: str | os.PathLike[str], rel: str, vec: np.ndarray, image_mtime_ns: int | None = None
) -> None:
    """Writes one embedding atomically. The .npy gets the image's scanned mtime, so any later change
    of the image's mtime (newer, or older as after a restore from backup) is seen as stale, whatever
    the file system's timestamp granularity."""
    atomic_write(npy_path(db_dir, rel), npy_bytes(vec), mtime_ns=image_mtime_ns)


@dataclass(frozen=True)
class DBFile:
    rel: str  # relative image path this embedding belongs to
    path: str  # absolute path of the .npy / .npz file
    mtime_ns: int
    size: int
    legacy: bool  # an original-tool .npz
    ctime_ns: int = 0  # with ino: tells a rewritten file from an unchanged one (see snapshot.py)
    ino: int = 0

    @property
    def key(self) -> str:
        """The file's path relative to the DB root."""
        return self.rel + (NPZ_SUFFIX if self.legacy else NPY_SUFFIX)


_DBFILE_FIELDS = ["rel", "path", "mtime_ns", "size", "legacy", "ctime_ns", "ino"]


@dataclass
class DBIndex:
    files: dict[str, DBFile]  # by image rel path; a .npy shadows a .npz of the same image
    temp_files: list[str]
    shadowed: list[str]  # .npz files that have a .npy beside them
    started_ns: int = 0  # time.time_ns() before the files were stat'ed
    columns: DBColumns | None = None  # the same files as columns (`index_db` fills it)


@dataclass
class DBColumns:
    """`index_db`'s answer as columns, for runs over large DBs (no `DBFile` object per file).

    Attributes:
        root: the DB root.
        row: image rel path -> column index.
        legacy: bool (M,): the file is an original-tool .npz (else our .npy).
        mtime_ns, size, ctime_ns: int64 (M,); ino: uint64 (M,).
        started_ns: time.time_ns() before the files were stat'ed.
    """

    root: str
    row: dict[str, int]
    legacy: np.ndarray
    stats: dict[str, np.ndarray]
    started_ns: int

    def stale(self, entries: Sequence[FileEntry], dim: int | None, *, use_ctime: bool = True) -> set[str]:
        """The rel paths of `entries` whose DB file is out of date (`layout.is_stale`); entries
        the DB lacks are not in it."""
        expected = npy_file_size(dim) if dim else None
        mtime, size, ctime = self.stats["mtime_ns"], self.stats["size"], self.stats["ctime_ns"]
        out = set()
        for e in entries:
            k = self.row.get(e.rel, -1)
            if k < 0:
                continue
            c = int(ctime[k]) if use_ctime else None
            if is_stale(e, int(mtime[k]), int(size[k]), bool(self.legacy[k]), expected, c):
                out.add(e.rel)
        return out


def columns_of_scan(
    root: str,
    out: native.ScanOutput | None,
    picked: np.ndarray,
    rels: list[str],
    legacy: list[bool],
    started_ns: int,
) -> DBColumns:
    """`DBColumns` of the rows `picked` of a DB scan `out` (`scan_native`; None when empty), whose
    image rel paths are `rels` and whose files are legacy .npz where `legacy`."""
    if out is None:
        stats = {k: np.zeros(0, np.uint64 if k == "ino" else np.int64) for k in STAT_FIELDS}
    else:
        cols = {"mtime_ns": out.mtime_ns(), "size": out.size(), "ctime_ns": out.ctime_ns(), "ino": out.ino()}
        stats = {k: np.ascontiguousarray(cols[k][picked]) for k in STAT_FIELDS}
    row = dict(zip(rels, range(len(rels))))
    return DBColumns(root, row, np.array(legacy, bool).reshape(-1), stats, started_ns)


def index_db(db_dir: str | os.PathLike[str]) -> DBIndex:
    """Every embedding file under `db_dir` (native scan), by image path; the snapshot is not one."""
    started = time.time_ns()
    if not os.path.isdir(db_dir):
        empty = columns_of_scan(os.fspath(db_dir), None, np.zeros(0, np.int64), [], [], started)
        return DBIndex({}, [], [], started, empty)
    out, _errors = scan_native(db_dir, suffixes=None)
    picked, temp_rows, shadowed_rows = out.classify_db(TMP_MARK)
    prefix = os.fsencode(os.path.join(db_dir, ""))
    rels = out.names(picked, b"", len(NPY_SUFFIX))  # NPY_SUFFIX and NPZ_SUFFIX: 4 bytes each
    full = out.names(picked, prefix)
    cols = [
        rels,
        full,
        out.mtime_ns()[picked].tolist(),
        out.size()[picked].tolist(),
        [p.endswith(NPZ_SUFFIX) for p in full],
        out.ctime_ns()[picked].tolist(),
        out.ino()[picked].tolist(),
    ]
    files = dict(zip(rels, native.construct(DBFile, _DBFILE_FIELDS, cols)))
    temps = out.names(np.array(temp_rows, np.int64), prefix)
    shadowed = out.names(np.array(shadowed_rows, np.int64), prefix)
    columns = columns_of_scan(os.fspath(db_dir), out, np.asarray(picked, np.int64), rels, cols[4], started)
    return DBIndex(files, temps, shadowed, started, columns)


@dataclass
class UpdatePlan:
    to_encode: list[FileEntry]
    up_to_date: list[FileEntry]
    orphans: list[str]  # DB files whose image is gone, and stale temp files (absolute paths)
    unnamable: list[FileEntry] = field(default_factory=list)  # their .npy name would be too long


def npy_name_fits(rel: str, limit: int = NAME_MAX) -> bool:
    """Whether the DB file of image `rel` can exist: its last part plus `.npy` fits `limit` bytes."""
    return len(os.fsencode(rel.rsplit("/", 1)[-1])) + len(NPY_SUFFIX) <= limit


def unnamable_reason(rel: str, limit: int = NAME_MAX) -> str:
    n = len(os.fsencode(rel.rsplit("/", 1)[-1]))  # the image name, in bytes
    fix = "rename it to include it"
    return f"name too long for its DB file ({n} bytes + {NPY_SUFFIX} > {limit}); skipped, {fix}"


def plan_update(
    images: Sequence[FileEntry],
    index: DBIndex,
    *,
    dim: int | None,
    force: bool = False,
    use_ctime: bool = True,
) -> UpdatePlan:
    """Which images need (re)encoding and which DB files are orphans.

    An image is encoded when it has no DB file, when its mtime differs from its .npy's (our .npy
    files carry the image's mtime) or is newer than its legacy .npz, when (`use_ctime`) its ctime is
    newer than its DB file's (see `is_stale`), when its .npy has the wrong size for the DB's dim (a
    damaged file), or when `force` is set.
    """
    expected = npy_file_size(dim) if dim else None
    to_encode: list[FileEntry] = []
    fresh: list[FileEntry] = []
    unnamable: list[FileEntry] = []
    for img in images:
        f = index.files.get(img.rel)
        if f is None and not npy_name_fits(img.rel):
            unnamable.append(img)
            continue
        ctime = f.ctime_ns if f is not None and use_ctime else None
        stale = force or f is None or is_stale(img, f.mtime_ns, f.size, f.legacy, expected, ctime)
        (to_encode if stale else fresh).append(img)
    present = {img.rel for img in images}
    orphans = [f.path for rel, f in index.files.items() if rel not in present]
    orphans += index.temp_files
    orphans.sort()
    return UpdatePlan(to_encode, fresh, orphans, unnamable)


def is_stale(
    img: FileEntry,
    mtime_ns: int,
    size: int,
    legacy: bool,
    expected_size: int | None,
    ctime_ns: int | None = None,
) -> bool:
    """Whether the DB file (mtime_ns, size, legacy .npz or not) of `img` is out of date (see
    `plan_update`); `expected_size` is the .npy size for the DB's dim, if known.

    `ctime_ns`: the DB file's ctime, or None to leave ctimes out. Content rewritten in place with
    its size and mtime put back (`touch -r`) still moves the image's ctime, which no one can set:
    an image whose ctime is newer than its DB file (written after the image was read) changed since.
    """
    if ctime_ns is not None and img.ctime_ns > ctime_ns:
        return True
    if legacy:
        return img.mtime_ns > mtime_ns
    return img.mtime_ns != mtime_ns or (expected_size is not None and size != expected_size)


def remove_orphans(db_dir: str | os.PathLike[str], paths: Sequence[str]) -> list[str]:
    """Removes DB files (never images) and then the DB directories left empty."""
    removed = []
    dirs = set()
    for p in paths:
        try:
            os.unlink(p)
            removed.append(p)
            dirs.add(os.path.dirname(p))
        except FileNotFoundError:
            pass
    root = os.path.realpath(db_dir)
    for d in sorted(dirs, key=len, reverse=True):
        while os.path.realpath(d) != root and d.startswith(os.fspath(db_dir)):
            try:
                os.rmdir(d)
            except OSError:
                break
            d = os.path.dirname(d)
    return removed


__all__ = [
    "DBFile",
    "DBIndex",
    "DBMeta",
    "UpdatePlan",
    "atomic_write",
    "check_meta",
    "index_db",
    "meta_path",
    "npy_bytes",
    "npy_file_size",
    "npy_path",
    "plan_update",
    "read_meta",
    "remove_orphans",
    "write_embedding",
    "write_meta",
]

"""The plain records handed from one stage to the next: what a scan found, the DB's metadata, what an
update did, how a load went, what a move did, the groups of a run and its summary. Every stage
imports these from here; none of them imports a stage."""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

FORMAT_VERSION = 1  # of the DB metadata file


@dataclass(frozen=True)
class FileEntry:
    rel: str
    mtime_ns: int
    size: int
    # The inode's change time as scanned (0: not known). Not part of equality: an entry names a file
    # version by size and mtime; the DB compares ctimes on its own (db.layout.is_stale).
    ctime_ns: int = field(default=0, compare=False)


@dataclass
class ScanResult:
    entries: list[FileEntry]
    errors: list[tuple[str, str]]  # (path, one-line reason), sorted


@dataclass
class DBMeta:
    model_id: str
    dim: int
    dtype: str = "float32"
    normalized: bool = True
    preprocess: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def describe(self) -> str:
        unit = "" if self.normalized else ", vectors not normalized"
        return f"model {self.model_id}, dim {self.dim}{unit}"


class SnapshotState(str, enum.Enum):
    """What a load made of a DB's packed snapshot (`LoadInfo.snapshot`)."""

    NOT_USED = "not used"  # not asked to use one
    USED = "used"
    MISSING = "missing"
    CORRUPT = "corrupt"  # damaged; the rows were read from the .npy files (detail says how)
    UNREADABLE = "unreadable"  # an I/O error reading it
    OTHER_DIM = "other dim"  # written for another embedding dim


class SnapshotStatus(NamedTuple):
    state: SnapshotState
    detail: str = ""  # what was wrong with it, for the one line a run prints

    def line(self) -> str:
        return f"{self.state.value}: {self.detail}" if self.detail else self.state.value


@dataclass
class LoadInfo:
    """How a load went, for logs and tests.

    A new snapshot is written on a thread after the load returns (`writer`); reading `written` or
    `write_error` waits for it.
    """

    snapshot: SnapshotState = SnapshotState.NOT_USED
    snapshot_detail: str = ""  # what was wrong with it (corrupt, unreadable, other dim)
    from_snapshot: int = 0  # rows taken from the snapshot
    from_files: int = 0  # rows read from .npy / .npz files
    writer: threading.Thread | None = None  # the snapshot write under way, if any
    _written: bool = False
    _write_error: str = ""

    def wait(self) -> None:
        """Waits for the snapshot write, if one is under way."""
        if self.writer is not None and self.writer is not threading.current_thread():
            self.writer.join()

    def done_writing(self, written: bool, error: str) -> None:
        self._written, self._write_error = written, error

    @property
    def written(self) -> bool:
        """A new snapshot was written."""
        self.wait()
        return self._written

    @property
    def write_error(self) -> str:
        """Why a new snapshot could not be written ('' if it was, or none was due)."""
        self.wait()
        return self._write_error


@dataclass
class UpdateSummary:
    scanned: int = 0
    encoded: int = 0
    copied: int = 0  # byte-identical copies given the embedding of their twin (clipdedup.ingest.prepass)
    up_to_date: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (image path, reason)
    removed: list[str] = field(default_factory=list)  # DB files removed as orphans
    orphans: list[str] = field(default_factory=list)  # orphans found (removed or not)
    scan_errors: list[tuple[str, str]] = field(default_factory=list)
    # Embeddings computed but not written (dry run): image rel -> vector.
    in_memory: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    meta: DBMeta | None = None
    # The DB's embedding files as the update indexed them (`db.layout.DBColumns`), when it wrote
    # or removed none of them: the load reuses it instead of listing the DB again.
    # (typed `object`: records import no stage)
    db_columns: object | None = field(default=None, repr=False, compare=False)


@dataclass
class MoveResult:
    rel: str
    source: str
    dest: str | None  # None when skipped
    reason: str | None = None  # why skipped
    error: int | None = None  # errno when the move was tried and failed (not a refusal)
    tried: bool = True  # False when a Mover had stopped (see trash.move.STOP_ERRNOS) before this file

    @property
    def failed(self) -> bool:
        """The move was due but could not be made (an I/O error, or not tried after one)."""
        return self.error is not None


@dataclass
class Group:
    """One group of duplicates. Dedup mode: `members` are paths relative to the image dir, `kept`
    is one of them and every other member is paired with it (a chained group is split, see
    trash.chains), `distances` are (member, member, d). Import mode: `members` holds the one
    import-dir file, `base_members` the base-dir files it matched (nearest first), `kept` is the
    nearest base file (`kept_in_base`), and each distance is (import member, base member, d)."""

    members: list[str]
    kept: str
    moved: list[MoveResult]
    distances: list[tuple[str, str, float]]
    base_members: list[str] = field(default_factory=list)
    kept_in_base: bool = False
    # Dedup mode: members of the chained group that are a near-duplicate of no kept file, with why
    # they stay (trash.chains); the kept file of the group this one was split from, if it was.
    stayed: list[tuple[str, str]] = field(default_factory=list)
    split_from: str | None = None
    # Pairs from a member or a stay of this group to a file outside it: what chained the group to
    # the others split from it (each pair of a run is in one group's `distances` or `links`).
    links: list[tuple[str, str, float]] = field(default_factory=list)


@dataclass
class CandidatePair:
    """A pair within the screening threshold of a model with a verifier (builtin:dct), by name."""

    a: str
    b: str  # import mode: a base file, "base:" + its path
    distance: float  # screening distance
    score: float  # check score (clipdedup.match.verify.verifier)
    confirmed: bool  # score >= the verifier's bar: a duplicate pair


@dataclass
class Verification:
    """What verification did in a run."""

    measure: str
    min_score: float
    seconds: float
    candidates: list[CandidatePair] = field(default_factory=list)

    @property
    def confirmed(self) -> int:
        return sum(c.confirmed for c in self.candidates)


@dataclass
class RunSummary:
    updates: dict[str, UpdateSummary] = field(default_factory=dict)
    loaded: int = 0
    not_in_db: int = 0
    load_errors: list[tuple[str, str]] = field(default_factory=list)
    threshold: float = 0.0
    backend: str = ""
    pairs: int = 0
    # name -> [[neighbour, distance], ...]; import mode: import file -> base files
    top_k: dict[str, list[list]] = field(default_factory=dict)
    groups: list[Group] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    match_cache: str = ""  # how the match cache was used ("reused ...", "full match (why)")
    run_id: str | None = None  # the journal's id for this run's moves (for `undo --run`)
    journal: str | None = None  # the journal file, when something moved
    import_mode: bool = False  # groups are import files matched to base files (see Group)
    verification: Verification | None = None  # models with a verifier: every screened candidate
    # update label ("images"; import mode "base", "import") -> (image dir, DB dir), as given
    dirs: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def moved(self) -> list[MoveResult]:
        return [m for g in self.groups for m in g.moved if m.dest is not None]

    @property
    def move_skipped(self) -> list[MoveResult]:
        return [m for g in self.groups for m in g.moved if m.dest is None]

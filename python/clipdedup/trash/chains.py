"""A dedup run's groups as they are acted on: every file that moves is itself a near-duplicate of
the file kept.

Pairs -> connected groups (`group.group_pairs`) -> each group split (`group.split_chains`): the keep
strategy picks the kept file, the members paired with it (within the threshold; for a model with a
verifier, confirmed by its check) are its duplicates, and the rest of a chained group (A~B, B~C,
A!~C) is regrouped among itself or stays, with a reason. Deterministic: rows are in scan order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from clipdedup.records import FileEntry, Group, MoveResult
from clipdedup.trash.group import Stay, adjacency, group_pairs, split_chains
from clipdedup.trash.keep import Candidate
from clipdedup.trash.move import choose_keep_safe


@dataclass
class Planned:
    """One group to act on: `rows` ascending (the kept row among them), the pairs between them,
    the rows left out of it that stay, the kept row of the group it was split from, and `links`:
    the pairs that joined it to the other groups of its chain or to its stays (each pair of the
    run is in exactly one group's `distances` or `links`)."""

    kept: int
    rows: list[int]
    distances: list[tuple[int, int, float]]
    stays: list[Stay]
    split_from: int | None
    links: list[tuple[int, int, float]] = field(default_factory=list)


def plan_groups(
    image_dir: str, entries: Sequence[FileEntry], pairs: np.ndarray, dists: np.ndarray, strategy: str
) -> list[Planned]:
    """The groups of a dedup run over `entries` (rows of `pairs`), in a fixed order."""
    adj = adjacency(pairs)
    cands: dict[int, Candidate] = {}
    dirs: dict[str, str] = {}  # real paths of the directories met, for every group's keep choice

    def choose(comp: list[int]) -> int:
        cs = [cands.setdefault(k, _candidate(image_dir, entries[k])) for k in comp]
        return comp[choose_keep_safe(image_dir, cs, strategy, dirs)]

    out: list[Planned] = []
    where: dict[int, int] = {}  # row -> its group
    stay_at: dict[int, int] = {}  # row that stays -> the group that lists it
    for members in group_pairs(len(entries), pairs):
        parts, stays = split_chains(members, adj, choose)
        first = len(out)
        for part in parts:
            rows = sorted((part.kept, *part.dups))
            where.update((k, len(out)) for k in rows)
            out.append(Planned(part.kept, rows, [], [], part.split_from))
        at = {p.kept: first + j for j, p in enumerate(parts)}
        for st in stays:
            out[at[st.kept]].stays.append(st)
            stay_at[st.member] = at[st.kept]
    for (a, b), d in zip(np.asarray(pairs).reshape(-1, 2).tolist(), np.asarray(dists).tolist()):
        if where.get(a, -1) == where.get(b, -2):
            out[where[a]].distances.append((a, b, d))
        else:
            out[min(where.get(a, stay_at.get(a, -1)), where.get(b, stay_at.get(b, -1)))].links.append(
                (a, b, d)
            )
    return out


def _candidate(image_dir: str, e: FileEntry) -> Candidate:
    return Candidate(e.rel, os.path.join(image_dir, e.rel), e.size, e.mtime_ns)


def stay_reason(entries: Sequence[FileEntry], st: Stay) -> str:
    """Why a member of a chained group does not move (one line)."""
    via = [entries[k].rel for k in st.via]
    more = f" and {len(via) - 1} more" if len(via) > 1 else ""
    return (
        f"not a near-duplicate of the kept file {entries[st.kept].rel}: it joined the group only "
        f"through {via[0] if via else '?'}{more}"
    )


def group_record(entries: Sequence[FileEntry], p: Planned, moved: list[MoveResult]) -> Group:
    """The run's record of planned group `p` after its moves (work in proportion to the group,
    not to `entries`: a run records every group)."""

    def name(k: int) -> str:
        return entries[k].rel

    return Group(
        [name(k) for k in p.rows],
        name(p.kept),
        moved,
        [(name(a), name(b), d) for a, b, d in p.distances],
        stayed=[(name(st.member), stay_reason(entries, st)) for st in p.stays],
        split_from=None if p.split_from is None else name(p.split_from),
        links=[(name(a), name(b), d) for a, b, d in p.links],
    )

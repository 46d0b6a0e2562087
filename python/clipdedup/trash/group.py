"""Pairs -> groups (connected components), deterministically; and the split of a chained group so
that each part holds only near-duplicates of its kept file (`split_chains`).

Indices refer to rows in the sorted scan order, so the same files always give the same groups in the
same order, whatever order the file system listed them in.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np


def group_pairs(n: int, pairs: np.ndarray) -> list[list[int]]:
    """Connected components of size >= 2 of the graph on n nodes with edges `pairs` (P, 2).

    Returns groups as ascending index lists, ordered by their smallest index.
    """
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if not len(pairs):
        return []
    a, b = pairs[:, 0], pairs[:, 1]
    root = np.arange(n, dtype=np.int64)
    # Whole-array union-find: each round hooks the larger root of every edge under the smaller one,
    # then halves the paths until each node points at its root; a component's root ends up as its
    # smallest member. Rounds are few (the roots' labels only fall), each one numpy work on P edges.
    while True:
        ra, rb = root[a], root[b]
        differ = ra != rb
        if not differ.any():
            break
        ra, rb = ra[differ], rb[differ]
        np.minimum.at(root, np.maximum(ra, rb), np.minimum(ra, rb))
        while True:
            up = root[root]
            if np.array_equal(up, root):
                break
            root = up
    touched = np.unique(pairs)
    order = np.lexsort((touched, root[touched]))
    nodes, roots = touched[order], root[touched][order]
    cuts = np.flatnonzero(np.diff(roots)) + 1
    return [g.tolist() for g in np.split(nodes, cuts) if len(g) > 1]


def group_pairs_ref(n: int, pairs: np.ndarray) -> list[list[int]]:
    """Plain reference: repeated graph search from each unvisited node."""
    adj: dict[int, set[int]] = {}
    for a, b in np.asarray(pairs, dtype=np.int64).reshape(-1, 2):
        adj.setdefault(int(a), set()).add(int(b))
        adj.setdefault(int(b), set()).add(int(a))
    seen: set[int] = set()
    groups = []
    for v in range(n):
        if v in seen or v not in adj:
            continue
        comp, todo = set(), [v]
        while todo:
            u = todo.pop()
            if u in comp:
                continue
            comp.add(u)
            todo.extend(adj[u] - comp)
        seen |= comp
        if len(comp) > 1:
            groups.append(sorted(comp))
    return groups


# Chains: a group is a connected component, so two of its members may be joined only through others
# (A~B, B~C, A!~C). Only a member paired with the kept file itself is a duplicate of it; the rest is
# split into its own groups (the keep strategy chooses again among them) or stays.


@dataclass(frozen=True)
class Part:
    """One part of a component: `kept` and its near-duplicates `dups` (ascending); `split_from` is
    the kept file of the part it was split from (None for a component's first part)."""

    kept: int
    dups: tuple[int, ...]
    split_from: int | None


@dataclass(frozen=True)
class Stay:
    """A member that is a near-duplicate of no kept file: `via` are the members it was paired with
    (ascending), `kept` the kept file of the part it was left out of."""

    member: int
    kept: int
    via: tuple[int, ...]


def adjacency(pairs: np.ndarray) -> dict[int, set[int]]:
    """Every node of `pairs` (P, 2) -> the nodes it is paired with."""
    adj: dict[int, set[int]] = {}
    for a, b in np.asarray(pairs, dtype=np.int64).reshape(-1, 2).tolist():
        adj.setdefault(a, set()).add(b)
        adj.setdefault(b, set()).add(a)
    return adj


def split_chains(
    members: Sequence[int], adj: Mapping[int, set[int]], choose: Callable[[list[int]], int]
) -> tuple[list[Part], list[Stay]]:
    """Splits a connected group so that each part holds only near-duplicates of its kept file.

    `choose(comp)` is the member of `comp` (ascending) to keep. The kept file takes the members
    paired with it; what is left falls into connected pieces (ordered by their smallest member),
    each handled the same way in turn; a piece of one member stays.
    """
    parts: list[Part] = []
    stays: list[Stay] = []
    todo: deque[tuple[list[int], int | None]] = deque([(sorted(members), None)])
    while todo:
        comp, origin = todo.popleft()
        inside = set(comp)
        k = choose(comp)
        dups = sorted(adj.get(k, set()) & inside)
        parts.append(Part(k, tuple(dups), origin))
        rest = inside - {k} - set(dups)
        for piece in _pieces(rest, adj):
            if len(piece) == 1:
                m = piece[0]
                stays.append(Stay(m, k, tuple(sorted(adj.get(m, set()) & inside))))
            else:
                todo.append((piece, k))
    return parts, stays


def _pieces(nodes: set[int], adj: Mapping[int, set[int]]) -> list[list[int]]:
    """The connected pieces of the graph `adj` restricted to `nodes`, ascending, by smallest node."""
    seen: set[int] = set()
    out = []
    for v in sorted(nodes):
        if v in seen:
            continue
        piece, todo = {v}, [v]
        while todo:
            for w in adj.get(todo.pop(), set()) & nodes:
                if w not in piece:
                    piece.add(w)
                    todo.append(w)
        seen |= piece
        out.append(sorted(piece))
    return out


def split_chains_ref(
    members: Sequence[int], pairs: np.ndarray, choose: Callable[[list[int]], int]
) -> tuple[list[Part], list[Stay]]:
    """Plain reference of `split_chains`: the pair list searched afresh at every step."""
    plist = [tuple(p) for p in np.asarray(pairs, dtype=np.int64).reshape(-1, 2).tolist()]

    def paired(a: int, b: int) -> bool:
        return (a, b) in plist or (b, a) in plist

    parts: list[Part] = []
    stays: list[Stay] = []
    todo: list[tuple[list[int], int | None]] = [(sorted(members), None)]
    while todo:
        comp, origin = todo.pop(0)
        k = choose(comp)
        dups = [m for m in comp if m != k and paired(m, k)]
        parts.append(Part(k, tuple(dups), origin))
        rest = [m for m in comp if m != k and m not in dups]
        inner = np.array([(a, b) for a in rest for b in rest if a < b and paired(a, b)], np.int64)
        grouped = group_pairs_ref(max(rest, default=-1) + 1, inner)
        singles = [[m] for m in rest if not any(m in g for g in grouped)]
        for piece in sorted(grouped + singles):
            if len(piece) == 1:
                via = tuple(o for o in comp if paired(piece[0], o))
                stays.append(Stay(piece[0], k, via))
            else:
                todo.append((piece, k))
    return parts, stays

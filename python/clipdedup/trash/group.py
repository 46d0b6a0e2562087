"""Pairs -> groups (connected components), deterministically.

Indices refer to rows in the sorted scan order, so the same files always give the same groups in the
same order, whatever order the file system listed them in.
"""

from __future__ import annotations

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

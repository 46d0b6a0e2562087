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
    parent = np.arange(n, dtype=np.int64)

    def find(a: int) -> int:
        root = a
        while parent[root] != root:
            root = int(parent[root])
        while parent[a] != root:  # path compression
            parent[a], a = root, int(parent[a])
        return root

    for a, b in np.asarray(pairs, dtype=np.int64).reshape(-1, 2):
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            # The smaller index becomes the root, so roots are the groups' first members.
            parent[max(ra, rb)] = min(ra, rb)
    members: dict[int, list[int]] = {}
    touched = np.unique(np.asarray(pairs, dtype=np.int64).reshape(-1))
    for v in touched:
        members.setdefault(find(int(v)), []).append(int(v))
    return [sorted(g) for _, g in sorted(members.items()) if len(g) > 1]


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

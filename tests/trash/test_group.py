"""Grouping: union-find against a graph-search reference, and determinism."""

from __future__ import annotations

import numpy as np
import pytest

from clipdedup.trash.group import (
    Part,
    Stay,
    adjacency,
    group_pairs,
    group_pairs_ref,
    split_chains,
    split_chains_ref,
)


@pytest.mark.parametrize(
    "n, p", [(0, 0), (1, 0), (2, 1), (10, 0), (63, 40), (65, 200), (500, 300), (5000, 4500)]
)
def test_matches_reference(n: int, p: int) -> None:
    rng = np.random.default_rng(n * 1000 + p)
    if n >= 2 and p:
        a = rng.integers(0, n, p)
        b = rng.integers(0, n, p)
        pairs = np.stack([np.minimum(a, b), np.maximum(a, b)], 1)
        pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    else:
        pairs = np.zeros((0, 2), np.int64)
    got = group_pairs(n, pairs)
    assert got == group_pairs_ref(n, pairs)
    # Pair order does not matter.
    perm = rng.permutation(len(pairs))
    assert group_pairs(n, pairs[perm]) == got
    assert group_pairs(n, pairs[perm][:, ::-1]) == got


def test_chain_is_one_group() -> None:
    pairs = np.array([[3, 4], [0, 1], [1, 2], [2, 3], [7, 8]])
    assert group_pairs(10, pairs) == [[0, 1, 2, 3, 4], [7, 8]]


def _random_graph(rng: np.random.Generator, n: int, p: int) -> np.ndarray:
    a, b = rng.integers(0, n, p), rng.integers(0, n, p)
    pairs = np.stack([np.minimum(a, b), np.maximum(a, b)], 1)
    return np.unique(pairs[pairs[:, 0] != pairs[:, 1]], axis=0)


@pytest.mark.parametrize("seed", range(40))
def test_split_chains_matches_reference_and_keeps_only_duplicates(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 40))
    pairs = _random_graph(rng, n, int(rng.integers(1, 3 * n)))
    rank = rng.permutation(n)  # the keep strategy: the highest rank, as a key would choose

    def choose(comp: list[int]) -> int:
        return max(comp, key=lambda k: rank[k])

    adj = adjacency(pairs)
    for members in group_pairs(n, pairs):
        parts, stays = split_chains(members, adj, choose)
        assert (parts, stays) == split_chains_ref(members, pairs[rng.permutation(len(pairs))], choose)
        # Every member is kept, moves with a kept file it is paired with, or stays paired with none.
        placed = [p.kept for p in parts] + [d for p in parts for d in p.dups] + [st.member for st in stays]
        assert sorted(placed) == members
        for p in parts:
            assert p.dups and all(d in adj[p.kept] for d in p.dups)
        kept = {p.kept for p in parts}
        for st in stays:
            assert not (adj[st.member] & kept) and st.via


def test_chain_moves_only_duplicates_of_the_kept_file() -> None:
    # A~B, B~C, A!~C; C~D. Keep A: B is its duplicate; C and D are regrouped (keep C: D moves).
    pairs = np.array([[0, 1], [1, 2], [2, 3]])
    parts, stays = split_chains([0, 1, 2, 3], adjacency(pairs), min)
    assert parts == [Part(0, (1,), None), Part(2, (3,), 0)] and stays == []
    # A~B, B~C only: C stays, joined through B.
    parts, stays = split_chains([0, 1, 2], adjacency(pairs[:2]), min)
    assert parts == [Part(0, (1,), None)] and stays == [Stay(2, 0, (1,))]


def test_long_chains_in_any_order_are_one_group() -> None:
    """Whole-array union-find: a chain hooks root after root, in whatever order its links come."""
    rng = np.random.default_rng(5)
    nodes = rng.permutation(3000)
    pairs = np.sort(np.stack([nodes[:-1], nodes[1:]], 1), axis=1)
    for p in (pairs, pairs[::-1], pairs[rng.permutation(len(pairs))]):
        assert group_pairs(3000, p) == [list(range(3000))]

"""Grouping: union-find against a graph-search reference, and determinism."""

from __future__ import annotations

import numpy as np
import pytest

from clipdedup.trash.group import group_pairs, group_pairs_ref


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


def test_long_chains_in_any_order_are_one_group() -> None:
    """Whole-array union-find: a chain hooks root after root, in whatever order its links come."""
    rng = np.random.default_rng(5)
    nodes = rng.permutation(3000)
    pairs = np.sort(np.stack([nodes[:-1], nodes[1:]], 1), axis=1)
    for p in (pairs, pairs[::-1], pairs[rng.permutation(len(pairs))]):
        assert group_pairs(3000, p) == [list(range(3000))]

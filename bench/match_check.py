"""bench_match's correctness check, in plain numpy float64 that shares no code with clipdedup.

`IndependentCheck` re-measures every pair a row reports, compares the true pairs touching a sample
of rows with what the row reports, and checks that every row reports every true pair any row found
(the bench_match docstring says why each). The loop baselines (float32 cdist) get a float32
tolerance on their distances; everything else, the numpy reference screen included, re-checks in
float64 and must be within 1e-6.
"""

from __future__ import annotations

import numpy as np

THRESHOLD = 0.1
LOOP = "original per-row cdist loop"  # the whole loop timed

FLOAT32_BASELINE_TOL = 5e-3  # float32 |a|^2 + |b|^2 - 2ab (torch.cdist): cancellation
EXACT_TOL = 1e-6  # clipdedup re-checks in float64 and stores float32
SAMPLE = 256


def exact_pairs_of(x: np.ndarray, rows: np.ndarray, t: float) -> dict[tuple[int, int], float]:
    """Every pair (i < j) with i or j in `rows` and float64 sqrt(sum((x_i - x_j)^2)) <= t.

    Plain numpy, no clipdedup code: a float64 Gram screen with a generous margin finds the
    candidates, whose distances are then computed from the differences.

    Args:
        x: float32 (N, D).
        rows: int (S,) distinct row indices.
    """
    a = x[rows].astype(np.float64)  # [S, D]
    na = np.einsum("ij,ij->i", a, a)
    found: dict[tuple[int, int], float] = {}
    for c0 in range(0, len(x), 4096):
        b = x[c0 : c0 + 4096].astype(np.float64)
        d2 = na[:, None] + np.einsum("ij,ij->i", b, b)[None, :] - 2 * (a @ b.T)  # [S, B]
        si, cj = np.nonzero(d2 <= (t + 1e-3) ** 2)
        i, j = rows[si], cj + c0
        keep = i != j
        i, j = i[keep], j[keep]
        d = exact_distances64(x, i, j)
        for p, q, dist in zip(i[d <= t].tolist(), j[d <= t].tolist(), d[d <= t].tolist()):
            found[(min(p, q), max(p, q))] = dist
    return found


def exact_distances64(x: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """float64 (K,) sqrt(sum((x_i - x_j)^2)) of K pairs, in chunks."""
    out = np.empty(len(i), np.float64)
    for s in range(0, len(i), 8192):
        diff = x[i[s : s + 8192]].astype(np.float64) - x[j[s : s + 8192]].astype(np.float64)
        out[s : s + 8192] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    return out


class IndependentCheck:
    """The check of every row at one N (see the module docstring); `__call__` is a round's check."""

    def __init__(self, x: np.ndarray, sample: np.ndarray, loop_rows: np.ndarray):
        self.x, self.sample, self.loop_rows = x, np.unique(sample), loop_rows
        self.loop_set = set(loop_rows.tolist())
        self.truth = exact_pairs_of(x, self.sample, THRESHOLD)
        self.in_sample = np.zeros(len(x), bool)
        self.in_sample[self.sample] = True
        self.kept: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # impl -> its last result
        self.why: dict[str, str] = {}

    def _scope(self, impl: str, pairs: np.ndarray) -> tuple[np.ndarray, dict[tuple[int, int], float]]:
        """The pairs this impl claims to cover, and the true ones among the sample's."""
        if impl.startswith("loop ESTIMATED"):  # only pairs (i, j > i) of the timed rows i
            mine = np.isin(pairs[:, 0], self.loop_rows)
            want = {p: d for p, d in self.truth.items() if p[0] in self.loop_set}
            return mine, want
        return self.in_sample[pairs[:, 0]] | self.in_sample[pairs[:, 1]], self.truth

    def __call__(self, impl: str, result: tuple[np.ndarray, np.ndarray]) -> bool:
        pairs, dist = result
        self.kept[impl] = result
        tol = FLOAT32_BASELINE_TOL if impl == LOOP or impl.startswith("loop") else EXACT_TOL
        exact = exact_distances64(self.x, pairs[:, 0], pairs[:, 1])
        if len(pairs) and (exact.max() > THRESHOLD or np.abs(exact - dist).max() > tol):
            self.why[impl] = "reports a pair beyond the threshold or a wrong distance"
            return False
        if len(pairs) and not (pairs[:, 0] < pairs[:, 1]).all():
            self.why[impl] = "a pair not in (i < j) order"
            return False
        mine, want = self._scope(impl, pairs)
        got = {(int(p), int(q)) for p, q in pairs[mine]}
        if got != set(want):
            self.why[impl] = (
                f"sampled rows: {len(set(want) - got)} pairs missed, {len(got - set(want))} extra"
            )
            return False
        return True

    def agreed(self) -> dict[str, bool]:
        """Per impl: reports every true pair that any impl reported (all are verified true)."""
        claimed = sorted(set().union(*({(int(p), int(q)) for p, q in r[0]} for r in self.kept.values())))
        ij = np.array(claimed, np.int64).reshape(-1, 2)
        true = exact_distances64(self.x, ij[:, 0], ij[:, 1]) <= THRESHOLD
        union = {p for p, ok in zip(claimed, true.tolist()) if ok}
        out = {}
        for impl, (pairs, _) in self.kept.items():
            got = {(int(p), int(q)) for p, q in pairs}
            need = {p for p in union if p[0] in self.loop_set} if impl.startswith("loop") else union
            out[impl] = need <= got
            if not out[impl]:
                self.why.setdefault(impl, f"misses {len(need - got)} true pairs another row found")
        return out

"""Matching: all pairs within a threshold among N unit-norm embeddings (D = 1280, 5% planted
near-duplicates at distances 0.01..0.09, threshold 0.1), against the original's per-row loop and a
plain numpy blocked float32 implementation.

The original loop costs minutes at N=20k: the full run times it whole at N=2000 and, at every N,
times every s-th row (against all its later rows, as in the loop) and scales by the number of rows;
those rows are labelled ESTIMATED. The N=2000 pair of rows shows how close the estimate is.

Every row, baselines included, at every N, is checked against plain numpy float64 arithmetic that
shares no code with clipdedup (`IndependentCheck`):
- every pair a row reports is re-measured, sqrt(sum((x_i - x_j)^2)) in float64, and must be within
  the threshold with its reported distance (1e-6 for clipdedup's backends, 5e-3 for the float32
  baselines);
- for a sample of rows (all rows up to N = 2000; above, 256 random rows plus the rows the loop
  estimate times) every true pair touching them must be reported;
- every true pair that any row reported must be reported by every row.
A row that fails gets correct=False and no speedup. Every implementation, the loop baselines
included, is timed in the same number of rounds, interleaved (common.interleaved).

    python bench/bench_match.py --quick          # < 1 min on the 2-core dev machine
    python bench/bench_match.py --json out.json  # full: N up to 100k, peak memory at 100k
    CLIPDEDUP_BENCH_MATCH_SIZES=20000 python bench/bench_match.py   # one point of the full run
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Row, interleaved, main  # noqa: E402

D = 1280
THRESHOLD = 0.1
LOOP = "original per-row cdist loop"  # the whole loop timed
NUMPY = "numpy blocked float32"
FULL = "cpu-bf16 full rows (no pre-screen)"


def planted(n: int, d: int = D, frac: float = 0.05, seed: int = 0) -> np.ndarray:
    """Unit rows; `frac` of them replaced by noisy copies of others (distance 0.01..0.09)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    k = int(n * frac)
    src, dst = rng.choice(n, k, replace=False), rng.choice(n, k, replace=False)
    noise = rng.standard_normal((k, d), dtype=np.float32)
    noise *= rng.uniform(0.01, 0.09, (k, 1)).astype(np.float32) / np.linalg.norm(noise, axis=1, keepdims=True)
    x[dst] = x[src] + noise
    x[dst] /= np.linalg.norm(x[dst], axis=1, keepdims=True)
    return x


def per_row_loop(x: np.ndarray, t: float, rows: np.ndarray | None = None):
    """The original tool's matching: for each image, torch.cdist of its row against the later rows.

    `rows` limits the loop to those rows (each still against all later rows), for estimates.
    """
    import torch

    tx = torch.from_numpy(x)
    out_i, out_j, out_d = [], [], []
    for i in range(len(x) - 1) if rows is None else rows.tolist():
        d = torch.cdist(tx[i : i + 1], tx[i + 1 :])[0]
        j = torch.nonzero(d <= t).flatten()
        out_i.append(np.full(len(j), i))
        out_j.append(j.numpy() + i + 1)
        out_d.append(d[j].numpy())
    return _pairs(out_i, out_j, out_d)


def numpy_blocked(x: np.ndarray, t: float, block: int = 2048):
    """Plain blocked float32: ||a||^2 + ||b||^2 - 2 a.b <= t^2 per block of rows (upper triangle)."""
    na = np.einsum("ij,ij->i", x, x)
    out_i, out_j, out_d = [], [], []
    for i0 in range(0, len(x), block):
        i1 = min(len(x), i0 + block)
        d2 = na[i0:i1, None] + na[None, i0:] - 2 * (x[i0:i1] @ x[i0:].T)
        ii, jj = np.nonzero(d2 <= t * t)
        keep = jj + i0 > ii + i0
        ii, jj = ii[keep] + i0, jj[keep] + i0
        out_i.append(ii)
        out_j.append(jj)
        out_d.append(np.sqrt(np.maximum(d2[ii - i0, jj - i0], 0)))
    return _pairs(out_i, out_j, out_d)


def _pairs(i, j, d):
    i, j, d = (np.concatenate(v) if v else np.zeros(0) for v in (i, j, d))
    order = np.lexsort((j, i))
    return np.stack([i[order], j[order]], 1).astype(np.int64).reshape(-1, 2), d[order].astype(np.float32)


def backend(name: str, **kw):
    from clipdedup.match import MATCHERS, _sorted_result

    fn = MATCHERS.get(name).fn

    def run(x, t):
        i, j, d = fn(x, None, t, **kw)
        return _sorted_result(i, j, d)

    return run


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 2 ms (torch allocations included)."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self):
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def fresh_process_peak_mb(n: int, name: str, **kw) -> int:
    """Peak memory above the input of one `name` run at N=n, in a new process (nothing cached by an
    earlier run can hide an allocation)."""
    here = str(Path(__file__).resolve().parent)
    code = (
        f"import sys; sys.path.insert(0, {here!r}); import bench_match as b; x = b.planted({n}); "
        f"f = b.backend({name!r}, **{kw!r})\nwith b.PeakRSS() as m: f(x, b.THRESHOLD)\n"
        "print(round(m.extra_mb))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


FLOAT32_BASELINE_TOL = 5e-3  # float32 |a|^2 + |b|^2 - 2ab (numpy, torch.cdist): cancellation
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
        tol = FLOAT32_BASELINE_TOL if impl in (NUMPY, LOOP) or impl.startswith("loop") else EXACT_TOL
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


def _row(impl, n, seconds, result, ok, baseline, extra=None):
    extra = dict(extra or {}, pairs=len(result[0]), checked_against="numpy float64 (IndependentCheck)")
    extra["load_avg"] = os.getloadavg()[0]
    return Row("match", impl, n, seconds, n / seconds, "rows/s", ok, baseline, extra)


def run(quick: bool) -> list[Row]:
    import torch

    from clipdedup.match import MATCHERS

    rows: list[Row] = []
    sizes = [2000, 5000] if quick else [2000, 20000, 100000]
    if os.environ.get("CLIPDEDUP_BENCH_MATCH_SIZES"):  # e.g. "20000" to repeat one point
        sizes = [int(v) for v in os.environ["CLIPDEDUP_BENCH_MATCH_SIZES"].split(",")]
    loop_sample = 100 if quick else 200  # rows of the per-row loop timed for its estimate
    gpu = [b for b in ("triton", "torch-cuda") if MATCHERS.entries[b].unavailable_reason() is None]
    for n in sizes:
        x = planted(n)
        reps = 1 if (quick or n >= 100000) else 5
        stride = max(1, (n - 1) // loop_sample)
        loop_rows = np.arange(0, n - 1, stride)
        rng = np.random.default_rng(n)
        sample = np.arange(n) if n <= 2000 else np.concatenate([rng.choice(n, SAMPLE, False), loop_rows])
        check = IndependentCheck(x, sample, loop_rows)
        est = f"loop ESTIMATED: 1 row in {stride} timed"
        impls = {
            NUMPY: numpy_blocked,
            "cpu-bf16": backend("cpu-bf16"),
            FULL: backend("cpu-bf16", project=False),
            "cpu-fp32": backend("cpu-fp32"),
            **{g: backend(g) for g in gpu},
            est: lambda x, t, r=loop_rows: per_row_loop(x, t, r),
        }
        if not quick and n <= 2000:
            impls[LOOP] = per_row_loop
        if n >= 100000:  # minutes each on 2 cores at 100k; that point is about the fast path and memory
            del impls[NUMPY], impls[FULL]
        for impl, fn in impls.items():
            if not impl.startswith("loop") and impl != LOOP:
                fn(x[: min(n, 3000)], THRESHOLD)  # warm-up: thread pools, oneDNN kernels
        peak: dict[str, float] = {}

        def measured(impl: str, fn, x=x, peak=peak):
            def call():
                with PeakRSS() as mem:
                    res = fn(x, THRESHOLD)
                peak[impl] = max(peak.get(impl, 0.0), mem.extra_mb)
                return res

            return call

        timed = interleaved({k: measured(k, f) for k, f in impls.items()}, reps, check)
        agreed = check.agreed()
        for impl, tm in timed.items():
            ok = bool(tm.ok and agreed[impl])
            extra = {
                "peak_extra_mb": round(peak[impl]),
                "rounds": tm.rounds,
                "checked_rows": len(check.sample),
            }
            if impl.startswith("loop ESTIMATED"):
                secs = tm.seconds * (n - 1) / len(loop_rows)
                extra |= {"timed_rows": len(loop_rows), "timed_s": tm.seconds}
            else:
                secs = tm.seconds
            if impl in check.why:
                extra["why_wrong"] = check.why[impl]
            base = None if impl in (NUMPY, LOOP) or impl.startswith("loop") else NUMPY
            if base is not None and NUMPY not in impls:
                base = None
            rows.append(_row(impl, n, secs, check.kept[impl], ok, base, extra))
        bf = next(r for r in rows if r.impl == "cpu-bf16" and r.n == n)
        for label, against in (("cpu-bf16 (vs loop)", LOOP), ("cpu-bf16 (vs estimated loop)", est)):
            if against in impls:
                rows.append(
                    _row(label, n, bf.seconds, check.kept["cpu-bf16"], bf.correct, against, dict(bf.extra))
                )
        if n >= 100000:
            bf.extra["peak_extra_mb_fresh_process"] = fresh_process_peak_mb(n, "cpu-bf16")
            # The fallback when the pre-screen leaves too many candidates holds a bf16 copy of the rows.
            full = fresh_process_peak_mb(n, "cpu-bf16", project=False)
            bf.extra["peak_extra_mb_full_rows_fresh_process"] = full
        print(f"  match: N={n} done", file=sys.stderr)
    if torch.cuda.is_available():
        print("  match: GPU rows measured on " + torch.cuda.get_device_name(), file=sys.stderr)
    return rows


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0])

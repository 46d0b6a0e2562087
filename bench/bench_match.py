"""Matching: all pairs within a threshold (0.1) among N unit rows (D = 1280) of two workloads
(bench/match_data.py): planted isotropic rows, and CLIP-like rows (a mean direction, a power-law
spectrum, 200 clusters, median cosine 0.45), both with 5% planted near copies (distances
0.01..0.09). Stage `match` is the isotropic workload, `match-clip` the CLIP-like one.

Every matching backend of the registry that runs on this machine is timed (one that does not is a
skipped row with the registry's reason: never timed, never fatal), against the baseline measured
in the same run: numpy blocked float32, a plain numpy screen (float32 matmul, the threshold plus a
margin for float32's rounding, then the exact float64 re-check). Its pairs are the reference pairs:
a backend's "pairs checked" must say "= reference", or the row is wrong and gets no ratio. On the
isotropic rows, the original tool's per-row loop is timed too: whole at N=2000 in the full run, and
at every N every s-th row (against all its later rows), scaled by the number of rows ("ESTIMATED").

Every row, baselines included, is also checked against plain numpy float64 arithmetic that shares
no code with clipdedup (`match_check.IndependentCheck`):
- every pair a row reports is re-measured, sqrt(sum((x_i - x_j)^2)) in float64, and must be within
  the threshold with its reported distance (1e-6; 5e-3 for the float32 loop);
- for a sample of rows (all rows up to N = 2000; above, 256 random rows plus the rows the loop
  estimate times) every true pair touching them must be reported;
- every true pair that any row reported must be reported by every row.
Every implementation is timed in the same number of rounds, interleaved (common.interleaved).

    python bench/bench_match.py --quick          # N = 2000, 5000 isotropic, 5000 CLIP-like
    python bench/bench_match.py --json out.json  # full: both workloads at N = 20k; isotropic 2k, 100k
    CLIPDEDUP_BENCH_MATCH_SIZES=20000 python bench/bench_match.py   # one N, both workloads
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Row, best_cpu_backend, interleaved, main, skipped, unavailable  # noqa: E402
from match_check import (  # noqa: E402  (re-exported: tests/test_bench_run.py reads them here)
    EXACT_TOL,
    LOOP,
    SAMPLE,
    THRESHOLD,
    IndependentCheck,
    exact_distances64,
    exact_pairs_of,
)
from match_data import clip_like, median_cosine, planted, workload  # noqa: E402

__all__ = ["EXACT_TOL", "IndependentCheck", "clip_like", "exact_distances64", "exact_pairs_of", "planted"]

NUMPY = "numpy blocked float32"
FULL = "cpu-bf16 full rows (no pre-screen)"
STAGE = {"isotropic": "match", "clip-like": "match-clip"}


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


def defined_distances(x: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """float64 (K,) distances of K pairs as the matching definition (docs/matching.md) states them:
    the float64 differences squared, summed along each row in order, then the square root. The
    same operations in the same order give the same bits, so pairs at the threshold agree too."""
    out = np.empty(len(i), np.float64)
    for s in range(0, len(i), 8192):
        diff = np.subtract(x[i[s : s + 8192]], x[j[s : s + 8192]], dtype=np.float64)
        np.multiply(diff, diff, out=diff)
        out[s : s + 8192] = np.sqrt(diff.sum(axis=1))
    return out


def numpy_blocked(x: np.ndarray, t: float, block: int = 2048):
    """The plain numpy reference screen: blocked float32 ||a||^2 + ||b||^2 - 2 a.b over the upper
    triangle, kept within t^2 plus a margin that covers float32's rounding (8 (D + 2) 2^-24 per unit
    of ||a||^2 + ||b||^2, twice the usual gamma_D bound of the three terms), then every candidate
    re-measured exactly in float64, sqrt(sum((x_i - x_j)^2)). Exact, like clipdedup's backends, so
    its pairs are the reference pairs the backends must equal."""
    na = np.einsum("ij,ij->i", x, x)
    slack = np.float32(8 * (x.shape[1] + 2) * 2.0**-24)
    out_i, out_j, out_d = [], [], []
    for i0 in range(0, len(x), block):
        i1 = min(len(x), i0 + block)
        d2 = na[i0:i1, None] + na[None, i0:] - 2 * (x[i0:i1] @ x[i0:].T)
        d2 -= slack * (na[i0:i1, None] + na[None, i0:])
        ii, jj = np.nonzero(d2 <= t * t)
        keep = jj > ii  # the upper triangle: columns start at row i0
        ii, jj = ii[keep] + i0, jj[keep] + i0
        d = defined_distances(x, ii, jj)
        out_i.append(ii[d <= t])
        out_j.append(jj[d <= t])
        out_d.append(d[d <= t])
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


def contenders() -> tuple[dict[str, tuple[str, dict]], dict[str, str]]:
    """label -> (backend, options) of every matching backend that runs here (the registry's order,
    the float64 `reference` left out: row by row, minutes), cpu-bf16 also without its pre-screen;
    and label -> the registry's reason for each one that does not."""
    from clipdedup.match import MATCHERS

    run_here, lacking = {}, {}
    for name in MATCHERS.names():
        if name == "reference":
            continue
        why = unavailable(name)
        labels = {name: {}} | ({FULL: {"project": False}} if name == "cpu-bf16" else {})
        for label, kw in labels.items():
            if why is None:
                run_here[label] = (name, kw)
            else:
                lacking[label] = why
    return run_here, lacking


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


def _row(stage, impl, n, seconds, result, ok, baseline, extra=None):
    extra = dict(extra or {}, pairs=len(result[0]), checked_against="numpy float64 (IndependentCheck)")
    extra["load_avg"] = os.getloadavg()[0]
    return Row(stage, impl, n, seconds, n / seconds, "rows/s", ok, baseline, extra)


def pairs_checked(got: tuple[np.ndarray, np.ndarray], ref: tuple[np.ndarray, np.ndarray]) -> str:
    """'= reference (P pairs)' when `got` has exactly the reference's pairs (distances within
    EXACT_TOL), else what differs."""
    a = {(int(p), int(q)) for p, q in got[0]}
    b = {(int(p), int(q)) for p, q in ref[0]}
    if a != b:
        return f"DIFFER: {len(b - a)} missed, {len(a - b)} extra"
    if len(got[0]) and (
        np.abs(got[1].astype(np.float64) - ref[1]).max() > EXACT_TOL or not (got[0] == ref[0]).all()
    ):
        return "DIFFER: distances or order"
    return f"= reference ({len(b)} pairs)"


def sizes_of(quick: bool) -> dict[str, list[int]]:
    """workload -> the N it is measured at."""
    if os.environ.get("CLIPDEDUP_BENCH_MATCH_SIZES"):  # e.g. "20000" to repeat one point
        n = [int(v) for v in os.environ["CLIPDEDUP_BENCH_MATCH_SIZES"].split(",")]
        return {"isotropic": n, "clip-like": n}
    if quick:
        return {"isotropic": [2000, 5000], "clip-like": [5000]}
    return {"isotropic": [2000, 20000, 100000], "clip-like": [20000]}


def measure(name: str, n: int, quick: bool) -> list[Row]:
    """Every row of one workload at one N."""
    stage, x = STAGE[name], workload(name, n)
    reps = 1 if (quick or n >= 100000) else 5
    loop_sample = 100 if quick else 200  # rows of the per-row loop timed for its estimate
    stride = max(1, (n - 1) // loop_sample)
    loop_rows = np.arange(0, n - 1, stride)
    rng = np.random.default_rng(n)
    sample = np.arange(n) if n <= 2000 else np.concatenate([rng.choice(n, SAMPLE, False), loop_rows])
    check = IndependentCheck(x, sample, loop_rows)
    est = f"loop ESTIMATED: 1 row in {stride} timed"
    here, lacking = contenders()
    impls = {NUMPY: numpy_blocked, **{label: backend(b, **kw) for label, (b, kw) in here.items()}}
    if name == "isotropic":  # the original tool's loop: one workload is enough to place it
        impls[est] = lambda x, t, r=loop_rows: per_row_loop(x, t, r)
        if not quick and n <= 2000:
            impls[LOOP] = per_row_loop
    if n >= 100000:  # minutes each on 2 cores at 100k; that point is about the fast path and memory
        impls.pop(NUMPY)
        impls.pop(FULL, None)
    for impl, fn in impls.items():
        if not impl.startswith("loop") and impl != LOOP:
            fn(x[: min(n, 3000)], THRESHOLD)  # warm-up: thread pools, oneDNN kernels
    peak: dict[str, float] = {}

    def measured(impl: str, fn):
        def call():
            with PeakRSS() as mem:
                res = fn(x, THRESHOLD)
            peak[impl] = max(peak.get(impl, 0.0), mem.extra_mb)
            return res

        return call

    timed = interleaved({k: measured(k, f) for k, f in impls.items()}, reps, check)
    agreed = check.agreed()
    ref = check.kept.get(NUMPY)
    rows = []
    for impl, tm in timed.items():
        ok = bool(tm.ok and agreed[impl])
        extra = {"peak_extra_mb": round(peak[impl]), "rounds": tm.rounds, "checked_rows": len(check.sample)}
        extra |= {"workload": name, "median_cos": round(median_cosine(x), 3)}
        secs = tm.seconds
        if impl.startswith("loop ESTIMATED"):
            secs = tm.seconds * (n - 1) / len(loop_rows)
            extra |= {"timed_rows": len(loop_rows), "timed_s": tm.seconds}
        elif impl != LOOP and ref is not None:
            extra["pairs_checked"] = pairs_checked(check.kept[impl], ref)
            ok = ok and extra["pairs_checked"].startswith("=")
        if impl in check.why:
            extra["why_wrong"] = check.why[impl]
        base = None if impl == NUMPY or impl == LOOP or impl.startswith("loop") or ref is None else NUMPY
        rows.append(_row(stage, impl, n, secs, check.kept[impl], ok, base, extra))
    rows += [skipped(stage, label, n, why, "rows/s") for label, why in lacking.items()]
    best = best_cpu_backend()
    bf = next(r for r in rows if r.impl == best)
    for label, against in ((f"{best} (vs loop)", LOOP), (f"{best} (vs estimated loop)", est)):
        if against in impls:
            rows.append(
                _row(stage, label, n, bf.seconds, check.kept[best], bf.correct, against, dict(bf.extra))
            )
    if n >= 100000:
        bf.extra["peak_extra_mb_fresh_process"] = fresh_process_peak_mb(n, best)
        if "cpu-bf16" in here:  # its fallback, when the pre-screen leaves too many candidates: bf16 rows
            full = fresh_process_peak_mb(n, "cpu-bf16", project=False)
            next(r for r in rows if r.impl == "cpu-bf16").extra["peak_extra_mb_full_rows_fresh_process"] = (
                full
            )
    print(f"  match: {name} N={n} done (median cosine {median_cosine(x):.2f})", file=sys.stderr)
    return rows


def run(quick: bool) -> list[Row]:
    import torch

    rows: list[Row] = []
    for name, sizes in sizes_of(quick).items():
        for n in sizes:
            rows += measure(name, n, quick)
    if torch.cuda.is_available():
        print("  match: GPU rows measured on " + torch.cuda.get_device_name(), file=sys.stderr)
    return rows


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0])

"""Shared plumbing of the benchmarks: result rows, timing, the table, the JSON file.

Every bench/bench_<stage>.py exposes `run(quick: bool) -> list[Row]` and can run on its own
(`python bench/bench_<stage>.py [--quick] [--json PATH]`); bench/run.py runs them all.
A row whose result failed its correctness check carries correct=False, and `speedup` refuses to
report a speedup for it.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def testdata_dir() -> Path:
    """The repository's real test images (tests/data), laid out once under bench/out (a cache)."""
    import sys

    dest = REPO / "bench" / "out" / "testdata" / "imagededup"
    if not (dest / "ground_truth.json").is_file():
        sys.path.insert(0, str(REPO / "tests"))
        import shutil

        from testdata import materialize

        shutil.rmtree(dest, ignore_errors=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        materialize(dest)
    return dest


@dataclass
class Row:
    stage: str  # scan, load, encode, match, ...
    impl: str  # what was measured ("native reader", "baseline: np.load loop", ...)
    n: int  # problem size (files, images, rows)
    seconds: float
    rate: float  # items per second
    unit: str = "items/s"
    correct: bool | None = None  # None: this row is the reference itself
    baseline: str | None = None  # impl name this row is compared with
    extra: dict[str, Any] = field(default_factory=dict)


def best_of(fn: Callable[[], Any], repeat: int = 3) -> tuple[float, Any]:
    """Minimum wall time of `repeat` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def speedups(rows: list[Row]) -> dict[int, str]:
    """Speedup text per row index: 'x12.3' against its baseline at the same n, or why none."""
    out = {}
    for k, r in enumerate(rows):
        if r.baseline is None:
            continue
        base = [b for b in rows if b.stage == r.stage and b.impl == r.baseline and b.n == r.n]
        if r.correct is False:
            out[k] = "WRONG RESULT: no speedup reported"
        elif not base:
            out[k] = "no baseline at this n"
        else:
            out[k] = f"x{base[0].seconds / r.seconds:.1f}" if r.seconds > 0 else "n/a"
    return out


def table(rows: list[Row]) -> str:
    sp = speedups(rows)
    head = f"{'stage':<8} {'impl':<34} {'n':>9} {'seconds':>9} {'rate':>14} {'vs baseline':>26}"
    lines = [head, "-" * len(head)]
    for k, r in enumerate(rows):
        rate = f"{r.rate:,.0f} {r.unit}" if r.rate >= 100 else f"{r.rate:.2f} {r.unit}"
        vs = sp.get(k, "")
        if vs and r.baseline:
            vs = f"{vs} vs {r.baseline}"[:26]
        lines.append(f"{r.stage:<8} {r.impl[:34]:<34} {r.n:>9} {r.seconds:>9.3f} {rate:>14} {vs:>26}")
    return "\n".join(lines)


def write_json(rows: list[Row], path: str | Path) -> None:
    doc = {
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "rows": [asdict(r) | {"speedup": speedups(rows).get(k)} for k, r in enumerate(rows)],
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=2))


def main(run: Callable[[bool], list[Row]], description: str) -> None:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--json", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    rows = run(args.quick)
    print(table(rows))
    if args.json:
        write_json(rows, args.json)

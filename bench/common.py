"""Shared plumbing of the benchmarks: result rows, timing, the table, the JSON file.

Every bench/bench_<stage>.py exposes `run(quick: bool) -> list[Row]` and can run on its own
(`python bench/bench_<stage>.py [--quick] [--json PATH]`); bench/run.py runs them all.
A row gets a speedup only when its own result passed a correctness check against something
independent of the code it measures (correct=True) and its baseline's result did not fail one:
a wrong row (correct=False) and an unchecked row (correct=None) that names a baseline get a reason
instead of a ratio. `interleaved` times every contender and baseline with the same number of
rounds, each round running all of them once in a rotating order. A path this machine lacks (a
backend the registry calls unavailable, bf16 without fast bf16) is a `skipped` row: never timed,
its reason in the table and the JSON. Every table and JSON names the CPU's features (`cpu_line`).
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
    correct: bool | None = None  # None: not checked (no speedup is reported for such a row)
    baseline: str | None = None  # impl name this row is compared with
    extra: dict[str, Any] = field(default_factory=dict)


def skipped(stage: str, impl: str, n: int, why: str, unit: str = "items/s") -> Row:
    """A row for a path this machine lacks: not timed, no rate, no speedup; `why` is shown instead."""
    return Row(stage, impl, n, 0.0, 0.0, unit, None, None, {"skipped": why})


def cpu_line() -> str:
    """The CPU's architecture and the features that decide the CPU paths (`clipdedup.util.cpu`)."""
    try:
        from clipdedup.util import cpu
    except ImportError:
        return platform.machine()
    return cpu.describe()


def unavailable(name: str) -> str | None:
    """Why the matching backend `name` cannot run here (the registry's reason), or None."""
    from clipdedup.match import MATCHERS

    entry = MATCHERS.entries.get(name)
    return "no such backend in this version" if entry is None else entry.unavailable_reason()


def best_cpu_backend() -> str:
    """The CPU matching backend the registry would pick here: the first available `cpu-*` by priority."""
    from clipdedup.match import MATCHERS

    return next(n for n in MATCHERS.names() if n.startswith("cpu-") and unavailable(n) is None)


def best_of(fn: Callable[[], Any], repeat: int = 3) -> tuple[float, Any]:
    """Minimum wall time of `repeat` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


@dataclass
class Timed:
    seconds: float  # the best round's wall time
    ok: bool | None  # every round's result passed the check; None when no check was given
    rounds: int


def interleaved(
    fns: dict[str, Callable[[], Any]],
    repeat: int,
    check: Callable[[str, Any], bool] | None = None,
) -> dict[str, Timed]:
    """Best wall time of each callable over `repeat` rounds; each round calls every one once, the
    order rotating from round to round, so a burst of load on a shared machine (or a cache warmed
    by the previous call) favours none of them and every row gets the same number of tries.

    Each call's result is passed to `check(name, result)` at once and then dropped, so the
    results of all contenders are never held in memory together.
    """
    names = list(fns)
    best = dict.fromkeys(names, float("inf"))
    ok: dict[str, bool | None] = dict.fromkeys(names, None if check is None else True)
    for r in range(repeat):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t = time.perf_counter()
            result = fns[name]()
            best[name] = min(best[name], time.perf_counter() - t)
            if check is not None:
                ok[name] = bool(ok[name] and check(name, result))
            del result
    return {k: Timed(best[k], ok[k], repeat) for k in names}


def speedups(rows: list[Row]) -> dict[int, str]:
    """Speedup text per row index: 'x12.3' against its baseline at the same n, or why none.

    Only a row whose check passed (correct is True) gets a ratio, and only against a baseline row
    whose own check did not fail."""
    out = {}
    for k, r in enumerate(rows):
        if r.baseline is None:
            continue
        base = [b for b in rows if b.stage == r.stage and b.impl == r.baseline and b.n == r.n]
        if r.correct is False:
            out[k] = "WRONG RESULT: no speedup reported"
        elif r.correct is not True:
            out[k] = "UNCHECKED: no speedup reported"
        elif not base:
            out[k] = "no baseline at this n"
        elif base[0].extra.get("skipped"):
            out[k] = "baseline skipped here: no speedup reported"
        elif base[0].correct is False:
            out[k] = "baseline WRONG: no speedup reported"
        else:
            out[k] = f"x{base[0].seconds / r.seconds:.1f}" if r.seconds > 0 else "n/a"
    return out


def table(rows: list[Row]) -> str:
    sp = speedups(rows)
    sw = max([8, *(len(r.stage) for r in rows)])  # stage column: "match-clip" is 10 wide
    head = f"{'stage':<{sw}} {'impl':<34} {'n':>9} {'seconds':>9} {'rate':>14} {'vs baseline':>26}"
    if any(r.extra.get("pairs_checked") for r in rows):
        head += "  pairs checked"
    lines = [f"cpu: {cpu_line()}", head, "-" * len(head)]
    for k, r in enumerate(rows):
        if r.extra.get("skipped"):
            why = r.extra["skipped"]
            lines.append(f"{r.stage:<{sw}} {r.impl[:34]:<34} {r.n:>9} {'-':>9} {'-':>14}  skipped: {why}")
            continue
        rate = f"{r.rate:,.0f} {r.unit}" if r.rate >= 100 else f"{r.rate:.2f} {r.unit}"
        vs = sp.get(k, "")
        if vs and r.baseline:
            vs = f"{vs} vs {r.baseline}"[:26]
        checked = f"  {r.extra['pairs_checked']}" if r.extra.get("pairs_checked") else ""
        lines.append(
            f"{r.stage:<{sw}} {r.impl[:34]:<34} {r.n:>9} {r.seconds:>9.3f} {rate:>14} {vs:>26}{checked}"
        )
    return "\n".join(lines)


def write_json(rows: list[Row], path: str | Path) -> None:
    doc = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu": cpu_line()},
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

"""All stages' throughput comparisons in one command: table, JSON, and a plot of throughput against N.

    python bench/run.py --quick                      # smoke run, < 2 min on the 2-core dev machine
    python bench/run.py --json bench/out/run.json    # full run (< 20 min there)

Each stage module (bench/bench_<stage>.py) exposes `run(quick) -> list[Row]`, measures its fast
paths against baselines after the original tool's algorithms and plain numpy/torch versions, and
sets Row.correct from a comparison with a result computed independently of the code measured.
A row that names a baseline but whose check failed (correct=False) or never ran (correct=None) gets
no speedup (see common.speedups), is listed under the table and makes the exit code 1; a stage
module that is missing or fails is reported as such and the others still run.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from common import Row, speedups, table, write_json  # noqa: E402

# (stage label, module in bench/); the order is the pipeline's.
STAGES = [
    ("scan + load", "bench_io"),
    ("exact copies", "bench_prepass"),
    ("encode", "bench_encode"),
    ("match", "bench_match"),
    ("int screen", "bench_int_screen"),
    ("scale", "bench_scale"),
    ("dct quality", "bench_dct_quality"),
    ("dct check", "bench_warp"),
    ("rerun", "bench_rerun"),
]


@dataclass
class Outcome:
    rows: list[Row] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (module, one-line reason)
    seconds: dict[str, float] = field(default_factory=dict)  # module -> wall time

    @property
    def wrong(self) -> list[Row]:
        return [r for r in self.rows if r.correct is False]

    @property
    def unchecked(self) -> list[Row]:
        """Rows compared with a baseline whose own result was never checked: a bench defect."""
        return [r for r in self.rows if r.baseline is not None and r.correct is None]


def unverified_speedups(rows: Sequence[Row]) -> list[Row]:
    """Rows that would be published with a ratio although their check did not pass (must be none)."""
    sp = speedups(list(rows))
    return [r for k, r in enumerate(rows) if sp.get(k, "").startswith("x") and r.correct is not True]


def _load(module: str) -> Callable[[bool], list[Row]]:
    mod = importlib.import_module(module)
    fn = getattr(mod, "run", None)
    if not callable(fn):
        raise AttributeError(f"{module} has no run(quick) function")
    return fn


def run_all(
    quick: bool,
    stages: Sequence[tuple[str, str]] = STAGES,
    only: set[str] | None = None,
    loader: Callable[[str], Callable[[bool], list[Row]]] = _load,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> Outcome:
    """Runs every stage module; a missing or failing module becomes a problem line, not a crash."""
    out = Outcome()
    for label, module in stages:
        if only and module not in only and module.removeprefix("bench_") not in only:
            continue
        log(f"== {label} ({module}{', quick' if quick else ''})")
        t = time.perf_counter()
        try:
            fn = loader(module)
        except ModuleNotFoundError as e:
            out.problems.append((module, f"not available: {e}"))
            continue
        except Exception as e:
            out.problems.append((module, f"cannot import: {type(e).__name__}: {e}"))
            continue
        try:
            rows = list(fn(quick))
        except Exception as e:
            last = traceback.format_exc().strip().splitlines()[-1]
            out.problems.append((module, f"failed: {type(e).__name__}: {e} ({last})"))
            rows = []
        out.seconds[module] = time.perf_counter() - t
        out.rows.extend(r for r in rows if isinstance(r, Row))
        log(f"   {len(rows)} rows in {out.seconds[module]:.1f}s")
    return out


def report_text(o: Outcome) -> str:
    lines = [table(o.rows)] if o.rows else ["(no rows)"]
    for r in o.wrong:
        lines.append(f"WRONG RESULT: {r.stage} / {r.impl} at n={r.n}: no speedup reported")
    for r in o.unchecked:
        lines.append(f"UNCHECKED: {r.stage} / {r.impl} at n={r.n}: its result was never checked")
    for module, why in o.problems:
        lines.append(f"PROBLEM: {module}: {why}")
    times = ", ".join(f"{m} {s:.1f}s" for m, s in o.seconds.items())
    lines.append(f"wall time: {sum(o.seconds.values()):.1f}s ({times})")
    return "\n".join(lines)


def throughput_series(rows: Sequence[Row]) -> dict[str, dict[str, list[tuple[int, float, bool]]]]:
    """stage -> impl -> [(n, rate, correct)] sorted by n, for rows that measure a rate (unit '/s')."""
    out: dict[str, dict[str, list[tuple[int, float, bool]]]] = {}
    seen = set()
    for r in rows:
        impl = r.impl.strip()
        if not r.unit.endswith("/s") or r.rate <= 0 or r.n <= 0 or (r.stage, impl, r.n) in seen:
            continue  # a row listed twice (once per baseline) is one point
        seen.add((r.stage, impl, r.n))
        out.setdefault(r.stage, {}).setdefault(impl, []).append((r.n, r.rate, r.correct is not False))
    for impls in out.values():
        for pts in impls.values():
            pts.sort()
    return out


def plot(rows: Sequence[Row], path: str | Path, title: str = "") -> Path | None:
    """Log-log throughput against N, one panel per stage; wrong results drawn as red crosses."""
    series = throughput_series(rows)
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 10 else f"{v:g}")
    # Minor ticks: label only 2x and 5x a power of ten, so labels never run into each other.
    some = FuncFormatter(lambda v, _: plain(v) if f"{v:e}"[0] in "25" else "")

    units = {r.stage: r.unit for r in rows}
    n = len(series)
    cols = min(3, n)
    nrows = -(-n // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.2 * cols, 4.4 * nrows), squeeze=False)
    for ax, (stage, impls) in zip(axes.flat, series.items()):
        for impl, pts in impls.items():
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            style = "--" if impl.startswith("baseline") else "-"
            (line,) = ax.plot(xs, ys, style, marker="o", ms=4, label=impl[:40])
            bad = [(x, y) for x, y, ok in pts if not ok]
            if bad:
                ax.plot(*zip(*bad), "x", color="red", ms=10, mew=2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        pts = [p for ps in impls.values() for p in ps]
        for axis, vals in ((ax.xaxis, [p[0] for p in pts]), (ax.yaxis, [p[1] for p in pts])):
            axis.set_major_formatter(plain)
            # Within about a decade there are too few major ticks: label the minor ones too.
            narrow = max(vals) / min(vals) < 30
            axis.set_minor_formatter(some if narrow else NullFormatter())
        xs = [p[0] for p in pts]
        if max(xs) / min(xs) < 4:
            ax.set_xlim(min(xs) / 2, max(xs) * 2)
        ax.set_title(stage)
        ax.set_xlabel("N")
        ax.set_ylabel(units.get(stage, "items/s"))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--json", default=None, help="write the rows as JSON here")
    ap.add_argument(
        "--plot",
        default=str(HERE / "out" / "throughput.png"),
        help="PNG of throughput against N ('' for none)",
    )
    ap.add_argument("--only", default="", help="comma-separated stage modules (io,match,...)")
    args = ap.parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()} or None
    t = time.perf_counter()
    o = run_all(args.quick, STAGES, only=only, loader=_load)
    print(report_text(o))
    refused = unverified_speedups(o.rows)
    for r in refused:
        print(f"REFUSED: {r.stage} / {r.impl} at n={r.n} has a speedup but correct={r.correct}")
    if args.json and not refused:
        write_json(o.rows, args.json)
    if args.plot:
        try:
            made = plot(o.rows, args.plot, "bench/run.py" + (" --quick" if args.quick else ""))
            if made:
                print(f"plot: {made}")
        except ImportError:
            print("plot: skipped (pip install '.[bench]' for matplotlib)")
    print(f"total {time.perf_counter() - t:.1f}s")
    return 1 if o.wrong or o.unchecked or o.problems or refused else 0


if __name__ == "__main__":
    sys.exit(main())

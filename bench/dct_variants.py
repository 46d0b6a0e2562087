"""builtin:dct's check, part by part: the procedure's choice (bench_dct_quality.choose) on the tuning
half of bench/corpus.py for the shipped check and for variants of it with one part taken out or
changed, each scored by the native path with clipdedup.match.verify.warp_check's constants changed for the
run (the shipped rows; the screen is the same for all). What each part of the check buys at the
procedure's precision; the hold-out is not looked at.

    python bench/dct_variants.py [--json out.json]
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_dct_quality as q  # noqa: E402
import corpus  # noqa: E402

NO_GATES = {"SD_LOG": math.inf, "CM_LOG": math.inf, "MU_LOG": math.inf}
# (name, warp_check constants changed, whether choose also holds precision on the subsets)
VARIANTS: list[tuple[str, dict, bool]] = [
    ("shipped: gates, alignment, worst of 4 x 4 blocks, subset condition", {}, True),
    ("the same without the subset condition", {}, False),
    ("no gates", NO_GATES, True),
    ("no alignment (the best whole-pixel move only)", {"ITERS": 0}, True),
    ("whole picture (1 block: a correlation after the alignment)", {"GRID": 1}, True),
    ("whole picture, no alignment", {"GRID": 1, "ITERS": 0}, True),
    ("whole picture, no alignment, no gates", {"GRID": 1, "ITERS": 0, **NO_GATES}, True),
    ("3 x 3 blocks", {"GRID": 3}, True),
    ("6 x 6 blocks", {"GRID": 6}, True),
    ("floor 0.01", {"FLOOR": 0.01}, True),
    ("floor 0.05", {"FLOOR": 0.05}, True),
]


@contextlib.contextmanager
def constants(changes: dict) -> Iterator[None]:
    from clipdedup.match.verify import warp_check

    old = {k: getattr(warp_check, k) for k in changes}
    for k, v in changes.items():
        setattr(warp_check, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(warp_check, k, v)


def main() -> None:
    root, m = corpus.build()
    emb, _, _ = q.embed_corpus(root)
    tune = q.subset(m, q.by_size(m, "tune", None))
    parts = q.tuning_parts(m)
    out = []
    print(f"tuning half: {len(tune.files)} files, {tune.true_pairs} true pairs (in-sample)")
    print(f"{'check':<70} {'T':>5} {'S':>6} {'recall':>7} {'precision':>9} {'hard':>8}")
    for name, changes, with_parts in VARIANTS:
        with constants(changes):
            t, s, sc, _ = q.choose(emb, tune, parts if with_parts else [])
        hard = f"{sc['hard_matched']}/{sc['hard']}"
        row = f"{name:<70} {t:>5.2f} {s:>6.3f} {sc['recall']:>7.4f} {sc['precision']:>9.4f} {hard:>8}"
        print(row, flush=True)
        out.append({"check": name, "changes": {k: str(v) for k, v in changes.items()}, "T": t, "S": s} | sc)
    if "--json" in sys.argv:
        Path(sys.argv[sys.argv.index("--json") + 1]).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

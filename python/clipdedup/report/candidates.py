"""The screened candidates of a verified model (builtin:dct) in the report: each pair's screening
distance, check score and verdict (report.json `verification` and `candidates`, candidates.csv)."""

from __future__ import annotations

import csv
import os
from typing import Any

from clipdedup.records import Verification
from clipdedup.util.fsutil import atomic_file


def verification_dict(v: Verification) -> dict[str, Any]:
    """What verification did in a run: its measure, its bar, the counts and the turned-down pairs."""
    rejected = [
        {"a": c.a, "b": c.b, "distance": c.distance, "score": c.score}
        for c in v.candidates
        if not c.confirmed
    ]
    return {
        "measure": v.measure,
        "min_score": v.min_score,
        "candidates": len(v.candidates),
        "confirmed": v.confirmed,
        "seconds": round(v.seconds, 4),
        "rejected": rejected,
    }


def write_candidates_csv(v: Verification, out_dir: str) -> None:
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["a", "b", "distance", "check_score", "confirmed"])
    for c in v.candidates:
        w.writerow([c.a, c.b, f"{c.distance:.6g}", f"{c.score:.6f}", int(c.confirmed)])
    with atomic_file(
        os.path.join(out_dir, "candidates.csv"), "w", encoding="utf-8", errors="surrogateescape", newline=""
    ) as f:
        f.write(buf.getvalue())

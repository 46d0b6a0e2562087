"""The screened candidates of a verified model (builtin:dct) in the report: each pair's screening
distance, check score and verdict (report.json `verification` and `candidates`, candidates.csv)."""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

from clipdedup.records import Verification
from clipdedup.report.tables import write_csv


def verification_dict(v: Verification | None, *, rejected: bool = True) -> dict[str, Any] | None:
    """What verification did in a run: its measure, its bar, the counts and (with `rejected`) the
    turned-down pairs; None for a run without verification."""
    if v is None:
        return None
    d: dict[str, Any] = {
        "measure": v.measure,
        "min_score": v.min_score,
        "candidates": len(v.candidates),
        "confirmed": v.confirmed,
        "seconds": round(v.seconds, 4),
    }
    if rejected:
        d["rejected"] = [
            {"a": c.a, "b": c.b, "distance": c.distance, "score": c.score}
            for c in v.candidates
            if not c.confirmed
        ]
    return d


def candidates_doc(v: Verification | None) -> dict[str, Any]:
    """report.json's `candidates`: every screened pair with its distance, score and verdict."""
    return {} if v is None else {"candidates": [asdict(c) for c in v.candidates]}


def write_candidates_csv(v: Verification, out_dir: str) -> None:
    rows = [[c.a, c.b, f"{c.distance:.6g}", f"{c.score:.6f}", int(c.confirmed)] for c in v.candidates]
    write_csv(
        os.path.join(out_dir, "candidates.csv"), ("a", "b", "distance", "check_score", "confirmed"), rows
    )

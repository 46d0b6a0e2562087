"""The report's CSV files: groups.csv (one row per member) and pairs.csv (one row per pair).

A file name is text a person controls, and a spreadsheet runs a cell that starts with `=`, `+`, `-`
or `@` (or a tab or carriage return) as a formula. So every text cell that starts with one of them
gets a single quote in front (`safe_cell`, as OWASP's CSV-injection advice has it): the spreadsheet
shows the name as text, and a script reading the file strips that one leading quote.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from typing import Any

from clipdedup.util.fsutil import atomic_file

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(text: str) -> str:
    """`text` as a CSV cell that no spreadsheet runs as a formula."""
    return "'" + text if text.startswith(FORMULA_START) else text


def write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Writes one CSV file atomically; str cells pass through `safe_cell`."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for row in rows:
        w.writerow([safe_cell(c) if isinstance(c, str) else c for c in row])
    with atomic_file(path, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
        f.write(buf.getvalue())


GROUP_COLUMNS = (
    "group",
    "path",
    "kept",
    "status",
    "destination",
    "distance_to_kept",
    "nearest",
    "exact_copy_of",
    "size",
    "group_exact",
    "why",
)


def write_csvs(groups: Sequence[Any], out_dir: str) -> None:
    """groups.csv and pairs.csv of the review groups (`report.core.ReviewGroup`) into `out_dir`."""
    rows = [
        [
            g.id,
            m.path,
            int(m.kept),
            m.status,
            m.dest or "",
            num(m.to_kept),
            num(m.nearest),
            m.exact_of or "",
            "" if m.size is None else m.size,
            int(g.exact),
            g.why if m.kept else "",
        ]
        for g in groups
        for m in g.members
    ]
    write_csv(os.path.join(out_dir, "groups.csv"), GROUP_COLUMNS, rows)
    pairs = [[g.id, a, b, num(d)] for g in groups for a, b, d in g.pairs]
    write_csv(os.path.join(out_dir, "pairs.csv"), ("group", "a", "b", "distance"), pairs)


def num(d: float | None) -> str:
    return "" if d is None else f"{d:.6g}"

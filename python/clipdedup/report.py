"""End-of-run output: the summary (human text on stderr, or JSON) and the per-move lines."""

from __future__ import annotations

import json
from typing import Any

from clipdedup.dedup import RunSummary


def summary_dict(s: RunSummary, *, dry_run: bool) -> dict[str, Any]:
    ups = s.updates.values()
    return {
        "scanned": sum(u.scanned for u in ups),
        "encoded": sum(u.encoded for u in ups),
        "up_to_date": sum(u.up_to_date for u in ups),
        "skipped": sorted(
            [{"path": p, "reason": r} for u in ups for p, r in u.failed + u.scan_errors]
            + [{"path": p, "reason": r} for p, r in s.load_errors],
            key=lambda d: d["path"],
        ),
        "orphans_removed": sum(len(u.removed) for u in ups),
        "loaded": s.loaded,
        "not_in_db": s.not_in_db,
        "threshold": s.threshold,
        "backend": s.backend,
        "pairs": s.pairs,
        "dry_run": dry_run,
        "groups": [
            {
                "members": g.members,
                "kept": g.kept,
                "moves": [{"path": m.rel, "to": m.dest, "skipped": m.reason} for m in g.moved],
                "distances": [[a, b, d] for a, b, d in g.distances],
            }
            for g in s.groups
        ],
        "moved": len(s.moved),
        "seconds": {k: round(v, 4) for u in ups for k, v in u.seconds.items()}
        | {k: round(v, 4) for k, v in s.seconds.items()},
    }


def move_lines(s: RunSummary, *, dry_run: bool) -> list[str]:
    verb = "would move" if dry_run else "moved"
    lines = []
    for g in s.groups:
        for m in g.moved:
            if m.dest is None:
                lines.append(f"kept in place {m.source}: {m.reason}")
            else:
                lines.append(f"{verb} {m.source} -> {m.dest} (kept {g.kept})")
    return lines


def summary_text(d: dict[str, Any]) -> str:
    times = ", ".join(f"{k} {v:.2f}s" for k, v in d["seconds"].items())
    moved = f"{d['moved']} {'would move' if d['dry_run'] else 'moved'}"
    return (
        f"scanned {d['scanned']}, encoded {d['encoded']}, up to date {d['up_to_date']}, "
        f"skipped {len(d['skipped'])}, orphans removed {d['orphans_removed']}; "
        f"matched {d['loaded']} at threshold {d['threshold']:g} ({d['backend']}): "
        f"{d['pairs']} pairs, {len(d['groups'])} groups, {moved}; {times}"
    )


def dumps(d: dict[str, Any]) -> str:
    return json.dumps(d, indent=2, ensure_ascii=False, default=str)

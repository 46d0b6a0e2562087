"""`apply`: the moves of a review report, with the decisions made on its page on top.

In: a report dir written with `--report` (report.json; normally by a dry run) and, optionally, the
decisions.json exported from its page. Out: the moves a normal run makes, through the same path
(`trash.move.Mover`: re-checked right before, journaled, undoable with `undo`).

The plan of a group (`plan_group`, mirrored by the page's script, so the page shows what moves):
the kept file is the user's choice where there is one, else the tool's; every other member moves,
except base files of an import run (never moved), members marked "do not move", and every member
of a skipped group. Right before a move the file must still have the size, mtime and content hash
that report.json recorded for it (and its kept file too); a file that changed stays, with a reason.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from clipdedup.errors import UserError
from clipdedup.report.apply_input import (
    DECISIONS_FORMAT,
    Decision,
    Report,
    load_decisions,
    load_report,
    resolve_roots,
)
from clipdedup.report.core import BASE_PREFIX, member_path
from clipdedup.scan import FileEntry
from clipdedup.trash.journal import content_hash
from clipdedup.trash.move import Mover, MoveResult, is_inside, verify_unchanged
from clipdedup.util.lock import run_locks

# What apply reads lives in apply_input; callers (and tests) reach it through this module too.
__all__ = [
    "DECISIONS_FORMAT",
    "ApplyResult",
    "Decision",
    "Planned",
    "Report",
    "apply_report",
    "load_decisions",
    "load_report",
    "plan_group",
]

TOOL, DECISION = "tool", "decision"


@dataclass
class Planned:
    """One member of a group and what the plan does with it."""

    group: int
    path: str
    kept: str  # the group's kept file under the plan
    moves: bool
    origin: str  # TOOL: as the report's plan; DECISION: a decision changed it (moves or stays)


@dataclass
class ApplyResult:
    report_id: str
    run_id: str | None = None
    journal: str | None = None
    moves: list[tuple[Planned, MoveResult]] = field(default_factory=list)
    stays: list[Planned] = field(default_factory=list)  # stays by decision (the tool would move it)
    skipped_groups: int = 0

    def moved(self, origin: str) -> int:
        return sum(1 for p, r in self.moves if r.dest is not None and p.origin == origin)

    @property
    def kept_in_place(self) -> list[MoveResult]:
        return [r for _, r in self.moves if r.dest is None]


def plan_group(group: dict[str, Any], d: Decision | None) -> list[Planned]:
    """What happens to each member of a report group under decision `d` (None: the report's plan)."""
    gid, tool_kept = int(group["id"]), group["kept"]
    d = d or Decision()
    kept = d.kept if d.kept is not None else tool_kept
    out = []
    for m in group["members"]:
        p = m["path"]
        if m.get("base"):
            continue  # import mode: base files are only read
        by_tool = p != tool_kept
        moves = not d.skip and p != kept and p not in d.stay
        out.append(Planned(gid, p, kept, moves, TOOL if moves == by_tool else DECISION))
    return out


def _stale(path: str, m: dict[str, Any]) -> str | None:
    """Why `path` no longer is the file that report member `m` recorded; None if it still is."""
    if m.get("size") is None or m.get("mtime_ns") is None or not m.get("hash"):
        return "the report recorded no size, mtime or hash for it (unreadable when it was written)"
    if verify_unchanged(path, FileEntry(m["path"], m["mtime_ns"], m["size"])) is not None:
        gone = not os.path.lexists(path)
        return f"{'gone' if gone else 'size or mtime changed'} since the report was written"
    # Hashed here and once more by the move (for its journal record), which re-checks size and mtime
    # after hashing: a file written to between the two reads does not move.
    try:
        if content_hash(path) != m["hash"]:
            return "content changed since the report was written"
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    return None


def check_dirs(rep: Report, trash_dir: str, image_dir: str | None) -> None:
    """Refuses a report for another image dir, roots that are not the dirs the report was made
    from (see `resolve_roots`), and a trash dir that holds one."""
    resolve_roots(rep, image_dir)
    img = rep.roots[""]
    if image_dir is not None and os.path.realpath(image_dir) != os.path.realpath(img):
        raise UserError(f"{rep.dir}: report written for image dir {img}, not {image_dir}")
    for root in rep.roots.values():
        if is_inside(root, trash_dir):
            raise UserError(f"{trash_dir}: the trash dir must not be the image dir {root} or contain it")
    base = rep.roots.get(BASE_PREFIX)
    if base is not None and is_inside(trash_dir, base):
        raise UserError(f"{trash_dir}: the trash dir must not be inside the base image dir {base}")


def apply_report(
    report_dir: str,
    trash_dir: str,
    *,
    decisions: str | None = None,
    image_dir: str | None = None,
    dry_run: bool = False,
    log: Callable[[str], None] | None = None,
) -> ApplyResult:
    """Moves what report_dir's page shows as moving (the report's plan with `decisions` on top).

    Raises:
        UserError: the report cannot be applied here, the decisions belong to another report, or
            another run holds the trash dir.
    """
    say = log or (lambda line: print(line, file=sys.stderr))
    rep = load_report(report_dir)
    chosen = load_decisions(decisions, rep) if decisions is not None else {}
    check_dirs(rep, trash_dir, image_dir)
    with contextlib.ExitStack() as locks:
        if not dry_run:  # as a normal run: a dry run writes nothing, so it locks nothing
            run_locks(locks, [], trash_dir, say)
        return _apply_locked(rep, chosen, trash_dir, dry_run)


def _apply_locked(rep: Report, chosen: dict[int, Decision], trash_dir: str, dry_run: bool) -> ApplyResult:
    res = ApplyResult(rep.report_id)
    mover = Mover(rep.roots[""], trash_dir, dry_run=dry_run, strategy=rep.keeping_logic, mode="apply")
    try:
        for g in rep.groups:
            d = chosen.get(int(g["id"]))
            res.skipped_groups += bool(d and d.skip)
            plan = plan_group(g, d)
            res.stays += [p for p in plan if not p.moves and p.origin == DECISION]
            todo = [p for p in plan if p.moves]
            if todo:
                res.moves += _apply_group(rep, g, todo, mover)
    finally:
        mover.close()
        res.run_id, res.journal = mover.run_id, mover.journal_path
    return res


def _apply_group(
    rep: Report, g: dict[str, Any], todo: list[Planned], mover: Mover
) -> list[tuple[Planned, MoveResult]]:
    by_path = {m["path"]: m for m in g["members"]}
    kept = by_path[todo[0].kept]
    kept_path = member_path(rep.roots, kept["path"])
    kept_why = _stale(kept_path, kept)
    out = []
    for p in todo:
        m, src = by_path[p.path], member_path(rep.roots, p.path)
        why = f"its kept copy {kept_path}: {kept_why}" if kept_why else _stale(src, m)
        if why is not None:
            out.append((p, MoveResult(p.path, src, None, why)))
            continue
        entry = FileEntry(p.path, m["mtime_ns"], m["size"])
        kept_entry = FileEntry(kept["path"], kept["mtime_ns"], kept["size"])
        out.append((p, mover.move(entry, kept_path, kept_entry, int(g["id"]))))
    return out


def result_lines(res: ApplyResult, *, dry_run: bool) -> list[str]:
    """One line per planned move (stdout), as a normal run prints them."""
    verb = "would move" if dry_run else "moved"
    lines = []
    for p, r in res.moves:
        if not r.tried:
            continue  # after a full trash: counted in one line by the CLI
        if r.dest is None:
            lines.append(f"kept in place {r.source}: {r.reason}")
        else:
            tag = "; your decision" if p.origin == DECISION else ""
            lines.append(f"{verb} {r.source} -> {r.dest} (kept {p.kept}{tag})")
    return lines


def summary_text(res: ApplyResult, *, dry_run: bool) -> str:
    verb = "would move" if dry_run else "moved"
    tool, mine = res.moved(TOOL), res.moved(DECISION)
    return (
        f"apply report {res.report_id}: {verb} {tool + mine} ({tool} from the report's plan, {mine} "
        f"from your decisions); {len(res.stays)} stay by your decisions ({res.skipped_groups} groups "
        f"skipped); {len(res.kept_in_place)} kept in place (changed or unsafe)"
    )

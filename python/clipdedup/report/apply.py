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
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from clipdedup.errors import UserError
from clipdedup.report.core import BASE_PREFIX, member_path
from clipdedup.scan import FileEntry
from clipdedup.trash.journal import content_hash
from clipdedup.trash.move import Mover, MoveResult, is_inside, verify_unchanged
from clipdedup.util.lock import run_locks

DECISIONS_FORMAT = "clipdedup-decisions"
TOOL, DECISION = "tool", "decision"


@dataclass(frozen=True)
class Decision:
    """What the user decided for one group on the page."""

    kept: str | None = None  # None: the tool's kept file
    stay: frozenset[str] = frozenset()  # members marked "do not move"
    skip: bool = False  # nothing in the group moves


@dataclass
class Report:
    dir: str
    report_id: str
    roots: dict[str, str]
    keeping_logic: str
    groups: list[dict[str, Any]]


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


def load_report(report_dir: str) -> Report:
    """report.json of `report_dir`. Raises UserError (one line) if it cannot be applied."""
    path = os.path.join(report_dir, "report.json")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: no report here (write one with -n --report DIR)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable report ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict) or not doc.get("report_id") or not isinstance(doc.get("groups"), list):
        raise UserError(f"{path}: written by an older version (no report id); write it again with --report")
    try:
        moved = sum(1 for g in doc["groups"] for m in g["members"] if m["status"] == "moved")
        roots, groups = dict(doc["roots"]), [g for g in doc["groups"] if int(g["id"]) and g["kept"]]
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path}: not a report written by clip-image-deduper (fields missing)") from None
    if moved:
        raise UserError(
            f"{path}: its run already moved {moved} files; undo that run first, or write a dry-run "
            "report (-n --report)"
        )
    return Report(report_dir, doc["report_id"], roots, doc.get("keeping_logic") or "", groups)


def load_decisions(path: str, rep: Report) -> dict[int, Decision]:
    """decisions.json exported from the page of `rep`. Raises UserError (one line) if it was made for
    another report or names a group or file the report does not have."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable decisions ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict) or doc.get("format") != DECISIONS_FORMAT:
        raise UserError(f"{path}: not a decisions file exported from a report page")
    if doc.get("report_id") != rep.report_id:
        raise UserError(
            f"{path}: decisions for report {doc.get('report_id')}, but {rep.dir} holds report "
            f"{rep.report_id}; export them again from this report's page"
        )
    members = {int(g["id"]): {m["path"] for m in g["members"]} for g in rep.groups}
    out: dict[int, Decision] = {}
    for key, d in (doc.get("groups") or {}).items():
        gid = int(key) if str(key).isdigit() else -1
        if gid not in members or not isinstance(d, dict):
            raise UserError(f"{path}: group {key} is not in report {rep.report_id}")
        named = ([d["kept"]] if d.get("kept") is not None else []) + list(d.get("stay") or [])
        for p in named:
            if p not in members[gid]:
                raise UserError(f"{path}: group {gid} has no file {p!r}")
        out[gid] = Decision(d.get("kept"), frozenset(d.get("stay") or []), bool(d.get("skip")))
    return out


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
    """Refuses a report for another image dir, a missing image dir, and a trash dir that holds it."""
    img = rep.roots.get("", "")
    if image_dir is not None and os.path.realpath(image_dir) != os.path.realpath(img):
        raise UserError(f"{rep.dir}: report written for image dir {img}, not {image_dir}")
    for root in rep.roots.values():
        if not os.path.isdir(root):
            raise UserError(f"{rep.dir}: its image dir {root} does not exist")
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

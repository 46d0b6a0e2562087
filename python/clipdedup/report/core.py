"""End-of-run output: the summary (human text on stderr, or JSON), the per-move lines, and the
review report (`--report DIR`): the duplicate groups as JSON, CSV and an HTML contact sheet.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from clipdedup.errors import UserError
from clipdedup.ingest.prepass import identical_classes
from clipdedup.records import Group, MoveResult, RunSummary
from clipdedup.report.candidates import candidates_doc, verification_dict, write_candidates_csv
from clipdedup.report.tables import write_csvs
from clipdedup.trash.keep import STRATEGIES, Candidate
from clipdedup.util.fsutil import atomic_file, dir_id, is_inside


def summary_dict(s: RunSummary, *, dry_run: bool) -> dict[str, Any]:
    ups = s.updates.values()
    return {
        "scanned": sum(u.scanned for u in ups),
        "encoded": sum(u.encoded for u in ups),
        "copied": sum(getattr(u, "copied", 0) for u in ups),
        "up_to_date": sum(u.up_to_date for u in ups),
        "skipped": sorted(
            [skipped_entry(s, p, r) for u in ups for p, r in u.failed + u.scan_errors]
            + [skipped_entry(s, p, r, db_file=True) for p, r in s.load_errors],
            key=lambda d: d["path"],
        ),
        "orphans_removed": sum(len(u.removed) for u in ups),
        "loaded": s.loaded,
        "not_in_db": s.not_in_db,
        "threshold": s.threshold,
        "backend": s.backend,
        "pairs": s.pairs,
        "verification": verification_dict(s.verification, rejected=False),
        "dry_run": dry_run,
        "groups": [
            {
                "members": labels.members,
                "kept": labels.kept,
                "moves": [{"path": m.rel, "to": m.dest, "skipped": m.reason} for m in g.moved],
                "distances": [[a, b, d] for a, b, d in labels.distances],
                "stayed": [{"path": p, "reason": r} for p, r in g.stayed],
                "split_from": g.split_from,
                "links": [[a, b, d] for a, b, d in g.links],
            }
            for g, labels in ((g, labelled(g)) for g in s.groups)
        ],
        "moved": len(s.moved),
        "moves_failed": sum(1 for m in s.move_skipped if m.failed),  # > 0: the exit code is 2
        "run_id": s.run_id,
        "journal": s.journal,
        "seconds": {k: round(v, 4) for u in ups for k, v in u.seconds.items()}
        | {k: round(v, 4) for k, v in s.seconds.items()},
    }


def skipped_entry(s: RunSummary, path: str, reason: str, *, db_file: bool = False) -> dict[str, str]:
    """A skipped path named as group members are: relative to its image dir (import mode's base dir
    with BASE_PREFIX; "." for the dir itself); a DB file (`db_file`) by its image. A path under
    none of the run's dirs stays as it is; under two (an import dir inside the base dir), the deeper."""
    found = [
        (len(root), label, rel)
        for label, dirs in s.dirs.items()
        if (rel := _below(path, root := dirs[1] if db_file else dirs[0])) is not None
    ]
    if not found:
        return {"path": path, "reason": reason}
    _, label, rel = max(found)
    if db_file:
        rel, reason = rel[:-4] if rel.endswith((".npy", ".npz")) else rel, f"its DB file: {reason}"
    return {"path": (BASE_PREFIX if label == "base" else "") + rel, "reason": reason}


def _below(path: str, root: str) -> str | None:
    """`path` relative to `root` (both as given, not resolved), or None when it is not below it."""
    p, r = os.path.normpath(os.path.abspath(path)), os.path.normpath(os.path.abspath(root))
    if p == r:
        return "."
    return p[len(r) + 1 :].replace(os.sep, "/") if p.startswith(r.rstrip(os.sep) + os.sep) else None


_CONTROL = re.compile("[\x00-\x1f\x7f]")


def printable(name: str) -> str:
    """`name` with control characters escaped (`\\n`, `\\x1b`), so one file stays one line."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], name)


def move_lines(s: RunSummary, *, dry_run: bool) -> list[str]:
    """One line per move (or skipped move); moves not tried after a stop are left to
    `failed_moves_line`."""
    verb = "would move" if dry_run else "moved"
    lines = []
    for g in s.groups:
        kept = printable(labelled(g).kept)
        for m in g.moved:
            if not m.tried:
                continue
            if m.dest is None:
                lines.append(f"kept in place {printable(m.source)}: {m.reason}")
            else:
                lines.append(f"{verb} {printable(m.source)} -> {printable(m.dest)} (kept {kept})")
        lines += [f"stays {printable(p)}: {printable(why)}" for p, why in g.stayed]
    return lines


def failed_moves_line(results: Iterable[MoveResult]) -> str | None:
    """One line counting the moves among `results` that were due but failed (None if none did)."""
    failed = [m for m in results if m.failed]
    if not failed:
        return None
    first = next((m for m in failed if m.tried), failed[0])
    untried = sum(1 for m in failed if not m.tried)
    stop = f"; stopped moving after that, {untried} not tried" if untried else ""
    return f"{len(failed)} moves failed (first: {printable(first.source)}: {first.reason}{stop})"


def summary_text(d: dict[str, Any]) -> str:
    times = ", ".join(f"{k} {v:.2f}s" for k, v in d["seconds"].items())
    moved = f"{d['moved']} {'would move' if d['dry_run'] else 'moved'}"
    return (
        f"scanned {d['scanned']}, encoded {d['encoded']}, exact copies {d.get('copied', 0)}, "
        f"up to date {d['up_to_date']}, "
        f"skipped {len(d['skipped'])}, orphans removed {d['orphans_removed']}; "
        f"matched {d['loaded']} at threshold {d['threshold']:g} ({d['backend']}): "
        f"{d['pairs']} pairs, {len(d['groups'])} groups, {moved}; {times}"
    )


_LONE_SURROGATE = re.compile("[\udc80-\udcff]")


def dumps(d: dict[str, Any]) -> str:
    """JSON text. A non-UTF-8 file name (held as surrogate escapes) is written as `\\udcXX`, which
    keeps the output valid UTF-8 and loads back (json.loads + os.fsencode) to the original bytes."""
    text = json.dumps(d, indent=2, ensure_ascii=False, default=str)
    return _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


BASE_PREFIX = "base:"  # how the JSON summary and report.json name a base-dir file of an import run


@dataclass
class Labelled:
    """A group's files as the JSON summary and the report name them (base files with BASE_PREFIX)."""

    members: list[str]
    kept: str
    distances: list[tuple[str, str, float]]


def labelled(g: Group) -> Labelled:
    def base(rel: str) -> str:
        return BASE_PREFIX + rel

    if not g.kept_in_base and not g.base_members:
        return Labelled(list(g.members), g.kept, list(g.distances))
    return Labelled(
        list(g.members) + [base(b) for b in g.base_members],
        base(g.kept) if g.kept_in_base else g.kept,
        [(a, base(b), d) for a, b, d in g.distances],
    )


def top_k_labelled(s: RunSummary) -> dict[str, list[list]]:
    """`s.top_k` with import mode's base neighbours named as in the rest of the JSON."""
    if not s.import_mode:
        return s.top_k
    return {name: [[BASE_PREFIX + n, d] for n, d in near] for name, near in s.top_k.items()}


@dataclass
class Member:
    path: str  # as in the run summary: relative, or "base:" + relative for import mode's base dir
    source: str  # its place in the image dir
    file: str  # where the file is now (`source`, or its trash destination after a real move)
    size: int | None
    mtime_ns: int | None
    kept: bool
    status: str  # kept / would move / moved / stays: why / base file / not moved (no --trash-dir)
    dest: str | None = None
    exact_of: str | None = None  # the first member byte-identical to this one, if any
    nearest: float | None = None  # distance to the closest other member (within the threshold)
    to_kept: float | None = None  # distance to the kept file, when that pair is within the threshold
    hash: str | None = None  # journal.content_hash of `file` when the report was written (apply checks it)
    base: bool = False  # a base-dir file of an import run: never moved


@dataclass
class ReviewGroup:
    id: int
    kept: str
    why: str
    exact: bool  # every member is byte-identical to the kept file
    members: list[Member]
    pairs: list[tuple[str, str, float]] = field(default_factory=list)
    stayed: list[dict[str, str]] = field(default_factory=list)  # {path, reason}: see Group.stayed


def member_path(roots: Mapping[str, str], path: str) -> str:
    """The absolute path of a report member (`path` as in the run summary)."""
    if path.startswith(BASE_PREFIX) and BASE_PREFIX in roots:
        return os.path.join(roots[BASE_PREFIX], path[len(BASE_PREFIX) :])
    return os.path.join(roots[""], path)


def _why(strategy: str, cands: list[Candidate], best: int, import_mode: bool) -> str:
    if import_mode:
        return "import mode: base files are never moved; the nearest base file stands for the group"
    entry = STRATEGIES.entries.get(strategy)
    if entry is None:
        return strategy
    keys = [entry.fn(c) if c.size >= 0 else None for c in cands]
    k = cands[best]
    detail = {
        "largest": lambda: f"{k.size:,} bytes",
        "newest": lambda: "modified " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(k.mtime_ns / 1e9)),
        "highest-quality": lambda: f"{k.header()[0]:,} pixels, {k.header()[1] or 'unknown format'}",
    }.get(strategy, lambda: "")()
    tie = sum(1 for x in keys if x == keys[best]) > 1
    text = f"{strategy} ({entry.doc})" + (f": {detail}" if detail else "")
    return text + ("; tied, so the first path in byte order stays" if tie else "")


def report_roots(image_dir: str, base_dir: str | None = None) -> dict[str, str]:
    """The image dir per member prefix, as report.json records it: {"": image_dir} for a dedup
    run; for an import run {"": import_dir, "base:": base_dir}."""
    return {"": image_dir} | ({BASE_PREFIX: base_dir} if base_dir is not None else {})


def build_review(
    s: RunSummary, roots: Mapping[str, str], *, strategy: str, dry_run: bool
) -> list[ReviewGroup]:
    """The groups of a run with everything a person needs to check them before files move.

    Args:
        roots: see `report_roots`.
    """
    import_mode = BASE_PREFIX in roots
    out = []
    for gid, typed in enumerate(s.groups, 1):
        g = labelled(typed)
        moves = {m.rel: m for m in typed.moved}
        members, cands = [], []
        for p in g.members:
            src, m = member_path(roots, p), moves.get(p)
            now = src if os.path.lexists(src) or m is None or m.dest is None else m.dest
            size: int | None
            mtime: int | None
            try:
                st = os.stat(now)
                size, mtime = st.st_size, st.st_mtime_ns
            except OSError:
                size = mtime = None
            if p == g.kept:
                status = "kept"
            elif m is not None:
                status = ("would move" if dry_run else "moved") if m.dest else f"stays: {m.reason}"
            elif import_mode and p.startswith(BASE_PREFIX):
                status = "base file (never moved)"
            else:
                status = "not moved (no --trash-dir)"
            row = Member(p, src, now, size, mtime, p == g.kept, status, m.dest if m else None)
            row.base = import_mode and p.startswith(BASE_PREFIX)
            members.append(row)
            cands.append(Candidate(p, now, -1 if size is None else size, mtime or 0))
        _distances(members, g.distances, g.kept)
        labels = identical_classes([m.file for m in members], [m.size or -1 for m in members])
        # Name the kept file as the twin where it is one, else the class's first member.
        rep = {lab: k for k, lab in enumerate(labels) if lab is not None and members[k].kept}
        for k, (member, lab) in enumerate(zip(members, labels)):
            twin = rep.get(lab, lab) if lab is not None else None
            if twin is not None and twin != k:
                member.exact_of = members[twin].path
        kept_lab = labels[g.members.index(g.kept)] if g.kept in g.members else None
        exact = kept_lab is not None and all(lab == kept_lab for lab in labels)
        best = g.members.index(g.kept) if g.kept in g.members else 0
        why = _why(strategy, cands, best, import_mode)
        if typed.split_from is not None:
            why += f"; split from the group of {typed.split_from}: these are not near-duplicates of it"
        stayed = [{"path": p, "reason": r} for p, r in typed.stayed]
        out.append(ReviewGroup(gid, g.kept, why, exact, members, list(g.distances), stayed))
    return out


def _distances(members: list[Member], pairs: list[tuple[str, str, float]], kept: str) -> None:
    by_path = {m.path: m for m in members}
    for a, b, d in pairs:
        for x, y in ((a, b), (b, a)):
            m = by_path.get(x)
            if m is None:
                continue
            m.nearest = d if m.nearest is None else min(m.nearest, d)
            if y == kept:
                m.to_kept = d


def write_report(
    s: RunSummary,
    out_dir: str,
    roots: Mapping[str, str],
    *,
    strategy: str,
    dry_run: bool,
    model: str | None = None,
    thumb_size: int = 256,
) -> list[ReviewGroup]:
    """Writes report.json, groups.csv, pairs.csv and index.html (+ thumbs/) into `out_dir`.

    Re-running with the same `out_dir` rewrites these files and reuses the cached thumbnails.
    """
    from clipdedup.report import html as report_html
    from clipdedup.trash.journal import new_run_id

    roots = {k: os.path.abspath(v) for k, v in roots.items()}  # apply acts on these, from any cwd
    groups = build_review(s, roots, strategy=strategy, dry_run=dry_run)
    _hash_members(groups)
    os.makedirs(out_dir, exist_ok=True)
    head = {
        "report_id": new_run_id(),  # decisions made on the page name it; `apply` checks them against it
        "run_id": s.run_id,
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "dry_run": dry_run,
        "roots": dict(roots),
        "root_ids": {k: list(dir_id(v)) for k, v in roots.items() if os.path.isdir(v)},  # for apply
        "model": model,
        "threshold": s.threshold,
        "backend": s.backend,
        "keeping_logic": strategy,
        "groups": len(groups),
        "exact_groups": sum(g.exact for g in groups),
    }
    ver = s.verification
    if ver is not None:
        head["verification"] = verification_dict(ver)
        write_candidates_csv(ver, out_dir)
    doc = head | {"groups": [asdict(g) for g in groups]} | candidates_doc(ver)
    _atomic_text(os.path.join(out_dir, "report.json"), json.dumps(doc, indent=1, ensure_ascii=True))
    write_csvs(groups, out_dir)
    scores = {(c.a, c.b): c.score for c in ver.candidates} if ver is not None else None
    report_html.write_html(groups, head, out_dir, thumb_size=thumb_size, scores=scores)
    return groups


def _hash_members(groups: list[ReviewGroup]) -> None:
    """Content hash of every member's current file, so `apply` moves only what the page showed."""
    from concurrent.futures import ThreadPoolExecutor

    from clipdedup.trash.journal import content_hash

    members = [m for g in groups for m in g.members if m.size is not None]

    def one(m: Member) -> None:
        try:
            m.hash = content_hash(m.file)
        except OSError:
            m.hash = None

    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        list(pool.map(one, members))


def _atomic_text(path: str, text: str) -> None:
    with atomic_file(path, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
        f.write(text)


def check_report_dir(out_dir: str, image_dirs: list[str]) -> None:
    """Refuses a report dir inside an image dir: its thumbnails would be scanned as images next time."""
    for d in image_dirs:
        if is_inside(out_dir, d):
            raise UserError(f"{out_dir}: the report dir must not be inside the image dir {d}")

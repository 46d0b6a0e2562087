"""What `apply` reads: report.json and decisions.json, checked strictly before anything moves.

Both files may have been edited by hand, damaged, or written for something else, so every field is
checked for its type (a string is never read as a list of characters, `"false"` never as true) and
every path is normalised (`./x`, `dir//x` name the file `x` and `dir/x`), so one file cannot be named
twice in a group under two spellings. A path that is absolute or climbs with `..` is refused, and
so is anything else that does not fit: one line (`UserError`), never a traceback.

The roots (the image dir, and the base dir of an import run) are stored absolute with the identity
(st_dev, st_ino) of each directory; `resolve_roots` refuses a root that is not the directory the
report was made from. An older report may hold a root as typed (relative): it is used only when
`-i` names the image dir and ends with that relative path; otherwise it is refused, since a
relative root names another directory from every working directory.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

from clipdedup.errors import UserError
from clipdedup.report.core import BASE_PREFIX
from clipdedup.util.fsutil import dir_id

DECISIONS_FORMAT = "clipdedup-decisions"


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
    groups: list[dict[str, Any]]  # as report.json holds them, paths normalised, fields checked
    root_ids: dict[str, tuple[int, int]] | None = None  # per root that existed; None: an older report


def _load_json(path: str, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except RecursionError:
        raise UserError(f"{path}: unreadable {what} (nested too deeply)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable {what} ({str(e).splitlines()[0]})") from None


def clean_rel(rel: str) -> str | None:
    """`rel` (relative to its image dir, `/`-separated) in one spelling: no `.` or empty parts.
    None when it cannot name a file below its dir: empty, absolute, with `..`, or with a NUL byte."""
    if not rel or rel.startswith("/") or "\x00" in rel:
        return None
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


def clean_path(path: Any, import_mode: bool, where: str) -> str:
    """A member path as report.json and decisions.json name it, normalised; UserError if it is no
    path of a file below its image dir (saying why)."""
    if not isinstance(path, str):
        raise UserError(f"{where}: a path must be a string, not {json.dumps(path)[:40]}")
    prefix = BASE_PREFIX if import_mode and path.startswith(BASE_PREFIX) else ""
    rel = clean_rel(path[len(prefix) :])
    if rel is None:
        rest = path[len(prefix) :]
        why = (
            "is absolute"
            if rest.startswith("/")
            else "climbs out of the image dir with '..'"
            if ".." in rest.split("/")
            else "names no file"
        )
        raise UserError(f"{where}: path {path!r} {why}; only paths below the image dir are applied")
    return prefix + rel


def _int_or_none(v: Any) -> bool:
    return v is None or (isinstance(v, int) and not isinstance(v, bool))


def _member(m: Any, import_mode: bool, where: str) -> dict[str, Any]:
    if not isinstance(m, dict) or not isinstance(m.get("status"), str):
        raise UserError(f"{where}: a member must be an object with a path and a status")
    path = clean_path(m.get("path"), import_mode, where)
    if not (_int_or_none(m.get("size")) and _int_or_none(m.get("mtime_ns"))):
        raise UserError(f"{where}: {path!r}: size and mtime_ns must be integers")
    if not isinstance(m.get("hash") or "", str) or not isinstance(m.get("base", False), bool):
        raise UserError(f"{where}: {path!r}: hash must be a string and base true or false")
    base = import_mode and path.startswith(BASE_PREFIX)
    return m | {"path": path, "base": base}


def _group(g: Any, import_mode: bool, where: str) -> dict[str, Any]:
    if not isinstance(g, dict) or not isinstance(g.get("members"), list):
        raise UserError(f"{where}: a group must be an object with a list of members")
    gid = g.get("id")
    if not isinstance(gid, int) or isinstance(gid, bool) or gid < 1:
        raise UserError(f"{where}: a group id must be a positive integer, not {json.dumps(gid)[:40]}")
    where = f"{where}: group {gid}"
    members = [_member(m, import_mode, where) for m in g["members"]]
    paths = [m["path"] for m in members]
    twice = sorted(p for p, n in Counter(paths).items() if n > 1)
    if twice:
        raise UserError(f"{where}: names {twice[0]!r} twice (under two spellings?)")
    kept = clean_path(g.get("kept"), import_mode, where)
    if kept not in paths:
        raise UserError(f"{where}: its kept file {kept!r} is not one of its members")
    return g | {"id": gid, "kept": kept, "members": members}


def load_report(report_dir: str) -> Report:
    """report.json of `report_dir`, every field checked. Raises UserError (one line) if it cannot
    be applied."""
    path = os.path.join(report_dir, "report.json")
    if not os.path.exists(path):
        raise UserError(f"{path}: no report here (write one with -n --report DIR)")
    doc = _load_json(path, "report")
    if not isinstance(doc, dict) or not doc.get("report_id") or not isinstance(doc.get("groups"), list):
        raise UserError(f"{path}: written by an older version (no report id); write it again with --report")
    roots, logic = doc.get("roots"), doc.get("keeping_logic") or ""
    if not isinstance(doc["report_id"], str) or not isinstance(logic, str):
        raise UserError(f"{path}: report_id and keeping_logic must be strings")
    if not (isinstance(roots, dict) and isinstance(roots.get(""), str) and set(roots) <= {"", BASE_PREFIX}):
        raise UserError(f"{path}: not a report written by clip-image-deduper (its roots are missing)")
    if not all(isinstance(v, str) and v for v in roots.values()):
        raise UserError(f"{path}: each root must be a directory path")
    import_mode = BASE_PREFIX in roots
    groups = [_group(g, import_mode, path) for g in doc["groups"]]
    ids = [g["id"] for g in groups]
    if len(set(ids)) != len(ids):
        raise UserError(f"{path}: two groups share one id")
    moved = sum(1 for g in groups for m in g["members"] if m["status"] == "moved")
    if moved:
        raise UserError(
            f"{path}: its run already moved {moved} files; undo that run first, or write a dry-run "
            "report (-n --report)"
        )
    return Report(report_dir, doc["report_id"], dict(roots), logic, groups, _root_ids(doc, roots, path))


def _root_ids(doc: dict[str, Any], roots: dict[str, str], path: str) -> dict[str, tuple[int, int]] | None:
    ids = doc.get("root_ids")
    if ids is None:
        return None
    ok = isinstance(ids, dict) and set(ids) <= set(roots)
    ok = ok and all(
        isinstance(v, list) and len(v) == 2 and all(x is not None and _int_or_none(x) for x in v)
        for v in ids.values()
    )
    if not ok:
        raise UserError(f"{path}: root_ids must give [st_dev, st_ino] for each root")
    return {k: (v[0], v[1]) for k, v in ids.items()}


def resolve_roots(rep: Report, image_dir: str | None) -> None:
    """Makes `rep.roots` the absolute dirs the report was made from, or refuses (UserError).

    A relative root (a report written before roots were stored absolute) is used only when it is
    the image dir and `image_dir` names it (ending with it); a root that does not exist, or is not
    the directory the report recorded (another st_dev/st_ino), is refused."""
    where = os.path.join(rep.dir, "report.json")
    for key, root in list(rep.roots.items()):
        if os.path.isabs(root):
            continue
        rel = os.path.normpath(root)
        given = os.path.abspath(image_dir) if image_dir is not None and key == "" else None
        if given is None or not (given == os.path.abspath(rel) or given.endswith(os.sep + rel)):
            what = "image dir" if key == "" else "base dir"
            fix = "name it with -i DIR, or write" if key == "" else "write"
            raise UserError(
                f"{where}: records its {what} as the relative path {root!r}, which names another dir "
                f"from each working directory; {fix} the report again with -n --report"
            )
        rep.roots[key] = given
    for key, root in rep.roots.items():
        if not os.path.isdir(root):
            raise UserError(f"{rep.dir}: its image dir {root} does not exist")
        if rep.root_ids is not None and dir_id(root) != rep.root_ids.get(key, dir_id(root)):
            raise UserError(
                f"{rep.dir}: {root} is not the directory the report was made from (another directory "
                "stands at that path now, or it was remounted); write the report again with -n --report"
            )


def load_decisions(path: str, rep: Report) -> dict[int, Decision]:
    """decisions.json exported from the page of `rep`, every field checked. Raises UserError (one
    line) if it was made for another report, names a group or file the report does not have, or
    holds a field of the wrong type."""
    doc = _load_json(path, "decisions")
    if not isinstance(doc, dict) or doc.get("format") != DECISIONS_FORMAT:
        raise UserError(f"{path}: not a decisions file exported from a report page")
    if doc.get("report_id") != rep.report_id:
        raise UserError(
            f"{path}: decisions for report {doc.get('report_id')}, but {rep.dir} holds report "
            f"{rep.report_id}; export them again from this report's page"
        )
    groups = doc.get("groups")
    if groups is None:
        groups = {}
    if not isinstance(groups, dict):
        raise UserError(f"{path}: 'groups' must be an object of group id -> decision")
    import_mode = BASE_PREFIX in rep.roots
    members = {g["id"]: {m["path"] for m in g["members"]} for g in rep.groups}
    out: dict[int, Decision] = {}
    for key, d in groups.items():
        # Only ASCII digits in their plain spelling: "²" or "١" must not become a group number.
        gid = int(key) if key.isascii() and key.isdigit() and str(int(key)) == key else -1
        if gid not in members:
            raise UserError(f"{path}: group {key} is not in report {rep.report_id}")
        out[gid] = _decision(d, members[gid], import_mode, f"{path}: group {gid}")
    return out


def _decision(d: Any, members: set[str], import_mode: bool, where: str) -> Decision:
    if not isinstance(d, dict):
        raise UserError(f"{where}: a decision must be an object with kept, stay and skip")
    unknown = sorted(set(d) - {"kept", "stay", "skip"})
    if unknown:
        raise UserError(f"{where}: unknown field {unknown[0]!r}")
    skip, stay, kept = d.get("skip", False), d.get("stay"), d.get("kept")
    if not isinstance(skip, bool):
        raise UserError(f"{where}: skip must be true or false, not {json.dumps(skip)[:40]}")
    if stay is None:
        stay = []
    if not isinstance(stay, list):
        raise UserError(f"{where}: stay must be a list of paths, not {json.dumps(stay)[:40]}")
    named = [clean_path(p, import_mode, where) for p in stay]
    kept = None if kept is None else clean_path(kept, import_mode, where)
    for p in ([kept] if kept is not None else []) + named:
        if p not in members:
            raise UserError(f"{where} has no file {p!r}")
    return Decision(kept, frozenset(named), skip)

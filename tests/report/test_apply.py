"""`apply`: a review report's plan with the page's decisions on top, through the normal move path;
stale files stay, reports and decisions for something else are refused in one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from clipdedup.cli import dedup_cmd, run_cli
from clipdedup.errors import UserError
from clipdedup.pipeline import Group, RunSummary
from clipdedup.report import apply as report_apply
from clipdedup.report import core as report
from clipdedup.trash.undo import undo
from clipdedup.util.lock import trash_lock
from helpers import tree_hashes

# Three groups: g1 = a, b, c (kept a); g2 = d, e (kept d); g3 = f, g, h (kept f).
GROUPS = [["a", "b", "c"], ["d", "e"], ["f", "g", "h"]]


def _files(root: Path) -> None:
    root.mkdir()
    (root / "sub").mkdir()
    for k, name in enumerate(n for g in GROUPS for n in g):
        (root / f"sub/{name}.bin").write_bytes(os.urandom(100 + k))


def _report(root: Path, rep: Path, groups: list[list[str]] = GROUPS) -> dict:
    s = RunSummary(threshold=0.1, backend="reference")
    for g in groups:
        names = [f"sub/{n}.bin" for n in g]
        s.groups.append(Group(names, names[0], [], [(names[0], x, 0.01) for x in names[1:]]))
    report.write_report(s, str(rep), {"": str(root)}, strategy="largest", dry_run=True)
    return json.loads((rep / "report.json").read_text())


def _decisions(doc: dict, groups: dict[int, dict], path: Path) -> str:
    d = {"format": report_apply.DECISIONS_FORMAT, "report_id": doc["report_id"], "groups": groups}
    path.write_text(json.dumps(d))
    return str(path)


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path, Path, dict]:
    root, rep, trash = tmp_path / "pics", tmp_path / "rep", tmp_path / "trash"
    _files(root)
    return root, rep, trash, _report(root, rep)


def _moved(trash: Path) -> set[str]:
    return set(tree_hashes(trash))


def test_report_records_hash_and_id(setup) -> None:
    root, _, _, doc = setup
    assert doc["report_id"] and doc["run_id"] is None
    for g in doc["groups"]:
        for m in g["members"]:
            data = (root / m["path"]).read_bytes()
            assert m["size"] == len(data) and m["hash"].startswith("blake2b:")
            assert m["mtime_ns"] == (root / m["path"]).stat().st_mtime_ns


def test_plan_without_decisions_then_undo(setup) -> None:
    root, rep, trash, _ = setup
    before = tree_hashes(root)
    res = report_apply.apply_report(str(rep), str(trash))
    assert _moved(trash) == {"sub/b.bin", "sub/c.bin", "sub/e.bin", "sub/g.bin", "sub/h.bin"}
    assert (res.moved("tool"), res.moved("decision"), len(res.stays)) == (5, 0, 0)
    assert {r.rel: tree_hashes(trash)[r.rel] for _, r in res.moves} == {p: before[p] for p in _moved(trash)}
    results = undo(str(trash), res.run_id)
    assert {r.status for r in results} == {"restored"}
    assert tree_hashes(root) == before and _moved(trash) == set()


def test_decisions_on_top(setup, tmp_path: Path) -> None:
    root, rep, trash, doc = setup
    dec = _decisions(
        doc,
        {
            "1": {"kept": "sub/b.bin", "stay": ["sub/c.bin"]},
            "2": {"skip": True},
            "3": {"stay": ["sub/h.bin"]},
        },
        tmp_path / "decisions.json",
    )
    dry = report_apply.apply_report(str(rep), str(trash), decisions=dec, dry_run=True)
    assert not trash.exists() and dry.journal is None
    res = report_apply.apply_report(str(rep), str(trash), decisions=dec)
    # g1: b kept instead of a, so a moves (the user's move), c stays (marked); g2 skipped; g3: g moves.
    assert _moved(trash) == {"sub/a.bin", "sub/g.bin"}
    assert [(p.path, p.origin) for p, _ in dry.moves] == [(p.path, p.origin) for p, _ in res.moves]
    assert (res.moved("tool"), res.moved("decision")) == (1, 1)
    # b (now kept), c (marked), e (skipped group), h (marked): the tool would have moved each.
    assert sorted(p.path for p in res.stays) == ["sub/b.bin", "sub/c.bin", "sub/e.bin", "sub/h.bin"]
    assert res.skipped_groups == 1
    text = report_apply.summary_text(res, dry_run=False)
    assert "moved 2 (1 from the report's plan, 1 from your decisions)" in text
    assert "4 stay by your decisions (1 groups skipped)" in text


def test_plan_group_is_the_pages_rule() -> None:
    members = [{"path": p} for p in ("a", "b", "c")] + [{"path": "base:z", "base": True}]
    g = {"id": 7, "kept": "a", "members": members}
    plan = {p.path: (p.moves, p.origin) for p in report_apply.plan_group(g, None)}
    assert plan == {"a": (False, "tool"), "b": (True, "tool"), "c": (True, "tool")}
    d = report_apply.Decision(kept="c", stay=frozenset({"b"}))
    plan = {p.path: (p.moves, p.origin) for p in report_apply.plan_group(g, d)}
    assert plan == {"a": (True, "decision"), "b": (False, "decision"), "c": (False, "decision")}
    skip = report_apply.plan_group(g, report_apply.Decision(kept="c", skip=True))
    assert not any(p.moves for p in skip)


def test_stale_files_stay(setup) -> None:
    root, rep, trash, _ = setup
    b, e, f = root / "sub/b.bin", root / "sub/e.bin", root / "sub/f.bin"
    st = b.stat()
    b.write_bytes(b"X" * st.st_size)  # same size, same mtime: only the hash can tell
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.utime(e, ns=(1, 1))  # another mtime
    f.write_bytes(f.read_bytes() + b"!")  # the kept file of group 3 changed
    res = report_apply.apply_report(str(rep), str(trash))
    why = {r.rel: r.reason for _, r in res.moves if r.dest is None}
    assert why["sub/b.bin"] == "content changed since the report was written"
    assert why["sub/e.bin"] == "size or mtime changed since the report was written"
    assert why["sub/g.bin"].startswith(f"its kept copy {f}") and why["sub/h.bin"] == why["sub/g.bin"]
    assert _moved(trash) == {"sub/c.bin"}
    (root / "sub/c.bin").touch()  # gone from the image dir: moved already; stays in the trash
    gone = report_apply.apply_report(str(rep), str(trash / "second"), dry_run=True)
    why_c = {r.rel: r.reason for _, r in gone.moves}["sub/c.bin"]
    assert why_c == "size or mtime changed since the report was written"


def test_gone_file_stays_with_reason(setup) -> None:
    root, rep, trash, _ = setup
    (root / "sub/c.bin").unlink()
    res = report_apply.apply_report(str(rep), str(trash), dry_run=True)
    assert {r.rel: r.reason for _, r in res.moves}["sub/c.bin"].startswith(
        "gone since the report was written"
    )


def test_mismatched_reports_and_decisions_are_refused(setup, tmp_path: Path) -> None:
    root, rep, trash, doc = setup
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(UserError, match="report written for image dir"):
        report_apply.apply_report(str(rep), str(trash), image_dir=str(other))
    report_apply.apply_report(str(rep), str(trash), image_dir=str(root), dry_run=True)

    rep2 = tmp_path / "rep2"
    doc2 = _report(root, rep2)
    assert doc2["report_id"] != doc["report_id"]
    dec = _decisions(doc2, {"1": {"skip": True}}, tmp_path / "d2.json")
    with pytest.raises(UserError, match="decisions for report"):
        report_apply.apply_report(str(rep), str(trash), decisions=dec)
    for bad, msg in [
        ({"9": {"skip": True}}, "group 9 is not in report"),
        ({"1": {"kept": "sub/e.bin"}}, "group 1 has no file 'sub/e.bin'"),
        ({"2": {"stay": ["nope"]}}, "group 2 has no file 'nope'"),
    ]:
        with pytest.raises(UserError, match=msg):
            report_apply.apply_report(
                str(rep), str(trash), decisions=_decisions(doc, bad, tmp_path / "d.json")
            )
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(UserError, match="not a decisions file"):
        report_apply.apply_report(str(rep), str(trash), decisions=str(tmp_path / "junk.json"))
    assert not trash.exists()  # nothing was moved by any refused call


def test_unusable_reports_are_refused(setup, tmp_path: Path) -> None:
    root, rep, trash, doc = setup
    with pytest.raises(UserError, match="no report here"):
        report_apply.apply_report(str(tmp_path), str(trash))
    with pytest.raises(UserError, match="must not be the image dir"):
        report_apply.apply_report(str(rep), str(tmp_path))
    old = dict(doc)
    del old["report_id"]
    (rep / "report.json").write_text(json.dumps(old))
    with pytest.raises(UserError, match="older version"):
        report_apply.apply_report(str(rep), str(trash))
    (rep / "report.json").write_text(json.dumps(doc | {"groups": [{"id": 1}]}))
    with pytest.raises(UserError, match="a group must be an object with a list of members"):
        report_apply.apply_report(str(rep), str(trash))
    doc["groups"][0]["members"][1]["status"] = "moved"
    (rep / "report.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match="already moved 1 files"):
        report_apply.apply_report(str(rep), str(trash))


def test_trash_dir_is_locked(setup) -> None:
    _, rep, trash, _ = setup
    with trash_lock(str(trash)):
        with pytest.raises(UserError, match="in use by another run"):
            report_apply.apply_report(str(rep), str(trash))
        report_apply.apply_report(str(rep), str(trash), dry_run=True)  # a dry run locks nothing


def test_import_report_never_moves_base_files(tmp_path: Path) -> None:
    base, imp, rep, trash = tmp_path / "base", tmp_path / "imp", tmp_path / "rep", tmp_path / "trash"
    base.mkdir()
    imp.mkdir()
    (base / "x.bin").write_bytes(b"same")
    (base / "y.bin").write_bytes(b"same")
    (imp / "n.bin").write_bytes(b"same")
    s = RunSummary(threshold=0.1)
    s.groups.append(
        Group(["n.bin", "base:x.bin", "base:y.bin"], "base:x.bin", [], [("n.bin", "base:x.bin", 0)])
    )
    report.write_report(s, str(rep), {"": str(imp), "base:": str(base)}, strategy="largest", dry_run=True)
    doc = json.loads((rep / "report.json").read_text())
    dec = _decisions(doc, {"1": {"kept": "base:y.bin"}}, tmp_path / "d.json")
    res = report_apply.apply_report(str(rep), str(trash), decisions=dec)
    assert _moved(trash) == {"n.bin"} and sorted(os.listdir(base)) == ["x.bin", "y.bin"]
    assert res.moves[0][0].kept == "base:y.bin"
    with pytest.raises(UserError, match="inside the base image dir"):
        report_apply.apply_report(str(rep), str(base / "t"))


def test_cli_apply(setup, tmp_path: Path, capsys) -> None:
    root, rep, trash, doc = setup
    dec = _decisions(doc, {"1": {"kept": "sub/c.bin"}}, tmp_path / "decisions.json")
    assert run_cli(dedup_cmd, "test", ["apply", str(rep), "-t", str(trash), "--decisions", dec, "-n"]) == 0
    out, err = capsys.readouterr()
    assert f"would move {root}/sub/a.bin -> {trash}/sub/a.bin (kept sub/c.bin; your decision)" in out
    assert "would move 5 (4 from the report's plan, 1 from your decisions)" in err
    assert not trash.exists()
    assert run_cli(dedup_cmd, "test", ["apply", str(rep), "-t", str(trash), "--decisions", dec]) == 0
    out, err = capsys.readouterr()
    assert _moved(trash) == {"sub/a.bin", "sub/b.bin", "sub/e.bin", "sub/g.bin", "sub/h.bin"}
    assert "to undo: clip-image-deduper undo" in err
    dec2 = _decisions({"report_id": "someone-else"}, {}, tmp_path / "d2.json")
    assert run_cli(dedup_cmd, "test", ["apply", str(rep), "-t", str(trash), "--decisions", dec2]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "decisions for report someone-else" in err

"""`apply` under attack (issue 25): a report applied from another working directory or to a dir that
only looks like its own, one file named under two spellings, and malformed reports and decisions.
Each is refused in one line (exit 2) or applied to the dirs the report was made from."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from clipdedup.cli import dedup_cmd, run_cli
from clipdedup.errors import UserError
from clipdedup.pipeline import Group, RunSummary
from clipdedup.report import apply as report_apply
from clipdedup.report import core as report
from helpers import tree_hashes

NAMES = ["a", "b", "c"]  # one group, kept a


@pytest.fixture
def made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, dict]:
    """pics/ with one group, and a dry-run report of it written with the image dir typed relative."""
    root = tmp_path / "pics"
    (root / "sub").mkdir(parents=True)
    for k, n in enumerate(NAMES):
        (root / f"sub/{n}.bin").write_bytes(os.urandom(100 + k))
    s = RunSummary(threshold=0.1, backend="reference")
    names = [f"sub/{n}.bin" for n in NAMES]
    s.groups.append(Group(names, names[0], [], [(names[0], x, 0.01) for x in names[1:]]))
    monkeypatch.chdir(tmp_path)
    report.write_report(s, "rep", report.report_roots("pics"), strategy="largest", dry_run=True)
    return root, tmp_path / "rep", json.loads((tmp_path / "rep/report.json").read_text())


def _cli(args: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = run_cli(dedup_cmd, "t", ["apply", *args])
    return code, capsys.readouterr().err


def _moved(res: report_apply.ApplyResult) -> list[str]:
    return sorted(r.source for _, r in res.moves if r.dest)


def _write(rep: Path, doc: dict) -> None:
    (rep / "report.json").write_text(json.dumps(doc))


def test_roots_are_absolute_and_cwd_does_not_matter(made, tmp_path: Path, monkeypatch) -> None:
    root, rep, doc = made
    assert doc["roots"] == {"": str(root)} and doc["root_ids"][""] == [root.stat().st_dev, root.stat().st_ino]
    backup = tmp_path / "backup"
    shutil.copytree(root, backup / "pics")  # a mirror: same names, sizes, mtimes and hashes
    mirror = tree_hashes(backup)
    monkeypatch.chdir(backup)
    res = report_apply.apply_report("../rep", "../trash")
    assert tree_hashes(backup) == mirror  # the mirror is not the report's image dir
    assert _moved(res) == [str(root / "sub/b.bin"), str(root / "sub/c.bin")]


def test_a_dir_that_replaced_the_reports_root_is_refused(made, tmp_path: Path, capsys) -> None:
    root, rep, _ = made
    os.rename(root, tmp_path / "pics.old")
    shutil.copytree(tmp_path / "pics.old", root)  # the same files at the same path, another dir
    before = tree_hashes(tmp_path)
    code, err = _cli([str(rep), "-t", str(tmp_path / "trash")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "is not the directory the report was made from" in err
    assert tree_hashes(tmp_path) == before


def test_old_report_with_a_relative_root(made, tmp_path: Path, capsys) -> None:
    root, rep, doc = made
    del doc["root_ids"]
    _write(rep, doc | {"roots": {"": "pics"}})
    code, err = _cli([str(rep), "-t", str(tmp_path / "trash"), "-n"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "records its image dir as the relative path 'pics'" in err and "-i DIR" in err
    other = tmp_path / "other"
    other.mkdir()
    code, err = _cli([str(rep), "-t", str(tmp_path / "trash"), "-n", "-i", str(other)], capsys)
    assert code == 2 and "relative path 'pics'" in err
    res = report_apply.apply_report(str(rep), str(tmp_path / "trash"), image_dir=str(root), dry_run=True)
    assert _moved(res) == [str(root / "sub/b.bin"), str(root / "sub/c.bin")]
    _write(rep, doc | {"roots": {"": "pics", "base:": "base"}})
    with pytest.raises(UserError, match="records its base dir as the relative path 'base'"):
        report_apply.apply_report(str(rep), str(tmp_path / "trash"), image_dir=str(root))


@pytest.mark.parametrize("spelling", ["./sub/a.bin", "sub//a.bin", "sub/./a.bin"])
def test_the_kept_file_under_another_spelling_is_refused(made, tmp_path: Path, spelling, capsys) -> None:
    root, rep, doc = made
    g = doc["groups"][0]
    g["members"].append(dict(g["members"][0], path=spelling, kept=False, status="would move"))
    _write(rep, doc)
    before = tree_hashes(root)
    code, err = _cli([str(rep), "-t", str(tmp_path / "trash")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "names 'sub/a.bin' twice" in err
    assert tree_hashes(root) == before


@pytest.mark.parametrize(
    "path, why",
    [
        ("../pics/sub/a.bin", "climbs out of the image dir with '..'"),
        ("sub/../../x.bin", "climbs out of the image dir with '..'"),
        ("/etc/hostname", "is absolute"),
    ],
)
def test_paths_that_leave_the_image_dir_are_refused_saying_why(made, tmp_path, path, why, capsys) -> None:
    root, rep, doc = made
    g = doc["groups"][0]
    g["members"].append(dict(g["members"][1], path=path))
    _write(rep, doc)
    code, err = _cli([str(rep), "-t", str(tmp_path / "trash")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert why in err and "symlinked" not in err
    assert not (tmp_path / "trash").exists()


def test_decision_paths_are_normalised(made, tmp_path: Path) -> None:
    root, rep, doc = made
    dec = {"format": "clipdedup-decisions", "report_id": doc["report_id"]}
    dec["groups"] = {"1": {"kept": "./sub/c.bin", "stay": ["sub//b.bin"]}}
    (tmp_path / "d.json").write_text(json.dumps(dec))
    res = report_apply.apply_report(str(rep), str(tmp_path / "trash"), decisions=str(tmp_path / "d.json"))
    assert [(p.path, p.kept) for p, r in res.moves if r.dest] == [("sub/a.bin", "sub/c.bin")]
    assert sorted(os.listdir(root / "sub")) == ["b.bin", "c.bin"]


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(
    "groups, why",
    [
        ({"1": {"stay": 5}}, "stay must be a list of paths"),
        ({"1": {"stay": "abc"}}, "stay must be a list of paths"),
        ({"1": {"skip": "false"}}, "skip must be true or false"),
        ({"1": {"skip": 0}}, "skip must be true or false"),
        ({"1": {"kept": ["sub/b.bin"]}}, "a path must be a string"),
        ({"1": {"kept": "sub/b.bin", "keep": 1}}, "unknown field 'keep'"),
        ({"1": 7}, "a decision must be an object"),
        ({"²": {"skip": True}}, "group ² is not in report"),
        ({"١": {"skip": True}}, "group ١ is not in report"),
        ({"01": {"skip": True}}, "group 01 is not in report"),
        (["1"], "'groups' must be an object"),
        ("DEEP", "nested too deeply"),
    ],
)
def test_malformed_decisions_are_one_line_and_exit_2(made, tmp_path, groups, why, capsys) -> None:
    root, rep, doc = made
    text = json.dumps({"format": "clipdedup-decisions", "report_id": doc["report_id"], "groups": groups})
    (tmp_path / "d.json").write_text(text.replace('"DEEP"', DEEP))
    before = tree_hashes(root)
    args = [str(rep), "-t", str(tmp_path / "trash"), "--decisions", str(tmp_path / "d.json")]
    code, err = _cli(args, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and why in err, err
    assert tree_hashes(root) == before and not (tmp_path / "trash").exists()


def _kept_not_member(doc: dict) -> None:
    doc["groups"][0]["kept"] = "sub/zzz.bin"


def _member_size_text(doc: dict) -> None:
    doc["groups"][0]["members"][1]["size"] = "101"


@pytest.mark.parametrize(
    "damage, why",
    [
        (_kept_not_member, "its kept file 'sub/zzz.bin' is not one of its members"),
        (_member_size_text, "size and mtime_ns must be integers"),
        (lambda d: d.update(groups={"1": d["groups"][0]}), "older version"),
        (lambda d: d["groups"][0].update(id="1"), "a group id must be a positive integer"),
        (lambda d: d["groups"][0].update(id=True), "a group id must be a positive integer"),
        (lambda d: d["groups"][0].update(members={"sub/a.bin": {}}), "a list of members"),
        (lambda d: d.update(roots=["pics"]), "its roots are missing"),
        (lambda d: d.update(groups=d["groups"] * 2), "two groups share one id"),
        (lambda d: d.update(root_ids={"": "x"}), "root_ids must give"),
        (lambda d: d.update(report_id="DEEP"), "nested too deeply"),
    ],
)
def test_malformed_reports_are_one_line_and_exit_2(made, tmp_path, damage, why, capsys) -> None:
    root, rep, doc = made
    damage(doc)
    (rep / "report.json").write_text(json.dumps(doc).replace('"DEEP"', DEEP))
    before = tree_hashes(root)
    code, err = _cli([str(rep), "-t", str(tmp_path / "trash")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and why in err, err
    assert tree_hashes(root) == before and not (tmp_path / "trash").exists()


@pytest.mark.parametrize("rel", ["../x.bin", "sub/../../x.bin", "/etc/x.bin"])
def test_the_move_itself_names_a_path_out_for_what_it_is(tmp_path: Path, rel: str) -> None:
    from clipdedup.records import FileEntry
    from clipdedup.trash.move import move_duplicate

    (tmp_path / "img").mkdir()
    (tmp_path / "x.bin").write_bytes(b"x")
    (tmp_path / "img/k.bin").write_bytes(b"x")
    r = move_duplicate(
        str(tmp_path / "img"), str(tmp_path / "t"), FileEntry(rel, 0, 1), str(tmp_path / "img/k.bin")
    )
    assert r.dest is None and "absolute or climbs out of the image dir with '..'" in (r.reason or "")

"""The review report: groups as JSON / CSV / HTML, kept file and why, exact groups, thumbnail cache."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from clipdedup.cli import dedup_cmd, import_cmd, run_cli
from clipdedup.errors import UserError
from clipdedup.records import Group, MoveResult, RunSummary, UpdateSummary
from clipdedup.report import core as report
from clipdedup.report import html as report_html
from helpers import run_cli_json

NASTY = ["<b>&\"x'.jpg", "space and ünïcode.jpg"]
SRC = "base_images/ukbench01380.jpg"


def _tree(testdata: Path, root: Path) -> Path:
    """Byte-identical copies under awkward names, a resized near-copy, and an unrelated image."""
    root.mkdir(parents=True)
    for name in NASTY + ["plain.jpg"]:
        shutil.copy2(testdata / SRC, root / name)
    os.makedirs(root / "sub")
    shutil.copy(testdata / "base_images/ukbench09012.jpg", root / "sub" / "other.jpg")
    return root


def test_dry_run_report_files(testdata: Path, tmp_path: Path, tiny_model: str, capsys) -> None:
    pics = _tree(testdata, tmp_path / "pics")
    rep, trash = tmp_path / "rep", tmp_path / "trash"
    args = ["-i", str(pics), "-d", str(tmp_path / "db"), "-t", str(trash), "-m", tiny_model, "-th", "1e-4"]
    s = run_cli_json(dedup_cmd, args + ["-n", "--report", str(rep)], capsys)
    assert not trash.exists() and sorted(os.listdir(pics)) == sorted(NASTY + ["plain.jpg", "sub"])

    doc = json.loads((rep / "report.json").read_text())
    assert doc["dry_run"] is True and doc["keeping_logic"] == "largest"
    assert len(doc["groups"]) == len(s["groups"]) == 1
    g = doc["groups"][0]
    assert g["exact"] is True
    assert {m["path"] for m in g["members"]} == set(NASTY + ["plain.jpg"])
    kept = [m for m in g["members"] if m["kept"]]
    assert [m["path"] for m in kept] == [g["kept"]] == [s["groups"][0]["kept"]]
    assert "largest" in g["why"] and "tied" in g["why"]  # equal sizes and mtimes: byte order decides
    for m in g["members"]:
        if not m["kept"]:
            assert m["status"] == "would move"
            assert m["dest"] == str(trash / m["path"])
            assert m["exact_of"] == g["kept"] and m["to_kept"] is not None

    with open(rep / "groups.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {r["path"] for r in rows} == set(NASTY + ["plain.jpg"])
    assert sum(r["kept"] == "1" for r in rows) == 1
    with open(rep / "pairs.csv", newline="", encoding="utf-8") as f:
        pairs = list(csv.DictReader(f))
    assert len(pairs) == 3 and all(float(p["distance"]) <= 1e-4 for p in pairs)

    page = (rep / "index.html").read_text(encoding="utf-8")
    assert "<b>" not in page  # every '<' of the data is escaped inside its <script>
    data = _page_data(rep)
    assert data["report_id"] == doc["report_id"] and data["applicable"] is True
    (pg,) = data["groups"]
    assert {m["p"] for m in pg["members"]} == set(NASTY + ["plain.jpg"]) and pg["exact"] is True
    thumbs = list((rep / "thumbs").rglob("*.jpg"))
    assert len(thumbs) == len(NASTY) + 1  # one per member; the unrelated image is in no group
    assert {m["t"] for m in pg["members"]} == {t.relative_to(rep).as_posix() for t in thumbs}


def _page_data(rep: Path) -> dict:
    """The groups' data embedded in index.html, as its script reads it."""
    page = (rep / "index.html").read_text(encoding="utf-8")
    m = re.search(r'<script id="clipdedup-data" type="application/json">(.*?)</script>', page, re.S)
    assert m is not None
    return json.loads(m.group(1))


def test_real_run_report_and_thumbnail_cache(
    testdata: Path, tmp_path: Path, tiny_model: str, capsys, monkeypatch
) -> None:
    pics = _tree(testdata, tmp_path / "pics")
    rep, trash = tmp_path / "rep", tmp_path / "trash"
    args = [
        "-i",
        str(pics),
        "-d",
        str(tmp_path / "db"),
        "-m",
        tiny_model,
        "-th",
        "1e-4",
        "--report",
        str(rep),
    ]
    run_cli_json(dedup_cmd, args, capsys)  # no trash dir: nothing moves
    g = json.loads((rep / "report.json").read_text())["groups"][0]
    assert {m["status"] for m in g["members"] if not m["kept"]} == {"not moved (no --trash-dir)"}
    before = {p: p.stat().st_mtime_ns for p in (rep / "thumbs").rglob("*.jpg")}

    made: list[str] = []
    real = report_html.make_thumb
    monkeypatch.setattr(report_html, "make_thumb", lambda p, d, n: made.append(p) or real(p, d, n))
    run_cli_json(dedup_cmd, args + ["-t", str(trash)], capsys)
    assert made == []  # cached: same path, mtime and size
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    g = json.loads((rep / "report.json").read_text())["groups"][0]
    for m in g["members"]:
        if m["kept"]:
            assert m["file"] == str(pics / m["path"]) and os.path.exists(m["file"])
        else:
            assert m["status"] == "moved" and m["file"] == m["dest"] and os.path.exists(m["dest"])
    assert g["exact"] is True  # computed from the moved files' new places
    assert _page_data(rep)["applicable"] is False  # moves done: the page offers no decisions


def test_import_report_marks_base_files(testdata: Path, tmp_path: Path, tiny_model: str, capsys) -> None:
    base = _tree(testdata, tmp_path / "base")
    imp = tmp_path / "imp"
    imp.mkdir()
    shutil.copy(testdata / SRC, imp / "new.jpg")
    rep = tmp_path / "rep"
    args = ["-bi", str(base), "-bd", str(tmp_path / "bdb"), "-ii", str(imp), "-id", str(tmp_path / "idb")]
    args += ["-m", tiny_model, "-th", "1e-4", "-n", "-t", str(tmp_path / "trash"), "--report", str(rep)]
    run_cli_json(import_cmd, args, capsys)
    doc = json.loads((rep / "report.json").read_text())
    assert doc["roots"] == {"": str(imp), "base:": str(base)}
    (g,) = doc["groups"]
    assert g["kept"].startswith("base:") and "import mode" in g["why"]
    by_path = {m["path"]: m for m in g["members"]}
    assert by_path["new.jpg"]["status"] == "would move"
    assert by_path["new.jpg"]["file"] == str(imp / "new.jpg")
    assert {p for p, m in by_path.items() if m["base"]} == {p for p in by_path if p.startswith("base:")}
    for p, m in by_path.items():
        if p.startswith("base:") and not m["kept"]:
            assert m["status"] == "base file (never moved)"
            assert m["file"] == str(base / p[len("base:") :])
    assert g["exact"] is True


def test_report_dir_inside_image_dir_is_refused(testdata: Path, tmp_path: Path, capsys) -> None:
    pics = _tree(testdata, tmp_path / "pics")
    with pytest.raises(UserError):
        report.check_report_dir(str(pics / "rep"), [str(pics)])
    report.check_report_dir(str(tmp_path / "rep"), [str(pics)])
    code = run_cli(dedup_cmd, "test", ["-i", str(pics), "-d", str(tmp_path / "db"), "--report", str(pics)])
    assert code == 2 and "report dir" in capsys.readouterr().err


def test_build_review_without_files(tmp_path: Path) -> None:
    """Members that are gone (or not images) still get a row: no size, no thumbnail, no crash."""
    s = RunSummary(threshold=0.5, backend="reference")
    moved = [MoveResult("b.jpg", str(tmp_path / "b.jpg"), None, "gone since the scan")]
    s.groups.append(
        Group(
            ["a.jpg", "b.jpg", "c.jpg"], "a.jpg", moved, [("a.jpg", "b.jpg", 0.25), ("b.jpg", "c.jpg", 0.5)]
        )
    )
    groups = report.write_report(
        s, str(tmp_path / "rep"), {"": str(tmp_path)}, strategy="newest", dry_run=True
    )
    (g,) = groups
    by = {m.path: m for m in g.members}
    assert by["b.jpg"].status == "stays: gone since the scan"
    assert by["c.jpg"].status == "not moved (no --trash-dir)"
    assert (by["b.jpg"].nearest, by["b.jpg"].to_kept) == (0.25, 0.25)
    assert (by["c.jpg"].nearest, by["c.jpg"].to_kept) == (0.5, None)
    assert not g.exact and all(m.size is None for m in g.members)
    assert [m["t"] for m in _page_data(tmp_path / "rep")["groups"][0]["members"]] == [None] * 3


def test_every_group_in_the_page_data(tmp_path: Path) -> None:
    s = RunSummary(threshold=0.1)
    for k in range(5):
        s.groups.append(
            Group([f"{k}a.jpg", f"{k}b.jpg"], f"{k}a.jpg", [], [(f"{k}a.jpg", f"{k}b.jpg", 0.01 * k)])
        )
    report.write_report(s, str(tmp_path), {"": str(tmp_path / "none")}, strategy="largest", dry_run=True)
    data = _page_data(tmp_path)
    assert [g["id"] for g in data["groups"]] == [1, 2, 3, 4, 5]
    assert [g["dmax"] for g in data["groups"]] == [0.01 * k for k in range(5)]
    assert [g["kept"] for g in data["groups"]] == [f"{k}a.jpg" for k in range(5)]
    assert [g["pairs"] for g in data["groups"]][1] == [[0, 1, 0.01]]  # members by index


def test_thumb_name_changes_with_file(tmp_path: Path) -> None:
    a = report_html.thumb_name("/x/a.jpg", 1, 10)
    assert a == report_html.thumb_name("/x/a.jpg", 1, 10)
    assert len({a, report_html.thumb_name("/x/a.jpg", 2, 10), report_html.thumb_name("/x/a.jpg", 1, 11)}) == 3
    assert report_html.thumb_name(os.fsdecode(b"/x/\xff.jpg"), 1, 1).startswith("thumbs/")


def test_summary_functions_still_work() -> None:
    s = RunSummary(threshold=0.1, backend="reference")
    d = report.summary_dict(s, dry_run=True)
    assert d["copied"] == 0 and d["groups"] == []
    assert "exact copies 0" in report.summary_text(d)
    assert report.move_lines(s, dry_run=True) == []


def test_non_utf8_names_are_written(tmp_path: Path, testdata: Path) -> None:
    """A file name that is not UTF-8 survives JSON (escaped), CSV (its bytes) and the page (\\xNN shown)."""
    root = tmp_path / "pics"
    root.mkdir()
    odd = os.fsdecode(b"caf\xe9 <1>.jpg")
    shutil.copy2(testdata / SRC, os.path.join(root, odd))
    shutil.copy2(testdata / SRC, root / "plain.jpg")
    s = RunSummary(threshold=0.1)
    s.groups.append(Group([odd, "plain.jpg"], "plain.jpg", [], [(odd, "plain.jpg", 0.0)]))
    rep = tmp_path / "rep"
    (g,) = report.write_report(s, str(rep), {"": str(root)}, strategy="largest", dry_run=True)
    assert g.exact and g.members[0].exact_of == "plain.jpg"
    doc = json.loads((rep / "report.json").read_text(encoding="ascii"))
    assert doc["groups"][0]["members"][0]["path"] == odd
    assert b"caf\xe9 <1>.jpg" in (rep / "groups.csv").read_bytes()
    (pg,) = _page_data(rep)["groups"]
    assert pg["members"][0]["p"] == odd and pg["members"][0]["s"] == "caf\\xe9 <1>.jpg"
    assert all(m["t"] for m in pg["members"])


def test_builtin_dct_report_lists_candidates_with_scores(testdata: Path, tmp_path: Path, capsys) -> None:
    """A model-free run: every screened candidate with its distance and check score, in report.json,
    candidates.csv and the HTML; turned-down candidates are listed, and only confirmed pairs group."""
    from PIL import Image, ImageOps

    from clipdedup.ingest.encode import dct

    pics = tmp_path / "pics"
    pics.mkdir()
    with Image.open(testdata / SRC) as im:
        im = im.convert("RGB")
        im.save(pics / "a.jpg", quality=95)
        im.resize((im.width // 2, im.height // 2)).save(pics / "a-small.jpg", quality=60)
        ImageOps.mirror(im).save(pics / "a-mirror.jpg", quality=95)
    shutil.copy(testdata / "base_images/ukbench09012.jpg", pics / "other.jpg")
    rep = tmp_path / "rep"
    # A screen loose enough to let the mirror image through: the check must turn it down.
    args = ["-i", str(pics), "-d", str(tmp_path / "db"), "-m", "builtin:dct", "-th", "1.3", "-n"]
    s = run_cli_json(dedup_cmd, args + ["--report", str(rep)], capsys)
    assert s["verification"]["min_score"] == dct.MIN_SCORE
    doc = json.loads((rep / "report.json").read_text())
    cands = {frozenset((c["a"], c["b"])): c for c in doc["candidates"]}
    small = cands[frozenset(("a.jpg", "a-small.jpg"))]
    assert small["confirmed"] is True and small["score"] >= dct.MIN_SCORE and small["distance"] <= 1.3
    mirror = cands[frozenset(("a.jpg", "a-mirror.jpg"))]
    assert mirror["confirmed"] is False and mirror["score"] < dct.MIN_SCORE
    assert doc["verification"]["candidates"] == len(cands) > doc["verification"]["confirmed"] >= 1
    assert [sorted(g["members"]) for g in s["groups"]] == [["a-small.jpg", "a.jpg"]]
    with open(rep / "candidates.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(cands) and {r["confirmed"] for r in rows} == {"0", "1"}
    page = (rep / "index.html").read_text(encoding="utf-8")
    assert "check score" in page and "turned down" in page and "a-mirror.jpg" in page
    (pg,) = _page_data(rep)["groups"]
    assert len(pg["pairs"]) == 1 and pg["pairs"][0][3] == small["score"]  # the score beside the distance


def test_names_that_a_spreadsheet_would_run_are_quoted_in_the_csvs(tmp_path: Path) -> None:
    """A file name starting with =, +, - or @ reaches groups.csv and pairs.csv with a single quote in
    front (OWASP's CSV-injection advice), so a spreadsheet shows it as text (issue #25, item 9)."""
    names = ["=HYPERLINK(1).jpg", "+1.jpg", "-2.jpg", "@SUM(A1).jpg", "plain.jpg"]
    s = RunSummary(threshold=0.1)
    s.groups.append(Group(names, "plain.jpg", [], [(n, "plain.jpg", 0.01) for n in names[:-1]]))
    rep = tmp_path / "rep"
    report.write_report(s, str(rep), {"": str(tmp_path)}, strategy="largest", dry_run=True)
    with open(rep / "groups.csv", newline="", encoding="utf-8") as f:
        paths = [row["path"] for row in csv.DictReader(f)]
    assert paths == ["'" + n for n in names[:-1]] + ["plain.jpg"]
    with open(rep / "pairs.csv", newline="", encoding="utf-8") as f:
        assert [row["a"] for row in csv.DictReader(f)] == ["'" + n for n in names[:-1]]
    doc = json.loads((rep / "report.json").read_text())
    assert [m["path"] for m in doc["groups"][0]["members"]] == names  # JSON holds the names as they are


def test_skipped_paths_are_named_as_group_members_are(tmp_path: Path) -> None:
    """--json names every file relative to its image dir, skipped ones too: base files of an import
    run with "base:", a DB file by its image, the image dir itself "." (issue #25, item 9)."""
    base, imp = tmp_path / "base", tmp_path / "base" / "new"  # an import dir inside the base dir
    s = RunSummary(threshold=0.1)
    s.dirs = {"base": (str(base), str(tmp_path / "bdb")), "import": (str(imp), str(tmp_path / "idb"))}
    s.updates["base"] = UpdateSummary(failed=[(str(base / "a" / "x.jpg"), "truncated")])
    s.updates["import"] = UpdateSummary(
        failed=[(str(imp / "y.jpg"), "truncated")], scan_errors=[(str(imp), "cannot list directory")]
    )
    s.load_errors = [(str(tmp_path / "idb" / "z.jpg.npy"), "bad magic"), ("/elsewhere/q.jpg", "odd")]
    got = {d["path"]: d["reason"] for d in report.summary_dict(s, dry_run=True)["skipped"]}
    assert got == {
        "base:a/x.jpg": "truncated",
        "y.jpg": "truncated",
        ".": "cannot list directory",
        "z.jpg": "its DB file: bad magic",
        "/elsewhere/q.jpg": "odd",
    }

"""Chains (issue #25, item 6): a file moves only if it is itself a near-duplicate of the file kept;
the rest of a chained group is regrouped or stays, and the summary and report say why."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from clipdedup import db as dbmod
from clipdedup.pipeline import RunOptions, run_dedup
from clipdedup.report.core import summary_dict, write_report

D = 8
MODEL = "fabricated/rows"
T = 0.1


def _collection(root: Path, rows: dict[str, tuple[float, int]]) -> tuple[Path, Path]:
    """Images of `size` bytes whose rows lie at `offset` along one axis (distance = offset gap)."""
    img, db = root / "img", root / "db"
    img.mkdir(parents=True)
    dbmod.write_meta(db, dbmod.DBMeta(MODEL, D))
    for k, (rel, (offset, size)) in enumerate(sorted(rows.items())):
        mtime = 1_600_000_000_000_000_000 + k
        p = img / rel
        p.write_bytes(b"\xff" * size)
        os.utime(p, ns=(mtime, mtime))
        v = np.zeros(D, np.float32)
        v[0], v[1] = 1.0, offset
        dbmod.write_embedding(db, rel, v, mtime)
    return img, db


def _run(img: Path, db: Path, trash: Path | None, *, dry_run: bool = False):
    opts = RunOptions(skip_update=True, threshold=T, dry_run=dry_run, log=lambda line: None)
    return run_dedup(str(img), str(db), None if trash is None else str(trash), opts)


def test_chain_a_b_c_moves_only_b(tmp_path: Path) -> None:
    # A~B (0.08), B~C (0.08), A!~C (0.16); A is the largest, so it is kept.
    img, db = _collection(tmp_path, {"a.jpg": (0.0, 30), "b.jpg": (0.08, 20), "c.jpg": (0.16, 10)})
    s = _run(img, db, tmp_path / "trash")
    assert [(m.rel, m.dest is not None) for m in s.moved] == [("b.jpg", True)]
    assert sorted(p.name for p in img.iterdir()) == ["a.jpg", "c.jpg"]
    (g,) = s.groups
    assert g.members == ["a.jpg", "b.jpg"] and g.kept == "a.jpg"
    assert [p for p, _ in g.stayed] == ["c.jpg"]
    assert "not a near-duplicate of the kept file a.jpg" in g.stayed[0][1] and "b.jpg" in g.stayed[0][1]
    d = summary_dict(s, dry_run=False)
    assert d["groups"][0]["stayed"] == [{"path": "c.jpg", "reason": g.stayed[0][1]}]


def test_chain_rest_is_regrouped_and_reported(tmp_path: Path) -> None:
    # A~B, B~C, C~D, A!~C, B!~D: keep A (largest), B moves; C and D form a group of their own.
    rows = {"a.jpg": (0.0, 40), "b.jpg": (0.08, 10), "c.jpg": (0.16, 30), "d.jpg": (0.24, 20)}
    img, db = _collection(tmp_path, rows)
    s = _run(img, db, None, dry_run=True)
    assert [(g.kept, g.members, g.split_from) for g in s.groups] == [
        ("a.jpg", ["a.jpg", "b.jpg"], None),
        ("c.jpg", ["c.jpg", "d.jpg"], "a.jpg"),
    ]
    # Each group's distances stay inside it (the report's page indexes pairs by member).
    assert [[(a, b) for a, b, _ in g.distances] for g in s.groups] == [
        [("a.jpg", "b.jpg")],
        [("c.jpg", "d.jpg")],
    ]
    assert [[(a, b) for a, b, _ in g.links] for g in s.groups] == [[("b.jpg", "c.jpg")], []]
    out = tmp_path / "review"
    groups = write_report(s, str(out), {"": str(img)}, strategy="largest", dry_run=True)
    assert "split from the group of a.jpg" in groups[1].why
    rep = json.loads((out / "report.json").read_text())
    assert [m["path"] for m in rep["groups"][1]["members"]] == ["c.jpg", "d.jpg"]


def test_stays_are_in_the_report_and_never_in_a_groups_members(tmp_path: Path) -> None:
    img, db = _collection(tmp_path, {"a.jpg": (0.0, 30), "b.jpg": (0.08, 20), "c.jpg": (0.16, 10)})
    s = _run(img, db, None, dry_run=True)
    out = tmp_path / "review"
    write_report(s, str(out), {"": str(img)}, strategy="largest", dry_run=True)
    rep = json.loads((out / "report.json").read_text())
    (g,) = rep["groups"]
    assert [m["path"] for m in g["members"]] == ["a.jpg", "b.jpg"]  # `apply` moves members only
    assert [st["path"] for st in g["stayed"]] == ["c.jpg"] and "a.jpg" in g["stayed"][0]["reason"]
    page = (out / "index.html").read_text()
    assert "not a near-duplicate of the kept file a.jpg" in page


def test_on_the_test_images_every_move_is_a_confirmed_pair_with_its_kept_file(
    pics: Path, tmp_path: Path
) -> None:
    # builtin:dct at a loose threshold, so the screen lets chains through and the check decides.
    opts = RunOptions(model_id="builtin:dct", threshold=1.3, log=lambda line: None)
    s = run_dedup(str(pics), str(tmp_path / "db"), str(tmp_path / "trash"), opts)
    assert s.verification is not None and s.moved
    confirmed = {frozenset((c.a, c.b)) for c in s.verification.candidates if c.confirmed}
    for g in s.groups:
        for m in g.moved:
            assert frozenset((m.rel, g.kept)) in confirmed, (m.rel, g.kept)
        assert all(frozenset((p, g.kept)) not in confirmed for p, _ in g.stayed)


def test_on_the_test_images_with_chains_every_move_is_within_the_threshold_of_its_kept_file(
    pics: Path, tmp_path: Path, tiny_model: str
) -> None:
    """The tiny random-weight model at a threshold where the test images' pairs chain (its distances
    mean nothing, which is the point: groups that are not cliques)."""
    from clipdedup.db import load_db
    from clipdedup.ingest.update import update_db
    from clipdedup.trash.group import group_pairs
    from helpers import all_distances

    db = tmp_path / "db"
    update_db(pics, db, tiny_model, log=lambda line: None)
    names, x = load_db(str(db))
    d = all_distances(x)
    upper = d[np.triu_indices(len(x), 1)]
    row = {n: k for k, n in enumerate(names)}
    for q in (0.02, 0.05, 0.1, 0.2, 0.3):
        t = float(np.quantile(upper, q))
        pairs = np.argwhere(np.triu(d <= t, 1))
        if any(not (d[np.ix_(g, g)] <= t).all() for g in group_pairs(len(x), pairs)):
            break
    else:
        raise AssertionError("no chain at any threshold tried")
    opts = RunOptions(model_id=tiny_model, threshold=t, log=lambda line: None)
    s = run_dedup(str(pics), str(db), str(tmp_path / "trash"), opts)
    assert s.moved and any(g.stayed or g.split_from for g in s.groups)
    for g in s.groups:
        for m in g.moved:
            assert d[row[m.rel], row[g.kept]] <= t, (m.rel, g.kept)
        for p, _ in g.stayed:
            assert d[row[p], row[g.kept]] > t


def test_import_mode_moves_an_import_file_only_for_its_own_pair_with_a_base_file(tmp_path: Path) -> None:
    """Import mode has no chains: I1~I2 and I2~B do not move I1 (I1!~B); pairs inside the import
    dir are never made."""
    from clipdedup.pipeline import run_import

    base_img, base_db = _collection(tmp_path / "b", {"b.jpg": (0.16, 10)})
    imp_img, imp_db = _collection(tmp_path / "i", {"i1.jpg": (0.0, 10), "i2.jpg": (0.08, 10)})
    opts = RunOptions(skip_update=True, threshold=T, log=lambda line: None)
    s = run_import(str(base_img), str(base_db), str(imp_img), str(imp_db), str(tmp_path / "trash"), opts)
    assert [(g.members, g.kept) for g in s.groups] == [(["i2.jpg"], "b.jpg")]
    assert [m.rel for m in s.moved] == ["i2.jpg"] and (imp_img / "i1.jpg").exists()

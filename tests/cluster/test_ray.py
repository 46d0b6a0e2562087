"""Encoding and matching on a local Ray cluster (`ray.init(num_cpus=2)`, one per module) against
the single-process run: same DB files, same failures, same pairs, same groups and moves; an actor
killed mid-run loses no image and leaves no partial file."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipdedup import cluster as cl
from clipdedup.cli import dedup_cmd, import_cmd, run_cli
from clipdedup.cluster.encode import KILL_ONCE_ENV, LOST, MISSING, check_planned, probe_verdict
from clipdedup.cluster.match import find_pairs_ray
from clipdedup.db import META_NAME, write_embedding
from clipdedup.errors import UserError
from clipdedup.ingest.update import update_db
from clipdedup.match import find_pairs
from clipdedup.records import FileEntry, UpdateSummary
from helpers import run_cli_json, tree_hashes


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory):
    """One local Ray instance for the module; the kill flag's path is set before the workers start
    so they inherit it (the flag file itself exists only during the kill test)."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    flag = tmp_path_factory.mktemp("ray_fault") / "kill-once"
    os.environ[KILL_ONCE_ENV] = str(flag)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        yield flag
    finally:
        ray.shutdown()
        os.environ.pop(KILL_ONCE_ENV, None)


def _quiet(line: str) -> None:
    pass


def _npy_files(db: Path) -> dict[str, bytes]:
    return {p.relative_to(db).as_posix(): p.read_bytes() for p in sorted(db.rglob("*.npy"))}


def _more_images(root: Path, n: int, seed: int = 0) -> None:
    """n small random JPEGs in a subfolder (enough rows for several Ray batches)."""
    rng = np.random.default_rng(seed)
    (root / "gen").mkdir()
    for k in range(n):
        px = rng.integers(0, 256, (48 + k % 5, 40 + k % 7, 3), np.uint8)
        Image.fromarray(px).save(root / "gen" / f"g{k:03d}.jpg", quality=85)


def _update(pics: Path, db: Path, model: str, cluster=None, **kw):
    if cluster is not None:
        kw["encoder"] = cluster.load_encoder(model)
    return update_db(str(pics), str(db), model, log=_quiet, **kw)


def test_open_clip_db_via_ray_matches(ray_cluster, pics: Path, tmp_path: Path, tiny_model: str) -> None:
    local = _update(pics, tmp_path / "db_local", tiny_model)
    with cl.RayCluster("local", actor_cpus=2) as c:  # one actor with both CPUs
        remote = _update(pics, tmp_path / "db_ray", tiny_model, c, batch_size=8)
    assert remote.encoded == local.encoded and remote.failed == local.failed
    a, b = _npy_files(tmp_path / "db_local"), _npy_files(tmp_path / "db_ray")
    assert a.keys() == b.keys()
    for rel in a:
        va, vb = (np.load(tmp_path / d / rel) for d in ("db_local", "db_ray"))
        assert float(va @ vb) >= 0.9999, rel
    meta = [json.loads((tmp_path / d / META_NAME).read_text()) for d in ("db_local", "db_ray")]
    assert meta[0] == meta[1]


def test_killed_actor_loses_no_image(ray_cluster, pics: Path, tmp_path: Path) -> None:
    """builtin:dct through Ray gives the single-process run's DB byte for byte and its failures, even
    though the first actor to take a batch is SIGKILLed with the batch in flight (Ray restarts it
    and re-runs the batch); no temp file is left over."""
    _more_images(pics, 40)
    local = _update(pics, tmp_path / "db_local", "builtin:dct", batch_size=4)
    ray_cluster.write_text("")
    seen: list[int] = []
    with cl.RayCluster("local") as c:
        c.on_batch = seen.append
        remote = _update(pics, tmp_path / "db_ray", "builtin:dct", c, batch_size=4)
    assert not ray_cluster.exists(), "no actor claimed the kill flag"
    assert len(seen) > 1 and seen == sorted(seen)  # results came back batch by batch
    assert remote.encoded == local.encoded and remote.failed == local.failed
    assert local.failed and local.encoded > 40
    a, b = _npy_files(tmp_path / "db_local"), _npy_files(tmp_path / "db_ray")
    assert a.keys() == b.keys() and a == b
    meta = [json.loads((tmp_path / d / META_NAME).read_text()) for d in ("db_local", "db_ray")]
    assert meta[0] == meta[1]
    leftovers = [p for p in (tmp_path / "db_ray").rglob("*") if p.is_file() and not p.name.endswith(".npy")]
    assert sorted(p.name for p in leftovers) == [META_NAME]


@pytest.mark.parametrize("n, m, block", [(0, 5, 4), (1, 0, 4), (63, 0, 16), (65, 0, 16), (65, 33, 7)])
def test_ray_matching_equals_find_pairs(ray_cluster, n: int, m: int, block: int) -> None:
    rng = np.random.default_rng(n * 100 + m)
    d = 13
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
    if n > 10:
        x[5:15] = x[0] + 0.02 * rng.standard_normal((10, d)).astype(np.float32)  # a dense cluster
        x[20] = x[40]  # an exact copy across blocks
        x[30, 2] = np.nan  # a row without a finite distance
    y = None
    if m:
        y = rng.standard_normal((m, d)).astype(np.float32)
        if n:
            y[:5] = x[:5] + 0.01
    c = cl.RayCluster("local", match=True, block_rows=block)
    threshold = 0.35
    want = find_pairs(x, threshold, y=y, backend="reference")
    ticks: list[int] = []
    got = find_pairs_ray(c, x, threshold, y=y, progress=ticks.append)
    assert np.array_equal(got[0], want[0])
    assert np.array_equal(got[1], want[1])
    if n and (m or y is None):
        assert len(want[0]) > 0 or n == 1
        nb = -(-n // block)
        tiles = nb * (nb + 1) // 2 if y is None else nb * -(-m // block)
        assert sum(ticks) == tiles


def _cli_run(cmd, args: list[str], capsys) -> dict:
    return run_cli_json(cmd, args, capsys)


def test_cli_ray_local_same_db_groups_and_moves(ray_cluster, pics: Path, tmp_path: Path, capsys) -> None:
    """The issue's done-when: -m builtin:dct --ray local gives the same DB files, groups and moves."""
    runs = {}
    for name, extra in (("local", []), ("ray", ["--ray", "local", "--ray-match"])):
        img = tmp_path / f"pics_{name}"
        shutil.copytree(pics, img)
        db, trash = tmp_path / f"db_{name}", tmp_path / f"trash_{name}"
        trash.mkdir()
        args = ["-i", str(img), "-d", str(db), "-t", str(trash), "-m", "builtin:dct", *extra]
        summary = _cli_run(dedup_cmd, args, capsys)
        for g in summary["groups"]:
            for mv in g["moves"]:
                mv["to"] = os.path.relpath(mv["to"], trash)
        runs[name] = (summary, _npy_files(db), tree_hashes(img), tree_hashes(trash))
    (s_local, db_local, img_local, trash_local), (s_ray, db_ray, img_ray, trash_ray) = (
        runs["local"],
        runs["ray"],
    )
    assert db_local == db_ray
    assert s_local["groups"] and s_local["groups"] == s_ray["groups"]
    assert trash_local and trash_local == trash_ray and img_local == img_ray
    assert s_ray["backend"].startswith("ray")


def test_cli_import_with_ray_client_path(ray_cluster, pics: Path, tmp_path: Path, capsys) -> None:
    """Import mode (the base DB read-only: vectors kept in memory) through the Ray Client path: with
    Ray already running in this process a ray:// address is not dialled, but the encoding takes
    the route a Ray Client driver needs (the Ray Data pipeline inside a `PipelineRunner` actor)."""
    base, imp = pics / "base_images", tmp_path / "import"
    shutil.copytree(pics / "mixed_images", imp)
    out = {}
    for name, extra in (("local", []), ("ray", ["--ray", "ray://127.0.0.1:10001", "--ray-match"])):
        args = ["-bi", str(base), "-bd", str(tmp_path / f"bdb_{name}"), "-ii", str(imp)]
        args += ["-id", str(tmp_path / f"idb_{name}"), "-m", "builtin:dct", "-n", *extra]
        out[name] = _cli_run(import_cmd, args, capsys)
    assert out["local"]["groups"] == out["ray"]["groups"]
    assert _npy_files(tmp_path / "idb_local") == _npy_files(tmp_path / "idb_ray") == {}  # -n: dry run


def test_driver_check_gives_every_planned_image_a_vector_or_a_reason(tmp_path: Path) -> None:
    todo = [FileEntry(f"{k}.jpg", 0, 1) for k in range(4)]
    paths = [str(tmp_path / e.rel) for e in todo]
    write_embedding(tmp_path / "db", "0.jpg", np.ones(3, np.float32))
    s = UpdateSummary(encoded=2, failed=[(paths[1], "bad file")])
    done = np.array([True, True, True, False])  # 2 came back but was never written; 3 never came back
    check_planned(todo, paths, done, tmp_path / "db", False, s, _quiet)
    assert s.failed == [(paths[1], "bad file"), (paths[3], LOST), (paths[2], MISSING)]
    assert s.encoded == 1
    s = UpdateSummary(encoded=1, in_memory={"0.jpg": np.ones(3, np.float32)})
    check_planned(todo[:2], paths[:2], np.array([True, True]), tmp_path / "nodb", True, s, _quiet)
    assert s.failed == [(paths[1], MISSING)] and s.encoded == 0


def test_probe_verdict_names_the_node() -> None:
    nodes = [{"NodeManagerAddress": "10.0.0.1"}, {"NodeManagerAddress": "10.0.0.2"}]
    probe_verdict(nodes, ["abc", "abc"], "abc", "/img/a.jpg")
    with pytest.raises(UserError, match=r"node 10\.0\.0\.2 cannot read /img/a\.jpg \(No such file"):
        probe_verdict(nodes, ["abc", "error: No such file or directory"], "abc", "/img/a.jpg")
    with pytest.raises(UserError, match="reads different bytes"):
        probe_verdict(nodes, ["abd", "abc"], "abc", "/img/a.jpg")


def test_without_ray_the_flag_says_how_to_install(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setattr(cl.importlib.util, "find_spec", lambda name: None)
    (tmp_path / "pics").mkdir()
    code = run_cli(
        dedup_cmd, "t", ["-i", str(tmp_path / "pics"), "-d", str(tmp_path / "db"), "--ray", "local"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pip install 'clip-image-deduper[ray]'" in err[0]


@pytest.mark.parametrize("address", ["bogus", "host:", "http://x:1"])
def test_bad_address_is_one_line(address: str, tmp_path: Path, capsys) -> None:
    (tmp_path / "pics").mkdir()
    code = run_cli(
        dedup_cmd, "t", ["-i", str(tmp_path / "pics"), "-d", str(tmp_path / "db"), "--ray", address]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--ray" in err[0]


def test_ray_match_needs_ray(tmp_path: Path, capsys) -> None:
    (tmp_path / "pics").mkdir()
    code = run_cli(dedup_cmd, "t", ["-i", str(tmp_path / "pics"), "-d", str(tmp_path / "db"), "--ray-match"])
    assert code == 2 and "--ray-match needs --ray" in capsys.readouterr().err

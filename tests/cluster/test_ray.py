"""Encoding and matching on a local Ray cluster (`ray.init(num_cpus=2)`, one per module) against
the single-process run: same DB files, same failures, same pairs, same groups and moves; an actor
killed mid-run loses no image and leaves no partial file; encode actors fit before decoding and run
one pipeline per shard; matching tasks read their rows from the DB's snapshot, not from the driver."""

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
from clipdedup.cluster.actors import KILL_ONCE_ENV
from clipdedup.cluster.encode import LOST, MISSING, check_planned, probe_verdict
from clipdedup.cluster.match import find_pairs_ray
from clipdedup.db import META_NAME, write_embedding
from clipdedup.errors import UserError
from clipdedup.ingest.unreadable import UNREADABLE_NAME
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

    def others(d: str) -> list[str]:  # no temporary file is left; the unreadable images are recorded
        files = (p for p in (tmp_path / d).rglob("*") if p.is_file())
        return sorted(p.name for p in files if not p.name.endswith(".npy"))

    assert others("db_ray") == others("db_local") == sorted([META_NAME, UNREADABLE_NAME])
    record = [json.loads((tmp_path / d / UNREADABLE_NAME).read_text()) for d in ("db_local", "db_ray")]
    assert record[0] == record[1]


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


# --------------------------------------------------------------------------- matching from the store
def _store_db(root: Path, n: int, seed: int = 0) -> np.ndarray:
    """n unit rows of width 24 with planted near copies, written as .npy files; returns them in
    the order `_open_store` opens them."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 24)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[1::7] = x[0::7][: len(x[1::7])] + 0.03 * rng.standard_normal((len(x[1::7]), 24)).astype(np.float32)
    for k, v in enumerate(x):
        write_embedding(root, f"r{k:04d}.jpg", v)
    return x


def _open_store(root: Path, **kw):
    from clipdedup import db as dbmod
    from clipdedup.db.rowstore import rows_of
    from clipdedup.db.store_load import open_store

    idx = dbmod.index_db(root)
    files = [idx.files[r] for r in sorted(idx.files)]
    store, ok, _ = open_store(root, rows_of(root, files), 24, started_ns=idx.started_ns, **kw)
    assert ok.all()
    return store


def _ray_equals_store(store, block: int) -> int:
    """find_pairs_ray of the store equals find_pairs_store's pairs; returns the rows it shipped."""
    from clipdedup.match.store import find_pairs_store

    want, d64 = find_pairs_store(store, 0.3, recipe="float32", block=16)
    c = cl.RayCluster("local", match=True, block_rows=block)
    got = find_pairs_ray(c, store, 0.3)
    assert len(want) > 5 and np.array_equal(got[0], want) and np.array_equal(got[1], d64.astype(np.float32))
    return c.shipped_rows


def test_match_tasks_read_the_snapshot_not_the_driver(ray_cluster, tmp_path: Path, monkeypatch) -> None:
    """A store whose writer wrote the snapshot: every row read from it (none shipped). A dry-run
    store over an older snapshot: only the rows added since travel through the object store."""
    from clipdedup.db import snapshot as snap_mod

    x = _store_db(tmp_path, 70)
    with _open_store(tmp_path) as store:  # no snapshot yet: written by the store's writer
        assert _ray_equals_store(store, 16) == 0
    monkeypatch.setattr(snap_mod, "RACY_NS", 0)  # the driver may reuse rows written just now
    for k in range(70, 75):
        write_embedding(tmp_path, f"r{k:04d}.jpg", x[k - 70] + 0.001)
    with _open_store(tmp_path, write_snapshot=False) as store:
        assert store.n == 75 and _ray_equals_store(store, 16) == 5


def test_match_tasks_ship_rows_when_the_snapshot_was_replaced(ray_cluster, tmp_path: Path) -> None:
    _store_db(tmp_path, 40)
    with _open_store(tmp_path) as store:
        store.wait()
        snap = Path(tmp_path / "clipdedup-snapshot.bin")
        data = bytearray(snap.read_bytes())
        data[30] ^= 1  # another file now (its header differs): the store's own rows travel
        snap.unlink()
        snap.write_bytes(bytes(data))
        store.writer = None
        assert store.shared_rows() is None
        assert _ray_equals_store(store, 16) == 40


def test_a_task_refuses_another_snapshot_at_the_path(tmp_path: Path) -> None:
    from clipdedup.cluster.rows import RowBlock, SnapshotRef, read_block

    (tmp_path / "s.bin").write_bytes(b"B" * 64)
    blk = RowBlock(0, np.zeros(1, np.int64), np.zeros(1, np.uint64), np.zeros((0, 4), np.float32))
    with pytest.raises(UserError, match="not the snapshot the driver opened"):
        read_block(SnapshotRef(str(tmp_path / "s.bin"), b"A" * 64, 4), blk, 4)
    with pytest.raises(UserError, match="cannot open"):
        read_block(SnapshotRef(str(tmp_path / "none.bin"), b"A" * 64, 4), blk, 4)


def test_shipped_rows_are_checked(tmp_path: Path) -> None:
    from clipdedup.cluster.rows import matrix_blocks, read_block
    from clipdedup.db.rowstore import RowStoreError

    blk = next(matrix_blocks(np.ones((3, 4), np.float32), 8))
    assert np.array_equal(read_block(None, blk, 4), np.ones((3, 4), np.float32))
    blk.shipped[1, 2] = 2
    with pytest.raises(RowStoreError):
        read_block(None, blk, 4)


def test_snapshot_probe_names_the_node() -> None:
    from clipdedup.cluster.rows import SnapshotRef, _probe_verdict

    said: list[str] = []
    src = SnapshotRef("/db/clipdedup-snapshot.bin", b"ab", 4)
    nodes = [{"NodeManagerAddress": "10.0.0.1"}, {"NodeManagerAddress": "10.0.0.2"}]
    assert _probe_verdict(nodes, ["6162", "6162"], src, said.append) and not said
    assert not _probe_verdict(nodes, ["6162", "error: No such file"], src, said.append)
    assert said == [
        "--ray-match: node 10.0.0.2 cannot read /db/clipdedup-snapshot.bin (No such file); "
        "the rows travel through Ray's object store instead"
    ]


# --------------------------------------------------------------------------------- encode actors
def test_encode_actor_fits_first_and_overlaps(
    pics: Path, tmp_path: Path, tiny_model: str, monkeypatch
) -> None:
    """In process (the actor's code without Ray): the runner is fitted in the constructor, before
    any decoding; one `iter_batches` serves the whole shard; batch k + 1 is submitted before batch
    k's vectors are collected; vectors and failures equal the local path's."""
    from clipdedup.cluster.actors import EncodeActor
    from clipdedup.ingest import decode
    from clipdedup.ingest.encode.batch_runner import BatchRunner

    local = _update(pics, tmp_path / "db", tiny_model, batch_size=4, dry_run=True)
    events: list[str] = []
    real_iter, real_fit = decode.iter_batches, BatchRunner.fit
    monkeypatch.setattr(decode, "iter_batches", lambda *a, **kw: events.append("iter") or real_iter(*a, **kw))
    monkeypatch.setattr(BatchRunner, "fit", lambda self, b: events.append(f"fit{b}") or real_fit(self, b))
    actor = EncodeActor(tiny_model, str(pics), "cpu", 4, 1)
    assert actor.info()["fitted"] and events == ["fit4"]
    submit = actor.enc.submit

    def recording_submit(items):
        k = sum(e.startswith("submit") for e in events)
        events.append(f"submit{k}")
        job = submit(items)

        class Job:
            def result(self):
                events.append(f"result{k}")
                return job.result()

        return Job()

    actor.enc.submit = recording_submit
    failed = {os.path.relpath(p, pics): why for p, why in local.failed}
    rels = sorted([*local.in_memory, *failed])
    out = list(actor.run(np.arange(100, 100 + len(rels)), [os.fsencode(r) for r in rels]))
    assert events[:5] == ["fit4", "iter", "submit0", "submit1", "result0"] and events.count("iter") == 1
    assert local.in_memory and failed and len(rels) > 8
    seen = set()
    for b in out:
        for i, v, why in zip(b["idx"].tolist(), b["vec"], b["reason"]):
            rel = rels[i - 100]
            seen.add(rel)
            if rel in failed:
                assert why and np.isnan(v).all()  # (locally a copy's reason names its original)
                assert why == failed[rel] or failed[rel].startswith("byte-identical")
            else:
                assert not why, rel  # equal up to float32 rounding (other batches, other threads)
                np.testing.assert_allclose(v, local.in_memory[rel], rtol=0, atol=2e-6)
    assert seen == set(rels)


def test_ray_actors_fit_at_start(ray_cluster, tiny_model: str, pics: Path) -> None:
    """The actors the cluster runs were fitted in their constructor and stay up across calls."""
    from clipdedup.cluster.actors import actor_pool

    with cl.RayCluster("local", actor_cpus=1) as c:
        enc = c.load_encoder(tiny_model)
        actors = actor_pool(c, enc, str(pics), 100, 8)
        ray = c.connect()
        first = ray.get([a.info.remote() for a in actors])
        again = ray.get([a.info.remote() for a in actors])
        for a in actors:
            ray.kill(a)
    assert len(actors) == 2 and all(i["fitted"] for i in first) and first == again


def test_an_actor_that_cannot_load_the_model_is_one_user_error(ray_cluster, pics: Path) -> None:
    """The constructor's error comes back as the user's error at once, not after restarts."""
    import types

    from clipdedup.cluster.actors import stream_results

    enc = types.SimpleNamespace(model_id="local-dir:/nonexistent/model", device="cpu")
    todo = [FileEntry(f"{k}.jpg", 0, 1) for k in range(3)]
    with cl.RayCluster("local") as c, pytest.raises(UserError, match="nonexistent"):
        list(stream_results(c, enc, str(pics), todo, 2))


def test_block_rows_grow_with_the_problem(monkeypatch) -> None:
    from clipdedup.cluster.session import BLOCK_ROWS_ENV, block_rows_for

    assert block_rows_for(1000, True) == 8192 and block_rows_for(10**6, False) == 20834
    assert block_rows_for(10**8, True) == 2083334 and block_rows_for(10**9, True) == 1 << 21
    assert block_rows_for(10**8, False) == 1 << 18
    monkeypatch.setenv(BLOCK_ROWS_ENV, "777")
    assert cl.RayCluster("local").block_rows == 777 and cl.RayCluster("local", block_rows=5).block_rows == 5

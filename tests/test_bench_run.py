"""bench/run.py plumbing with stand-in stage modules (nothing is timed here): wrong or unchecked
results get no speedup, a missing or failing module is reported and the rest still run, JSON and
plot are written; common.interleaved gives every contender the same rounds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import run as bench_run  # noqa: E402
from common import Row, interleaved, write_json  # noqa: E402


def _good(quick: bool) -> list[Row]:
    rows = []
    for n in (10, 100):
        rows.append(Row("match", "baseline: cdist loop", n, 2.0, n / 2.0, "rows/s"))
        rows.append(
            Row("match", "fast", n, 0.5, n / 0.5, "rows/s", correct=True, baseline="baseline: cdist loop")
        )
        rows.append(
            Row("match", "broken", n, 0.1, n / 0.1, "rows/s", correct=False, baseline="baseline: cdist loop")
        )
    rows.append(Row("quality", "dct", 34, 0.0, 0.9, "precision"))  # not a rate: table only, no plot
    return rows


def _boom(quick: bool) -> list[Row]:
    raise RuntimeError("stage blew up")


def _loader(name: str):
    table = {"bench_good": _good, "bench_boom": _boom}
    if name == "bench_missing":
        raise ModuleNotFoundError(f"No module named {name!r}")
    if name == "bench_badimport":
        raise SyntaxError("bad module")
    return table[name]


STAGES = [
    ("good", "bench_good"),
    ("boom", "bench_boom"),
    ("missing", "bench_missing"),
    ("bad", "bench_badimport"),
]


def test_run_all_reports_problems_and_refuses_wrong_speedups() -> None:
    seen: list[bool] = []

    def loader(name: str):
        fn = _loader(name)
        return lambda quick: seen.append(quick) or fn(quick)

    o = bench_run.run_all(True, STAGES, loader=loader, log=lambda line: None)
    assert seen == [True, True]  # both importable stages ran, in quick mode
    assert len(o.rows) == 7 and len(o.wrong) == 2
    assert [m for m, _ in o.problems] == ["bench_boom", "bench_missing", "bench_badimport"]
    assert "stage blew up" in o.problems[0][1] and "not available" in o.problems[1][1]
    text = bench_run.report_text(o)
    assert text.count("WRONG RESULT") >= 4  # in the table's speedup column and in the summary lines
    assert "x4.0 vs baseline" in text  # 2.0 s / 0.5 s
    broken_lines = [line for line in text.splitlines() if " broken " in line]
    assert broken_lines and not any(" x" in line for line in broken_lines)
    assert "PROBLEM: bench_boom" in text


def test_only_filters_stages() -> None:
    o = bench_run.run_all(False, STAGES, only={"good"}, loader=_loader, log=lambda line: None)
    assert not o.problems and len(o.rows) == 7


def test_json_and_series(tmp_path: Path) -> None:
    rows = _good(True)
    write_json(rows, tmp_path / "r.json")
    doc = json.loads((tmp_path / "r.json").read_text())
    by_impl = {(r["impl"], r["n"]): r for r in doc["rows"]}
    assert by_impl[("broken", 10)]["speedup"].startswith("WRONG RESULT")
    assert by_impl[("fast", 100)]["speedup"] == "x4.0"
    series = bench_run.throughput_series(rows)
    assert set(series) == {"match"}  # the precision row is not a throughput
    assert series["match"]["fast"] == [(10, 20.0, True), (100, 200.0, True)]
    assert all(not ok for _, _, ok in series["match"]["broken"])


def test_plot_is_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = bench_run.plot(_good(True), tmp_path / "p.png", "test")
    assert out is not None and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert bench_run.plot([Row("q", "x", 1, 0, 0.5, "precision")], tmp_path / "none.png") is None


def test_main_exit_code(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(bench_run, "STAGES", [("good", "bench_good")])
    monkeypatch.setattr(bench_run, "_load", _loader)
    code = bench_run.main(["--quick", "--json", str(tmp_path / "o.json"), "--plot", ""])
    assert code == 1  # the wrong rows make the run fail
    assert (tmp_path / "o.json").exists() and "WRONG RESULT" in capsys.readouterr().out


def _unchecked(quick: bool) -> list[Row]:
    base = "baseline: cdist loop"
    return [
        Row("match", base, 10, 2.0, 5.0, "rows/s"),
        Row("match", "fast", 10, 0.5, 20.0, "rows/s", correct=True, baseline=base),
        Row("match", "never checked", 10, 0.5, 20.0, "rows/s", correct=None, baseline=base),
        Row("match", "wrong base", 10, 2.0, 5.0, "rows/s", correct=False),
        Row("match", "fast vs wrong base", 10, 0.5, 20.0, "rows/s", correct=True, baseline="wrong base"),
    ]


def test_unchecked_rows_get_no_speedup_and_fail_the_run(tmp_path: Path, monkeypatch, capsys) -> None:
    o = bench_run.run_all(True, [("u", "bench_u")], loader=lambda name: _unchecked, log=lambda line: None)
    assert [r.impl for r in o.unchecked] == ["never checked"]
    text = bench_run.report_text(o)
    assert "UNCHECKED: match / never checked at n=10" in text
    assert [line for line in text.splitlines() if " never checked " in line and " x" in line] == []
    sp = common.speedups(o.rows)
    assert sp == {
        1: "x4.0",
        2: "UNCHECKED: no speedup reported",
        4: "baseline WRONG: no speedup reported",
    }
    assert bench_run.unverified_speedups(o.rows) == []
    monkeypatch.setattr(bench_run, "STAGES", [("u", "bench_u")])
    monkeypatch.setattr(bench_run, "_load", lambda name: _unchecked)
    code = bench_run.main(["--quick", "--json", str(tmp_path / "o.json"), "--plot", ""])
    assert code == 1
    doc = json.loads((tmp_path / "o.json").read_text())
    with_ratio = [r for r in doc["rows"] if (r["speedup"] or "").startswith("x")]
    assert [r["impl"] for r in with_ratio] == ["fast"] and all(r["correct"] is True for r in with_ratio)
    assert "UNCHECKED" in capsys.readouterr().out


def test_a_ratio_without_a_passed_check_is_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    """The last guard before the JSON: even a speedups() that forgot the rule cannot publish one."""
    monkeypatch.setattr(bench_run, "speedups", lambda rows: {k: "x2.0" for k in range(len(rows))})
    refused = bench_run.unverified_speedups(_unchecked(True))
    assert [r.impl for r in refused] == [
        "baseline: cdist loop",
        "never checked",
        "wrong base",
    ]
    monkeypatch.setattr(bench_run, "STAGES", [("u", "bench_u")])
    monkeypatch.setattr(bench_run, "_load", lambda name: _unchecked)
    assert bench_run.main(["--quick", "--json", str(tmp_path / "o.json"), "--plot", ""]) == 1
    assert not (tmp_path / "o.json").exists()
    assert capsys.readouterr().out.count("REFUSED:") == 3


def test_interleaved_gives_every_contender_the_same_rounds_in_rotating_order() -> None:
    calls: list[str] = []
    checked: list[tuple[str, int]] = []

    def make(name: str):
        return lambda: calls.append(name) or len(calls)

    def check(name: str, result: int) -> bool:
        checked.append((name, result))
        return name != "b" or result < 5  # b's second call (the 5th call overall) fails

    got = interleaved({"a": make("a"), "b": make("b"), "c": make("c")}, 3, check)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert checked == [(name, k + 1) for k, name in enumerate(calls)]  # every result, at once
    assert {k: (t.ok, t.rounds) for k, t in got.items()} == {"a": (True, 3), "b": (False, 3), "c": (True, 3)}
    assert all(0 <= t.seconds < 1 for t in got.values())
    assert interleaved({"a": make("a")}, 2)["a"].ok is None  # no check given: unchecked


def test_bench_match_check_is_independent_and_can_fail() -> None:
    """bench_match's check (plain numpy float64) accepts a right answer and rejects a missed pair,
    an extra pair, a wrong distance and a row that misses a pair found by another row."""
    import bench_match as bm

    x = bm.planted(300, d=48, seed=3)
    loop_rows = np.arange(0, 299, 7)
    sample = np.random.default_rng(0).choice(300, 40, replace=False)
    check = bm.IndependentCheck(x, np.concatenate([sample, loop_rows]), loop_rows)
    pairs, _ = bm.numpy_blocked(x, bm.THRESHOLD)
    dist = bm.exact_distances64(x, pairs[:, 0], pairs[:, 1]).astype(np.float32)  # as an exact backend
    assert len(pairs) > 5 and len(check.truth) > 0
    assert check("cpu-bf16", (pairs, dist))
    touching = np.isin(pairs, check.sample).any(1)
    assert not check("missed", (pairs[~touching], dist[~touching]))
    far = np.array([[0, 1]], np.int64)
    assert not check("extra", (np.vstack([pairs, far]), np.append(dist, 1.0).astype(np.float32)))
    assert not check("distance", (pairs, dist + np.float32(1e-4)))  # beyond the 1e-6 of an exact row
    assert check(bm.LOOP, (pairs, dist + np.float32(1e-4)))  # within the float32 loop's tolerance
    assert not check(bm.NUMPY, (pairs, dist + np.float32(1e-4)))  # the numpy reference re-checks in float64
    assert check(bm.NUMPY, (pairs, dist))
    outside = pairs[~touching][:1]  # a true pair no sampled row touches: only the union catches it
    keep = ~(pairs == outside).all(1)
    assert check("blind spot", (pairs[keep], dist[keep]))
    est = "loop ESTIMATED: 1 row in 7 timed"
    mine = np.isin(pairs[:, 0], loop_rows)
    assert check(est, (pairs[mine], dist[mine]))
    agreed = check.agreed()
    assert agreed["cpu-bf16"] and agreed[est] and not agreed["blind spot"] and not agreed["missed"]


@pytest.mark.parametrize("workload", ["isotropic", "clip-like"])
def test_bench_match_reference_is_exact_and_pairs_checked_can_fail(workload: str) -> None:
    """The numpy reference screen gives the float64 definition's pairs on both workloads, and
    "pairs checked" names a missed pair, an extra pair and a wrong distance."""
    import bench_match as bm
    from clipdedup.match import find_pairs

    x = bm.workload(workload, 400, d=64, seed=5)
    t = float(np.sort(bm.exact_distances64(x, np.arange(399), np.arange(1, 400)))[3])  # a pair at t
    got = bm.numpy_blocked(x, t, block=128)
    want = find_pairs(x, t, backend="reference")
    assert len(want[0]) >= 4
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert bm.pairs_checked(got, want) == f"= reference ({len(want[0])} pairs)"
    assert bm.pairs_checked((got[0][1:], got[1][1:]), want) == "DIFFER: 1 missed, 0 extra"
    extra = (np.vstack([got[0], [[0, 399]]]), np.append(got[1], np.float32(1.0)))
    assert bm.pairs_checked(extra, want) == "DIFFER: 0 missed, 1 extra"
    assert bm.pairs_checked((got[0], got[1] + np.float32(1e-4)), want).startswith("DIFFER")


def test_clip_like_rows_look_like_clip() -> None:
    import bench_match as bm

    x = bm.clip_like(2000, d=256, seed=2)
    assert x.dtype == np.float32 and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    assert 0.40 < bm.median_cosine(x) < 0.50


def test_skipped_rows_are_never_timed_nor_compared(capsys) -> None:
    from common import Row, cpu_line, skipped, speedups, table

    rows = [
        skipped("match", "cpu-bf16", 10, "avx512_bf16/amx_bf16 absent"),
        Row("match", "x", 10, 1.0, 10.0, correct=True, baseline="cpu-bf16"),
    ]
    assert speedups(rows) == {1: "baseline skipped here: no speedup reported"}
    text = table(rows)
    assert text.splitlines()[0] == f"cpu: {cpu_line()}"
    assert "skipped: avx512_bf16/amx_bf16 absent" in text
    assert bench_run.throughput_series(rows) == {"match": {"x": [(10, 10.0, True)]}}

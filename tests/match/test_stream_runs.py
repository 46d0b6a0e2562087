"""Dedup runs (full and incremental, through the match cache) and import runs with a GPU backend
stream the row stores (match/backends/stream.py): no matrix is ever made of them, and the answers
are the reference's. On CPU the `torch-cuda` entry is made available and its streamed screen runs
on CPU tensors with small tiles and a budget of a few rows per step."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
from test_cache import Collection
from test_stream import PIECE, TILES, budget

from clipdedup.db import rowstore
from clipdedup.match import MATCHERS
from clipdedup.match.backends import stream
from clipdedup.pipeline import RunOptions, run_import


@pytest.fixture
def gpu_on_cpu(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """`torch-cuda` available, screening on CPU in many steps; matrices of stores forbidden.
    Yields the keyword arguments of every streamed call."""
    calls: list[dict] = []
    real = stream.find_pairs_store_gpu

    def on_cpu(store, threshold, **kw):
        calls.append(kw)
        small = dict(device="cpu", blocks=TILES["torch-cuda"], piece_rows=PIECE, cap=4)
        return real(store, threshold, **kw, **small, budget_bytes=budget(store.dim, "torch-cuda", 16, 4))

    def no_matrix(self, dims=None):
        raise AssertionError("a GPU run made a matrix of its row store")

    monkeypatch.setattr(MATCHERS.entries["torch-cuda"], "why_not", lambda: None)
    monkeypatch.setattr(stream, "find_pairs_store_gpu", functools.wraps(real)(on_cpu))
    monkeypatch.setattr(rowstore.RowStore, "to_matrix", no_matrix)
    return calls


def test_dedup_runs_stream_full_and_incremental(tmp_path: Path, gpu_on_cpu: list[dict]) -> None:
    c = Collection(tmp_path, 5)
    c.add(120)
    t = 0.02 * np.sqrt(24) * 1.3
    pairs, _, how = c.run(t, backend="torch-cuda")
    assert pairs == c.reference(t) and how.startswith("full match")
    assert gpu_on_cpu[-1]["rows"] is None and gpu_on_cpu[-1]["backend"] == "torch-cuda"
    for _ in range(3):
        c.add(6)
        c.change(3)
        c.delete(2)
        got, _, how = c.run(t, backend="torch-cuda")
        assert got == c.reference(t) and how.startswith("reused"), how
        assert gpu_on_cpu[-1]["rows"] is not None and len(gpu_on_cpu[-1]["rows"]) >= 6


def test_import_runs_stream_both_stores(tmp_path: Path, gpu_on_cpu: list[dict]) -> None:
    base, imp = Collection(tmp_path / "b", 6), Collection(tmp_path / "i", 7)
    base.add(90)
    for k, rel in enumerate(sorted(base.rows)[:40:3]):  # near copies of some base rows, and others
        imp.put(f"copy{k}.jpg", (base.rows[rel] + 0.01).astype(np.float32))
    imp.add(30)
    t = 0.02 * np.sqrt(24) * 1.3

    def run(backend: str) -> set:
        opts = RunOptions(skip_update=True, dry_run=True, threshold=t, backend=backend)
        s = run_import(str(base.img), str(base.db), str(imp.img), str(imp.db), None, opts)
        return {(a, b, d) for g in s.groups for a, b, d in g.distances}

    got = run("torch-cuda")
    assert len(gpu_on_cpu) == 1 and gpu_on_cpu[0]["y_store"] is not None
    want = run("reference")  # the reference loads matrices (not of stores)
    assert got == want and len(want) >= 14

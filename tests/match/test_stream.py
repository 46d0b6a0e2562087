"""GPU matching from a row store (match/backends/stream.py) against `find_pairs_store` and the
float64 reference, on CPU: `torch-cuda`'s step function on CPU tensors, the Triton kernel under
the interpreter (a spawned worker, as in test_kernels.py). Small tiles, tiny budgets (many streamed
steps), awkward sizes, NaN and identical rows, `rows=` (incremental), two stores (import), the
candidate buffer's overflow re-run and the pair limit; the same cases compiled on CUDA (`gpu`)."""

from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import pytest

from clipdedup.db.rowstore import store_of_matrix
from clipdedup.errors import TooManyPairsError
from clipdedup.match import MATCHERS, find_pairs
from clipdedup.match.backends import stream
from clipdedup.match.backends.triton import TARGET_EXP, triton_screen
from clipdedup.match.core import scaled_from_norms
from clipdedup.match.store import find_pairs_store
from helpers import planted, threshold_on_a_pair

TILES = {"torch-cuda": (16, 16), "triton": (16, 16, 32)}  # tiles much smaller than n
PIECE = 8  # staging rows: a chunk crosses several pieces


def budget(dim: int, backend: str, chunk_rows: int, cap: int) -> int:
    """Device bytes that make `plan_steps` take chunks of `chunk_rows` rows."""
    scr = stream.screener(backend, pairwise=lambda: None, blocks=TILES[backend])
    row, fixed = stream.device_bytes(dim, scr, cap, PIECE)
    return fixed + 3 * row * chunk_rows


def gpu_pairs(x, t, backend, *, y=None, rows=None, chunk_rows=20, cap=4, device="cpu", **kw):
    """find_pairs_store_gpu on stores of x (and y), and the number of steps it ran."""
    steps = [0]

    def tick(k: int) -> None:
        steps[0] += k

    with store_of_matrix(x) as sx, store_of_matrix(x if y is None else y) as sy:
        pairs, d = stream.find_pairs_store_gpu(
            sx, t, rows=rows, y_store=None if y is None else sy, backend=backend, device=device,
            budget_bytes=budget(x.shape[1], backend, chunk_rows, cap), cap=cap,
            blocks=TILES[backend], piece_rows=PIECE, progress=tick, **kw,
        )  # fmt: skip
    assert d.dtype == np.float64
    return (pairs, d.astype(np.float32)), steps[0]


def assert_same(got, want):
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])  # distances from one function: bit for bit


def store_answer(x, t, rows=None):
    with store_of_matrix(x) as st:
        pairs, d = find_pairs_store(st, t, rows=rows, recipe="float32", block=32)
    return pairs, d.astype(np.float32)


def cases():
    """(name, x, y, threshold, rows): the awkward inputs."""
    out = []
    for n, d in [(0, 40), (1, 40), (2, 33), (63, 40), (65, 72), (130, 40)]:
        x = planted(n, d, seed=n * 7 + d)
        t = threshold_on_a_pair(x, q=0.05) if n > 1 else 1.0
        out.append((f"self-n{n}-d{d}", x, None, t, None))
    x = planted(90, 40, seed=1)
    x[[3, 50]] = np.nan
    x[70, 5] = np.inf
    out.append(("nan-rows", x, None, threshold_on_a_pair(x[np.isfinite(x).all(1)], q=0.05), None))
    same = np.tile(planted(1, 40, seed=2), (65, 1))
    out.append(("all-identical", same, None, 0.0, None))
    x = planted(100, 40, seed=3)
    rng = np.random.default_rng(3)
    rows = np.sort(rng.choice(100, 23, replace=False))
    out.append(("rows", x, None, threshold_on_a_pair(x, q=0.1), rows))
    out.append(("rows-one", x, None, threshold_on_a_pair(x, q=0.1), np.array([99])))
    out.append(("rows-none", x, None, 1.0, np.zeros(0, np.int64)))
    y = planted(45, 40, seed=4)
    y[:10] = x[5:15] + 0.01
    y[20] = np.nan
    out.append(("two-stores", x, y, threshold_on_a_pair(x, y[np.isfinite(y).all(1)], q=0.05), None))
    out.append(("two-stores-empty-y", x, y[:0], 1.0, None))
    return out


CASES = cases()


def run_case(name: str, backend: str, device: str = "cpu") -> int:
    _, x, y, t, rows = next(c for c in CASES if c[0] == name)
    for chunk_rows, cap in ((20, 1), (1000, 1 << 12)):  # many steps and overflow re-runs; one step
        got, steps = gpu_pairs(x, t, backend, y=y, rows=rows, chunk_rows=chunk_rows, cap=cap, device=device)
        want = find_pairs(x, t, y=y, backend="reference")
        if rows is not None:  # the pairs touching `rows`, as find_pairs_store gives them
            sel = np.isin(want[0], rows).any(axis=1) if len(want[0]) else np.zeros(0, bool)
            want = (want[0][sel], want[1][sel])
            assert_same(store_answer(x, t, rows), want)
        elif y is None:
            assert_same(store_answer(x, t), want)
        assert_same(got, want)
        n_x = len(x) if rows is None else len(rows)
        if chunk_rows == 20 and n_x > 40 and (y is None or len(y)):
            assert steps > 3, f"{name}: {steps} steps"
    if name == "all-identical":
        assert len(want[0]) == 65 * 64 // 2
    return len(want[0])


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_torch_steps_on_cpu_equal_find_pairs_store(name):
    run_case(name, "torch-cuda")


def test_torch_steps_pair_limit_over_all_steps():
    x = np.tile(planted(1, 24, seed=5), (70, 1))  # 2415 pairs over several steps, each under the limit
    with pytest.raises(TooManyPairsError):
        gpu_pairs(x, 0.0, "torch-cuda", chunk_rows=20, max_pairs=2000)
    (pairs, _), _ = gpu_pairs(x, 0.0, "torch-cuda", chunk_rows=20, max_pairs=2415)
    assert len(pairs) == 2415


def test_torch_steps_without_nonzero_static(monkeypatch: pytest.MonkeyPatch):
    """Where torch lacks a device `nonzero_static`, the step falls back to `nonzero`: same pairs."""
    import torch

    from clipdedup.match.backends import torch_steps

    def missing(*a, **kw):
        raise NotImplementedError("nonzero_static")

    monkeypatch.setattr(torch, "nonzero_static", missing)
    monkeypatch.setattr(torch_steps, "_NO_STATIC", [])
    assert run_case("nan-rows", "torch-cuda") > 0
    assert torch_steps._NO_STATIC == [True]


def test_torch_step_reruns_when_a_tile_has_more_hits_than_its_room():
    """One tile's hits beyond `tile_hits` (while the step's buffer has room) re-run the step with room
    for the most any tile had: the same pairs as with ample room, none lost."""
    import torch

    from clipdedup.match.backends.torch_steps import pairwise_within_torch

    g = torch.Generator().manual_seed(0)
    q = torch.randn((50, 32), generator=g).half()
    k = torch.randn((40, 32), generator=g).half()
    hq, hk = torch.randn(50, generator=g) * 8, torch.randn(40, generator=g) * 8
    for self_mode in (False, True):
        kk, hkk = (q, hq.flip(0).clone()) if self_mode else (k, hk)
        want = pairwise_within_torch(q, kk, hq, hkk, self_mode=self_mode, blocks=(16, 16), cap=4096)
        got = pairwise_within_torch(
            q, kk, hq, hkk, self_mode=self_mode, blocks=(16, 16), cap=4096, tile_hits=3
        )
        assert len(want) > 100
        assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, want.tolist()))


def test_chunked_shifts_equal_the_whole_problem():
    rng = np.random.default_rng(0)
    na0 = rng.random(1000) * 50
    nb0 = rng.random(700) * 80
    s, a, b = stream.shifts(na0, nb0, 0.7, 40, chunk=64)
    sp = scaled_from_norms(na0, nb0, 0.7, 40, triton_screen(40), TARGET_EXP)
    assert s == sp.scale
    np.testing.assert_array_equal(a, sp.alpha.astype(np.float32))
    np.testing.assert_array_equal(b, sp.beta.astype(np.float32))


def test_unknown_backend_and_bad_arguments():
    x = planted(5, 8, seed=0)
    with store_of_matrix(x) as st:
        with pytest.raises(ValueError, match="no streamed screen"):
            stream.find_pairs_store_gpu(st, 1.0, backend="cpu-fp32", device="cpu")
        with pytest.raises(ValueError, match="rows="):
            stream.find_pairs_store_gpu(
                st, 1.0, rows=np.array([1]), y_store=st, backend="torch-cuda", device="cpu"
            )
        with pytest.raises(ValueError, match="threshold"):
            stream.find_pairs_store_gpu(st, float("nan"), backend="torch-cuda", device="cpu")


@pytest.fixture(scope="module")
def interp():
    """A spawned worker with TRITON_INTERPRET=1 from the start (see test_kernels.py's fixture)."""
    pytest.importorskip("triton")
    ctx = mp.get_context("spawn")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("TRITON_INTERPRET", "1")
        pool = ctx.Pool(1)
    yield pool
    pool.close()
    pool.join()


def _interp_case(name: str) -> int:
    assert os.environ.get("TRITON_INTERPRET") == "1", "not in the interpreter worker"
    return run_case(name, "triton")


def _interp_limit() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    x = np.tile(planted(1, 24, seed=5), (70, 1))
    with pytest.raises(TooManyPairsError):
        gpu_pairs(x, 0.0, "triton", chunk_rows=20, max_pairs=2000, max_grid=3)


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_triton_steps_interpreted_equal_find_pairs_store(interp, name):
    interp.apply(_interp_case, (name,))


def test_triton_steps_pair_limit_interpreted(interp):
    interp.apply(_interp_limit, ())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch-cuda"])
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_steps_on_cuda_equal_find_pairs_store(backend, name):
    run_case(name, backend, device="cuda")


@pytest.mark.parametrize("name", ["self-n65-d72", "all-identical", "two-stores", "self-n1-d40"])
def test_torch_cuda_backend_on_matrices_streams_the_same_steps(name):
    """`find_pairs(x, backend="torch-cuda")` runs `pairs_torch_cuda_streamed`: the store path's steps
    on a matrix (here on CPU, many steps, overflow re-runs); NaN rows are find_pairs' to drop."""
    from clipdedup.match.backends.torch_cuda import pairs_torch_cuda_streamed

    assert MATCHERS.entries["torch-cuda"].fn is pairs_torch_cuda_streamed
    _, x, y, t, _ = next(c for c in CASES if c[0] == name)
    keep_y = None if y is None else np.isfinite(y).all(1)
    y = None if y is None else y[keep_y]
    kw = dict(device="cpu", blocks=TILES["torch-cuda"], piece_rows=PIECE, cap=2)
    steps = [0]
    i, j, d = pairs_torch_cuda_streamed(
        x, y, t, budget_bytes=budget(x.shape[1], "torch-cuda", 20, 2), progress=steps.append, **kw
    )
    want = find_pairs(x, t, y=y, backend="reference")
    assert_same((np.stack([i, j], 1).reshape(-1, 2), d.astype(np.float32)), want)
    assert len(steps) > 3 or len(x) < 40


def test_host_memory_stays_bounded_without_a_matrix():
    """An incremental match of 40 rows against a 60,000 x 64 store (a 15 MB matrix) allocates under
    half of that in numpy arrays (traced): per-row norms, shifts and flags, and fixed buffers;
    `RowStore.to_matrix` is never called. (The CPU stand-in's "device" chunks are torch tensors,
    bounded by the budget, and not traced.)"""
    import tracemalloc

    n, d = 60_000, 64
    x = planted(n, d, seed=9)
    rows = np.sort(np.random.default_rng(9).choice(n, 40, replace=False))
    t = 0.05 * np.sqrt(d)  # the planted near copies
    row, fixed = stream.device_bytes(d, stream.screener("torch-cuda", blocks=(64, 64)), 1 << 10, 256)
    with store_of_matrix(x) as st:
        st.to_matrix = None  # type: ignore[method-assign]  # a call fails the test
        tracemalloc.start()
        try:
            pairs, _ = stream.find_pairs_store_gpu(
                st, t, rows=rows, backend="torch-cuda", device="cpu", piece_rows=256, cap=1 << 10,
                blocks=(64, 64), budget_bytes=fixed + 3 * row * 8000,
            )  # fmt: skip
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        want, _ = find_pairs_store(st, t, rows=rows, recipe="float32")
    assert peak < n * d * 4 // 2, f"{peak} bytes traced"
    assert np.array_equal(pairs, want) and len(want) > 0

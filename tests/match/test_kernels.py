"""The Triton kernel `pairwise_within` and the `triton` backend against the float64 reference.

On CPU the kernel runs under the Triton interpreter: a private copy of `clipdedup/kernels/pairwise.py`
is loaded with TRITON_INTERPRET=1 (read by `triton.jit` when the module is executed), so that the
compiled kernel used by the GPU tests in the same process is untouched. fp16 `tl.dot` is exact in
the interpreter (bf16 is not; the kernel uses fp16). The same cases run compiled on CUDA (`gpu`).
"""

from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import pytest
import torch

pytest.importorskip("triton")


from clipdedup.match import find_pairs  # noqa: E402
from clipdedup.match.backends.triton import ChunkLoader, Step, pairs_triton, plan_steps, run_steps  # noqa: E402
from helpers import all_distances, planted, threshold_on_a_pair  # noqa: E402

SMALL = (16, 16, 32)  # BM, BN, BK: keeps the interpreter quick and makes tiles much smaller than n


@pytest.fixture(scope="module")
def interp():
    """A worker process in which the Triton interpreter is on from the start.

    TRITON_INTERPRET must be set before triton is first imported (its own library functions, such
    as tl.sum, are decorated then), and this test process has imported triton long before (torch
    and open_clip pull it in). So interpreted cases run in one spawned worker; `interp.apply(fn,
    args)` runs fn there and re-raises its assertion errors here.
    """
    ctx = mp.get_context("spawn")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("TRITON_INTERPRET", "1")
        pool = ctx.Pool(1)
    yield pool
    pool.close()  # a clean exit, so that `coverage run` records the worker's lines
    pool.join()


def _interpreted() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "not in the interpreter worker"


def reference(x, t, y=None):
    pairs, dist = find_pairs(x, t, y=y, backend="reference")
    return {(a, b): d for (a, b), d in zip(pairs.tolist(), dist.tolist())}


def as_dict(i, j, d):
    return {(a, b): float(np.float32(v)) for a, b, v in zip(i.tolist(), j.tolist(), d.tolist())}


def cases():
    """(name, x, y, threshold, extra kwargs): the awkward inputs every device must get exactly right."""
    out = []
    for n, d in [(1, 32), (2, 100), (63, 512), (65, 100), (300, 32), (65, 32)]:
        x = planted(n, d, seed=n * 7 + d)
        t = threshold_on_a_pair(x, q=0.03) if n > 1 else 1.0
        out.append((f"self-n{n}-d{d}-on-a-pair", x, None, t, {}))
    x = planted(100, 100, seed=1)
    out.append(("threshold-zero-no-pairs", x, None, 0.0, {}))
    out.append(("every-pair", x[:70], None, float(all_distances(x[:70]).max()), {}))
    same = np.tile(x[:1], (65, 1))
    out.append(("all-identical", same, None, 0.0, {}))
    y = planted(45, 100, seed=2)
    y[:10] = x[5:15] + 0.01
    out.append(("rect-on-a-pair", x, y, threshold_on_a_pair(x, y, q=0.01), {}))
    out.append(("large-norms", x * 3e4, None, threshold_on_a_pair(x * 3e4, q=0.02), {}))
    out.append(("tiny-norms", x * 1e-9, None, threshold_on_a_pair(x * 1e-9, q=0.02), {}))
    mixed = (x * np.geomspace(1e-3, 1e3, 100)[:, None]).astype(np.float32)
    out.append(("mixed-norms", mixed, None, threshold_on_a_pair(mixed, q=0.02), {}))
    out.append(("overflow-rerun", x, None, threshold_on_a_pair(x, q=0.05), {"cap": 3}))
    # 100 rows in 16-row tiles: 28 upper-triangle tiles in launches of 5 programs (the last one short).
    out.append(("many-launches-self", x, None, threshold_on_a_pair(x, q=0.05), {"max_grid": 5, "cap": 1}))
    out.append(("many-launches-rect", x, y, threshold_on_a_pair(x, y, q=0.05), {"max_grid": 3}))
    out.append(("empty", x[:0], None, 1.0, {}))
    out.append(("empty-rect", x[:0], y, 1.0, {}))
    same64 = np.tile(x[:1], (64, 1))
    out.append(("all-identical-64", same64, None, 0.0, {"max_grid": 4, "cap": 7}))
    out.append(("streamed-self", x, None, threshold_on_a_pair(x, q=0.05), {"budget": 30 * 2 * 400}))
    out.append(("streamed-rect", x, y, threshold_on_a_pair(x, y, q=0.05), {"budget": 20 * 2 * 400}))
    return out


CASES = cases()


def run_case(case, device, blocks=SMALL):
    name, x, y, t, kw = case
    i, j, d = pairs_triton(x, y, t, device=device, blocks=blocks, **kw)
    got = as_dict(i, j, d)
    want = reference(x, t, y)
    assert got == want, f"{name}: {len(got)} pairs vs reference {len(want)}"
    return want


def _interp_case(name: str) -> int:
    _interpreted()
    want = run_case(next(c for c in CASES if c[0] == name), "cpu")
    if name == "every-pair":
        assert len(want) == 70 * 69 // 2
    if name == "all-identical":
        assert len(want) == 65 * 64 // 2
    if name == "all-identical-64":
        assert len(want) == 64 * 63 // 2
    if name == "threshold-zero-no-pairs":
        assert not want
    return len(want)


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_triton_interpreted_matches_reference(interp, name):
    interp.apply(_interp_case, (name,))


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_triton_cuda_matches_reference(case):
    run_case(case, "cuda", blocks=(128, 128, 64))
    run_case(case, "cuda", blocks=SMALL)


def kernel_inputs(n, m, d, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn((n, d), generator=g) * 2).half()
    k = (torch.randn((m, d), generator=g) * 2).half()
    hq = torch.randn(n, generator=g) * 4 * d**0.5
    hk = torch.randn(m, generator=g) * 4 * d**0.5
    return [v.to(device) for v in (q, k, hq, hk)]


def check_kernel(mod, n, m, d, self_mode, device, blocks, row_base=0, col_base=0, cap=1 << 12):
    q, k, hq, hk = kernel_inputs(n, m, d, seed=n + m + d, device=device)
    if self_mode:
        k, hk = q, hq.flip(0).clone()
    got = mod.pairwise_within(
        q, k, hq, hk, self_mode=self_mode, row_base=row_base, col_base=col_base, cap=cap, blocks=blocks
    )
    pairs, s = mod.pairwise_within_ref(
        q, k, hq, hk, self_mode=self_mode, row_base=row_base, col_base=col_base
    )
    got_set = set(map(tuple, got.cpu().tolist()))
    assert len(got_set) == len(got), "a pair was appended twice"
    assert all(v >= 0 for p in got_set for v in p), "an unwritten (poisoned) slot came back"
    want = set(map(tuple, pairs.cpu().tolist()))
    # Entries within float32 rounding of zero may go either way; everything else must agree.
    tol = 1e-5 * float((q.double().abs() @ k.double().abs().T).max() + hq.abs().max() + hk.abs().max())
    near = {(row_base + int(a), col_base + int(b)) for a, b in torch.nonzero(s.abs() <= tol).cpu().tolist()}
    assert (got_set ^ want) <= near
    possible = n * (n - 1) // 2 if self_mode else n * m
    assert len(want) > 0 or possible < 20 or row_base  # random shifts make about half the pairs hits


def _interp_kernel(n, m, d, self_mode):
    from clipdedup.kernels import pairwise

    _interpreted()
    check_kernel(pairwise, n, m, d, self_mode, "cpu", SMALL)
    check_kernel(pairwise, n, m, d, self_mode, "cpu", SMALL, row_base=5, col_base=3, cap=1)
    q, k, hq, hk = kernel_inputs(4, 4, 33, seed=0)
    with pytest.raises(ValueError):
        pairwise.pairwise_within(q, k, hq, hk, self_mode=False, blocks=SMALL)


@pytest.mark.parametrize("n,m,d", [(1, 1, 32), (2, 65, 32), (63, 17, 64), (65, 65, 96)])
@pytest.mark.parametrize("self_mode", [False, True])
def test_kernel_matches_its_reference(interp, n, m, d, self_mode):
    interp.apply(_interp_kernel, (n, m, d, self_mode))


@pytest.mark.gpu
@pytest.mark.parametrize("n,m,d", [(1, 1, 64), (300, 65, 128), (1000, 1000, 512)])
@pytest.mark.parametrize("self_mode", [False, True])
def test_kernel_cuda_matches_its_reference(n, m, d, self_mode):
    from clipdedup.kernels import pairwise

    check_kernel(pairwise, n, m, d, self_mode, "cuda", (128, 128, 64))
    check_kernel(pairwise, n, m, d, self_mode, "cuda", SMALL, row_base=7, col_base=0, cap=1)


@pytest.mark.parametrize("n,m,self_mode", [(10, 10, True), (37, 37, True), (10, 23, False), (1, 40, False)])
@pytest.mark.parametrize("budget_rows", [3, 7, 10_000])
def test_plan_covers_every_pair_once(n, m, self_mode, budget_rows):
    chunk, steps = plan_steps(n, m, 100, budget_rows * 100, self_mode)
    seen = np.zeros((n, m), int)
    for st in steps:
        seen[st.q0 : st.q1, st.k0 : st.k1] += 1
        assert (st.q1 - st.q0) <= max(chunk, 1) and (st.k1 - st.k0) <= max(chunk, 1)
    if self_mode:
        assert (seen[np.triu_indices(n, 1)] == 1).all()
    else:
        assert (seen == 1).all()
    if budget_rows * 100 >= (n if self_mode else n + m) * 100:
        assert len(steps) == 1
    with pytest.raises(MemoryError):
        plan_steps(n, m, 100, 250, self_mode)  # not even three rows fit


def test_streamed_steps_on_cpu_equal_reference():
    """The step loop with its prefetching, on CPU tensors, with the kernel's float64 reference as the
    screen: the chunks and offsets must reproduce the whole problem's pairs."""
    from clipdedup.match.backends.triton import TARGET_EXP, triton_screen
    from clipdedup.match.core import recheck, scaled_problem

    x = planted(90, 64, seed=20)
    y = planted(50, 64, seed=21)
    for other, self_mode in ((x, True), (y, False)):
        t = threshold_on_a_pair(x, None if self_mode else y, q=0.05)
        sp = scaled_problem(x, None if self_mode else y, t, triton_screen(64), TARGET_EXP)
        chunk, steps = plan_steps(len(x), len(other), 4 * 64, 4 * 64 * 3 * 16, self_mode)
        assert len(steps) > 4
        lq = ChunkLoader(x, sp.scale, 64, "cpu")
        lk = lq if self_mode else ChunkLoader(other, sp.scale, 64, "cpu")
        hq, hk = torch.from_numpy(sp.alpha), torch.from_numpy(sp.beta)
        prefetched: list[Step] = []

        def compute(q, k, st: Step, overlap, hq=hq, hk=hk, self_mode=self_mode, prefetched=prefetched):
            from clipdedup.kernels.pairwise import pairwise_within_ref

            overlap()
            prefetched.append(st)
            pairs, _ = pairwise_within_ref(
                q,
                k,
                hq[st.q0 : st.q1],
                hk[st.k0 : st.k1],
                self_mode=self_mode,
                row_base=st.q0,
                col_base=st.k0,
            )
            return pairs.numpy()

        found = np.concatenate(list(run_steps(steps, lq, lk, self_mode, compute)))
        i, j, d = recheck(x, other, found[:, 0], found[:, 1], t)
        assert as_dict(i, j, d) == reference(x, t, None if self_mode else y)
        assert prefetched == steps


def _interp_counters() -> None:
    """The kernel itself, launched by hand: slots from a counter that starts negative (as a 32-bit
    counter did after 2^31 hits) are never stored, the counter counts past 2^31 without wrapping,
    and every program adds one to the tile counter."""
    from clipdedup.kernels import pairwise

    _interpreted()
    n, d, bm = 40, 32, 16
    q, _, hq, _ = kernel_inputs(n, n, d, seed=3)
    hq = torch.full((n,), 1e4)  # every pair is a hit
    guard = 64
    buf = torch.full((guard + 2 * 1000,), -1, dtype=torch.int32)
    out = buf[guard:]  # a store before `out` lands in the guard and fails the test
    n_tm = -(-n // bm)
    tiles = pairwise.tile_count(n_tm, n_tm, True)
    hits = n * (n - 1) // 2
    for start in (-5, (1 << 31) - 3):
        buf.fill_(-1)
        count = torch.tensor([start, 0], dtype=torch.int64)
        for t0, programs in pairwise.launch_plan(tiles, 4):
            pairwise.pairwise_within_kernel[(programs,)](
                q, q, hq, hq, out, count, n, n, 0, 0, 1000, t0, n_tm, n_tm,
                D=d, SELF=True, TRI=True, BM=bm, BN=bm, BK=32,
            )  # fmt: skip
        assert count.tolist() == [start + hits, tiles]
        assert (buf[:guard] == -1).all(), "a negative slot was stored before the buffer"
        stored = out.view(-1, 2)
        written = stored[(stored >= 0).all(1)]
        if start < 0:
            assert len(written) == hits - 5  # the five negative slots were dropped, the rest kept
            assert len(set(map(tuple, written.tolist()))) == hits - 5
        else:
            assert len(written) == 0  # every slot is past cap


def test_kernel_counters_are_int64_and_negative_slots_dropped(interp):
    interp.apply(_interp_counters, ())


def _interp_skipped_launch() -> None:
    """A launch that never runs (what Triton's launcher did when the grid product wrapped) makes
    the tile count fall short: the wrapper raises instead of returning a partial answer."""
    from clipdedup.kernels import pairwise

    _interpreted()
    q, _, hq, _ = kernel_inputs(50, 50, 32, seed=4)
    planned = pairwise.launch_plan
    pairwise.launch_plan = lambda tiles, mg: planned(tiles, mg)[:-1]
    try:
        with pytest.raises(RuntimeError, match="tiles ran"):
            pairwise.pairwise_within(q, q, hq, hq, self_mode=True, blocks=SMALL, max_grid=3)
    finally:
        pairwise.launch_plan = planned
    hq = torch.full((50,), 1e4)
    with pytest.raises(pairwise.TooManyPairsError, match="1225 candidate pairs"):
        pairwise.pairwise_within(q, q, hq, hq, self_mode=True, blocks=SMALL, cap=1, max_pairs=1000)
    got = pairwise.pairwise_within(q, q, hq, hq, self_mode=True, blocks=SMALL, cap=1, max_pairs=1225)
    assert len(got) == 1225


def test_kernel_skipped_launch_and_pair_limit_raise(interp):
    interp.apply(_interp_skipped_launch, ())


def _interp_backend_limit() -> None:
    from clipdedup.kernels.pairwise import TooManyPairsError

    _interpreted()
    x = np.tile(planted(1, 32, seed=5), (70, 1))
    with pytest.raises(TooManyPairsError):
        pairs_triton(x, None, 0.0, device="cpu", blocks=SMALL, budget=20 * 2 * 32 * 3, max_pairs=2000)


def test_backend_pair_limit_counts_over_all_steps(interp):
    """70 copies of one row: 2415 pairs over several streamed steps, each step under the limit."""
    interp.apply(_interp_backend_limit, ())

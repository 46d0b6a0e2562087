"""The GPU paths' control flow on CPU: launch-grid arithmetic up to 10^9 rows, the offline compile
of the kernel for the GPUs it targets, the copy-stream discipline of `ChunkLoader` with a recording
stand-in for `torch.cuda`, the page-locked memory fallback and the Triton availability check."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from clipdedup import native  # noqa: E402
from clipdedup.kernels.pairwise import MAX_GRID, launch_plan, tile_coords, tile_count  # noqa: E402
from clipdedup.match.backends.triton import ChunkLoader, _triton_why_not, plan_steps  # noqa: E402

INT32_MAX = (1 << 31) - 1


def tile_index(i: int, j: int, n_t: int) -> int:
    """Inverse of `tile_coords` in triangle mode, derived independently from the folding."""
    if 2 * i <= n_t - 1:
        return i * (n_t + 1) + (j - i)
    r = n_t - 1 - i
    return r * (n_t + 1) + (n_t - r) + (j - i)


@pytest.mark.parametrize("n_t", [*range(1, 24), 63, 64, 65])
def test_triangle_tiles_are_each_upper_tile_once(n_t: int) -> None:
    got = [tile_coords(t, n_t, n_t, True) for t in range(tile_count(n_t, n_t, True))]
    assert sorted(got) == [(i, j) for i in range(n_t) for j in range(i, n_t)]
    rect = [tile_coords(t, n_t, 3, False) for t in range(tile_count(n_t, 3, False))]
    assert rect == [(i, j) for i in range(n_t) for j in range(3)]


@pytest.mark.parametrize("n", [1, 63, 65, 5_930_000, 6_500_000, 46_341 * 128, 10**8, 10**9])
@pytest.mark.parametrize("block", [16, 128])
def test_launch_plan_never_exceeds_the_limits(n: int, block: int) -> None:
    """The old grid (cdiv(n,128), cdiv(n,128)) had an int32 product that wrapped from ~5.93M rows,
    and a gridY past 65,535: here every launch is 1-D with at most MAX_GRID < 2^31 programs, the
    launches tile [0, tiles) without gap or overlap, and the coordinates at every launch boundary
    (and at random tiles) are upper-triangle tiles in range whose index maps back."""
    n_t = -(-n // block)
    tiles = tile_count(n_t, n_t, True)
    assert tiles == n_t * (n_t + 1) // 2
    plan = launch_plan(tiles)
    assert sum(p for _, p in plan) == tiles
    assert all(0 < p <= MAX_GRID < INT32_MAX for _, p in plan)
    assert [t0 for t0, _ in plan] == [k * MAX_GRID for k in range(len(plan))]
    rng = np.random.default_rng(n)
    probes = {0, tiles - 1, *(t0 for t0, _ in plan[:1000]), *(t0 + p - 1 for t0, p in plan[:1000])}
    probes |= {int(v) for v in rng.integers(0, tiles, 2000)}
    for t in probes:
        i, j = tile_coords(t, n_t, n_t, True)
        assert 0 <= i <= j < n_t
        assert tile_index(i, j, n_t) == t
        assert (j + 1) * block <= n_t * block < 1 << 62  # int64 element offsets in the kernel


def test_whole_run_plan_at_a_billion_rows() -> None:
    """10^9 x 1280 on an 80 GB budget: the streamed steps cover each pair once, and each step's
    launches stay inside the limits; no launch is larger than MAX_GRID programs."""
    n, width, budget = 10**9, 1280, int(0.6 * 80e9)
    chunk, steps = plan_steps(n, n, 2 * width, budget, True)
    assert chunk == budget // (3 * 2 * width)
    pairs = launches = 0
    for st in steps:
        rows, cols = st.q1 - st.q0, st.k1 - st.k0
        diag = st.k0 == st.q0
        pairs += rows * (rows - 1) // 2 if diag else rows * cols
        n_tm, n_tn = -(-rows // 128), -(-cols // 128)
        plan = launch_plan(tile_count(n_tm, n_tn, diag))
        assert all(p <= MAX_GRID for _, p in plan)
        launches += len(plan)
    assert pairs == n * (n - 1) // 2
    assert launches >= len(steps)


def test_kernel_compiles_offline_for_its_targets() -> None:
    """The compiled kernel (not the interpreter) for sm_80 and sm_90 with int64 counters, no GPU
    needed: the lowering a GPU run depends on, including the int64 atomics."""
    from triton import compile as tcompile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from clipdedup.kernels.pairwise import pairwise_within_kernel

    sig = dict.fromkeys(["q_ptr", "k_ptr"], "*fp16") | dict.fromkeys(["hq_ptr", "hk_ptr"], "*fp32")
    sig |= {"out_ptr": "*i32", "count_ptr": "*i64", "cap": "i64", "tile0": "i64"}
    sig |= dict.fromkeys(["n_q", "n_k", "row_base", "col_base", "n_tm", "n_tn"], "i32")
    sig |= dict.fromkeys(["D", "SELF", "TRI", "BM", "BN", "BK"], "constexpr")
    for cc, tri in ((80, True), (90, False)):
        consts = {"D": 1280, "SELF": True, "TRI": tri, "BM": 128, "BN": 128, "BK": 64}
        src = ASTSource(fn=pairwise_within_kernel, signature=sig, constexprs=consts)
        k = tcompile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": 8, "num_stages": 3})
        assert "atom" in k.asm["ptx"] and len(k.asm["cubin"]) > 0


class FakeStream:
    def __init__(self, name: str) -> None:
        self.name, self.waited_streams, self.waited_events = name, [], []

    def wait_stream(self, other: FakeStream) -> None:
        self.waited_streams.append(other.name)

    def wait_event(self, ev: FakeEvent) -> None:
        self.waited_events.append(ev)


class FakeEvent:
    def __init__(self) -> None:
        self.stream: str | None = None

    def record(self, stream: FakeStream) -> None:
        self.stream = stream.name

    def synchronize(self) -> None:
        pass


class FakeCuda:
    """A recording `torch.cuda`: which stream is current when each thing happens."""

    def __init__(self) -> None:
        self.compute = FakeStream("compute")
        self.active = self.compute
        self.streams: list[FakeStream] = []
        self.Event = FakeEvent

    def Stream(self, device) -> FakeStream:  # noqa: N802 (torch.cuda.Stream)
        s = FakeStream(f"side{len(self.streams)}")
        self.streams.append(s)
        return s

    @contextlib.contextmanager
    def stream(self, s: FakeStream):
        prev, self.active = self.active, s
        try:
            yield
        finally:
            self.active = prev

    def current_stream(self, device=None) -> FakeStream:
        return self.active


class RecordingLoader(ChunkLoader):
    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.allocated_on: list[str] = []
        self.recorded: list[tuple[int, str]] = []

    def _empty(self, rows: int):
        self.allocated_on.append(self.cu.active.name)
        return super()._empty(rows)

    def _record(self, t, stream) -> None:
        self.recorded.append((t.data_ptr(), stream.name))


def test_chunk_loader_copies_on_its_own_stream() -> None:
    """The chunk is allocated and zeroed on the copy stream, which never waits for the compute
    stream (so the copy overlaps the kernel); the compute stream waits for the copy's last event and
    the chunk is recorded as used there. Values equal the plain CPU conversion, piece by piece."""
    rng = np.random.default_rng(0)
    host = rng.standard_normal((37, 20)).astype(np.float32)
    fake = FakeCuda()
    lines: list[str] = []
    loader = RecordingLoader(host, 0.25, 32, "cpu", piece_rows=8, cuda=fake, log=lines.append)
    plain = ChunkLoader(host, 0.25, 32, "cpu")
    for r0, r1 in ((0, 37), (5, 30), (36, 37)):
        pending = loader.start(r0, r1)
        assert fake.active is fake.compute
        got = loader.finish(pending)
        torch.testing.assert_close(got, plain.finish(plain.start(r0, r1)), rtol=0, atol=0)
        assert got[:, 20:].abs().sum() == 0  # the padding columns are zero
    copy = fake.streams[0]
    assert loader.allocated_on == ["side0"] * 3
    assert copy.waited_streams == [] and copy.waited_events == []
    assert [ev.stream for ev in fake.compute.waited_events] == ["side0"] * 3
    assert [name for _, name in loader.recorded] == ["compute"] * 3


class PinnedHostLoader(RecordingLoader):
    def _is_pinned(self, host) -> bool:
        return True


def test_chunk_loader_reads_a_pinned_host_array_directly() -> None:
    """A page-locked host matrix (load_db(pinned=True)) goes to the device without staging buffers
    (no second host copy of its rows), still on the copy stream; same values as the plain path."""
    host = np.random.default_rng(1).standard_normal((37, 20)).astype(np.float32)
    fake = FakeCuda()
    loader = PinnedHostLoader(host, 0.5, 32, "cpu", piece_rows=8, cuda=fake)
    plain = ChunkLoader(host, 0.5, 32, "cpu")
    assert loader.direct and loader.staging == []
    for r0, r1 in ((0, 37), (9, 20)):
        got = loader.finish(loader.start(r0, r1))
        torch.testing.assert_close(got, plain.finish(plain.start(r0, r1)), rtol=0, atol=0)
    assert loader.allocated_on == ["side0"] * 2 and fake.streams[0].waited_events == []
    assert not RecordingLoader(host, 0.5, 32, "cpu", cuda=FakeCuda()).direct  # pageable: staged


def test_pinned_allocation_failure_falls_back_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    real_empty = torch.empty
    calls: list[bool] = []

    def no_pinned(*a, **kw):
        calls.append(bool(kw.get("pin_memory")))
        if kw.get("pin_memory"):
            raise RuntimeError("CUDA error: out of memory\nmore")
        return real_empty(*a, **kw)

    monkeypatch.setattr(torch, "empty", no_pinned)
    monkeypatch.setattr(native, "_said_pageable", [])
    lines: list[str] = []
    a = native.empty_pinned((3, 4), log=lines.append)
    b = native.empty_pinned((2,), torch.uint8, log=lines.append)
    assert a.shape == (3, 4) and a.dtype == torch.float32 and b.dtype == torch.uint8
    assert calls == [True, False, True, False]
    assert len(lines) == 1 and "pageable" in lines[0] and "more" not in lines[0]
    host = np.ones((5, 3), np.float32)
    loader = ChunkLoader(host, 2.0, 16, "cpu", cuda=FakeCuda(), log=lines.append)
    assert len(loader.staging) == 2 and len(lines) == 1
    monkeypatch.setattr(native, "cuda_present", lambda: True)
    m = native.alloc_rows(4, 3)
    assert m.shape == (4, 3) and m.dtype == np.float32


def test_triton_unavailable_below_compute_capability_8(monkeypatch: pytest.MonkeyPatch) -> None:
    from clipdedup.match.core import MATCHERS

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    why = _triton_why_not()
    assert why is not None and "7.0" in why and "torch-cuda" in why
    assert MATCHERS.get().name == "torch-cuda"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert _triton_why_not() is None
    assert MATCHERS.get().name == "triton"


def test_kernel_wrapper_checks_before_launching() -> None:
    from clipdedup.kernels.pairwise import pairwise_within

    q = torch.zeros((0, 32), dtype=torch.float16)
    h = torch.zeros(0)
    assert pairwise_within(q, q, h, h, self_mode=True, blocks=(16, 16, 32)).shape == (0, 2)
    q1, h1 = torch.zeros((2, 32), dtype=torch.float16), torch.zeros(2)
    with pytest.raises(ValueError, match="int32"):
        pairwise_within(q1, q1, h1, h1, self_mode=False, row_base=(1 << 31) - 1, blocks=(16, 16, 32))


def test_triton_driver_with_a_reference_screen_and_progress() -> None:
    """pairs_triton's driver (scaling, steps, offsets, limit bookkeeping, progress) with the kernel's
    float64 reference standing in for the kernel: the reference's answer, one progress tick a step."""
    from clipdedup.kernels.pairwise import pairwise_within_ref
    from clipdedup.match import find_pairs
    from clipdedup.match.backends.triton import pairs_triton
    from helpers import planted, threshold_on_a_pair

    calls: list[dict] = []

    def screen(q, k, hq, hk, *, self_mode, row_base, col_base, overlap, **kw):
        calls.append(kw)
        overlap()
        return pairwise_within_ref(q, k, hq, hk, self_mode=self_mode, row_base=row_base, col_base=col_base)[0]

    x = planted(70, 40, seed=9)
    t = threshold_on_a_pair(x, q=0.05)
    ticks: list[int] = []
    i, j, d = pairs_triton(
        x, None, t, device="cpu", blocks=(16, 16, 32), budget=3 * 2 * 64 * 20, pairwise=screen,
        progress=ticks.append, max_grid=7, max_pairs=10**6,
    )  # fmt: skip
    want = find_pairs(x, t, backend="reference")
    order = np.lexsort((j, i))
    np.testing.assert_array_equal(np.stack([i[order], j[order]], 1), want[0])
    np.testing.assert_array_equal(d[order].astype(np.float32), want[1])
    assert len(ticks) == len(calls) == 10  # 4 chunks of 20 rows: 10 steps of the upper triangle
    assert {c["max_grid"] for c in calls} == {7} and max(c["max_pairs"] for c in calls) == 10**6


def test_kernel_does_not_specialize_on_what_changes_between_steps() -> None:
    """Every integer that changes between launches, streamed steps and overflow re-runs is exempt
    from Triton's value specialisation (divisible by 16, equal to 1), so that they reuse one
    compiled variant; only D and the constexprs select one."""
    from clipdedup.kernels.pairwise import pairwise_within_kernel

    flagged = {p.name for p in pairwise_within_kernel.params if p.do_not_specialize}
    ints = {"n_q", "n_k", "row_base", "col_base", "cap", "tile0", "n_tm", "n_tn"}
    assert flagged == ints

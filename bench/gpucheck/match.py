"""Matching checks: launch-grid arithmetic, the two GPU backends against planted answers and
against cpu-fp32 (self and import, one step and streamed in several steps), the kernel's overflow
re-run and `TooManyPairsError`, and the rate of `triton` against torch's blocked float16 `mm` +
threshold measured in the same run."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from gpucheck.core import Ctx, timed


def part_plan(ctx: Ctx) -> None:
    from clipdedup.kernels.pairwise import MAX_GRID, launch_plan, tile_count
    from clipdedup.match.backends.triton import plan_steps

    for n in (6_500_000, 10**9):

        def check(n: int = n) -> tuple[bool, str]:
            chunk, steps = plan_steps(n, n, 2 * 1280, int(0.6 * 80e9), True)
            pairs, biggest = 0, 0
            for st in steps:
                rows, cols = st.q1 - st.q0, st.k1 - st.k0
                diag = st.k0 == st.q0
                pairs += rows * (rows - 1) // 2 if diag else rows * cols
                plan = launch_plan(tile_count(-(-rows // 128), -(-cols // 128), diag))
                biggest = max([biggest, *(p for _, p in plan)])
            ok = pairs == n * (n - 1) // 2 and biggest <= MAX_GRID
            return ok, f"{len(steps)} steps, largest launch {biggest} programs (limit {MAX_GRID})"

        ctx.run("plan", f"N={n:,} x 1280, 80 GB", check, est=(2, 2))


def planted_unit(n: int, d: int, groups: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit rows (like CLIP embeddings) with `groups` planted triples (a source and two perturbed
    copies). Random unit rows in these dimensions are never within 0.3 of each other (cosine > 0.95
    is > 15 standard deviations), so the pairs within a threshold of that order are exactly the
    planted ones that pass it. Returns x and the (groups, 3) row indices of the triples."""
    rng = np.random.default_rng(seed)
    x = np.empty((n, d), np.float32)
    for s in range(0, n, 1 << 18):
        e = min(n, s + (1 << 18))
        x[s:e] = rng.standard_normal((e - s, d), dtype=np.float32)
        x[s:e] /= np.linalg.norm(x[s:e], axis=1, keepdims=True)
    tri = rng.choice(n, 3 * groups, replace=False).reshape(groups, 3)
    for c in (1, 2):
        noise = rng.standard_normal((groups, d), dtype=np.float32)
        noise *= (rng.uniform(0.01, 0.2, groups) / np.linalg.norm(noise, axis=1))[:, None]
        v = x[tri[:, 0]] + noise
        x[tri[:, c]] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return x, tri


def planted_answer(x: np.ndarray, tri: np.ndarray, t: float):
    """Sorted (pairs, float32 distances) within `t` among the planted triples, by the exact definition."""
    from clipdedup.match.core import exact_distances

    a = np.concatenate([tri[:, 0], tri[:, 0], tri[:, 1]])
    b = np.concatenate([tri[:, 1], tri[:, 2], tri[:, 2]])
    i, j = np.minimum(a, b), np.maximum(a, b)
    d = exact_distances(x[i], x[j])
    keep = d <= t
    i, j, d = i[keep], j[keep], d[keep]
    order = np.lexsort((j, i))
    return np.stack([i[order], j[order]], 1).astype(np.int64), d[order].astype(np.float32)


def same(got, want) -> tuple[bool, str]:
    (gp, gd), (wp, wd) = got, want
    if gp.shape != wp.shape or not np.array_equal(gp, wp):
        return False, f"{len(gp)} pairs vs {len(wp)} expected"
    if not np.array_equal(
        np.asarray(gd, np.float32).view(np.uint32), np.asarray(wd, np.float32).view(np.uint32)
    ):
        return False, f"{int((gd != wd).sum())} distances differ in their bits"
    return True, f"{len(gp)} pairs, distances bit-identical"


def _sort(i, j, d):
    order = np.lexsort((j, i))
    return np.stack([i[order], j[order]], 1).astype(np.int64), d[order].astype(np.float32)


def backends(cpu: bool) -> dict[str, Callable]:
    """Name -> (x, y, t) -> (sorted (pairs, distances), steps or 0), for the two GPU backends (or
    their CPU runs). The streamed ones get a budget of a quarter of their operands (a little less
    than all of them on CPU): several steps, in self and import mode alike."""
    from clipdedup.match import find_pairs
    from clipdedup.match.backends.torch_cuda import device_bytes, pairs_torch_cuda
    from clipdedup.match.backends.triton import pairs_triton, plan_steps

    def steps_of(x, y, row_bytes, budget) -> int:
        m = x.shape[0] if y is None else y.shape[0]
        return len(plan_steps(x.shape[0], m, row_bytes, budget, y is None)[1])

    def torch_steps(x, y, t, recipe: str, device: str, quarter: bool):
        row, fixed = device_bytes(x.shape[1], recipe)
        rows = x.shape[0] + (0 if y is None else y.shape[0])
        budget = fixed + (row * rows // 4 if quarter else row * rows - 1)
        got = pairs_torch_cuda(x, y, t, device=device, recipe=recipe, budget=budget)
        return _sort(*got), steps_of(x, y, row, budget - fixed)

    if not cpu:

        def triton_streamed(x, y, t):
            width = -(-x.shape[1] // 64) * 64
            budget = 2 * width * (x.shape[0] + (0 if y is None else y.shape[0])) // 4
            return _sort(*pairs_triton(x, y, t, budget=budget)), steps_of(x, y, 2 * width, budget)

        return {
            "triton": lambda x, y, t: (find_pairs(x, t, y=y, backend="triton"), 0),
            "torch-cuda": lambda x, y, t: (find_pairs(x, t, y=y, backend="torch-cuda"), 0),
            "triton streamed": triton_streamed,
            "torch-cuda streamed": lambda x, y, t: torch_steps(x, y, t, "float16", "cuda", True),
        }
    small = (16, 16, 32)

    def streamed_triton(x, y, t):
        width = -(-x.shape[1] // small[2]) * small[2]
        budget = 2 * width * (x.shape[0] + (0 if y is None else y.shape[0])) - 1  # chunks of a third
        got = pairs_triton(x, y, t, device="cpu", blocks=small, budget=budget, max_grid=5, cap=4)
        return _sort(*got), steps_of(x, y, 2 * width, budget)

    return {
        "triton (interpreter)": lambda x, y, t: (
            _sort(*pairs_triton(x, y, t, device="cpu", blocks=small)),
            0,
        ),
        "triton streamed, 5-program launches, cap 4 (interpreter)": streamed_triton,
        "torch-cuda streamed (cpu, float32 recipe)": lambda x, y, t: torch_steps(
            x, y, t, "float32", "cpu", False
        ),
    }


def _against(fn, x, y, t, want, streamed: bool) -> tuple[bool, str]:
    (got, steps), s = timed(fn, x, y, t)
    ok, detail = same(got, want)
    if streamed and steps > 0:
        ok = ok and steps >= 2
        detail += f", {steps} steps"
    return ok, detail


def part_match(ctx: Ctx) -> None:
    from clipdedup.match import find_pairs

    sizes = [(200, 64, 12), (96, 300, 6)] if ctx.cpu else [(1_000_000, 1280, 2000)]
    prefix = 48 if ctx.cpu else 60_000
    for n, d, groups in sizes:
        (x, tri), s = timed(planted_unit, n, d, groups, seed=n + d)
        t = float(np.median(planted_answer(x, tri, 1.0)[1]))  # a planted pair sits exactly on the threshold
        want = planted_answer(x, tri, t)
        if ctx.args.fail_on_purpose:
            want[1][0] = np.nextafter(want[1][0], np.float32(1))
        ctx.info("match", f"planted data {n:,} x {d}", f"threshold {t:.6f}, {len(want[0])} pairs", s)
        seconds: dict[str, float] = {}
        for name, fn in backends(ctx.cpu).items():
            c = ctx.run(
                "match",
                f"{name} self {n:,} x {d}",
                lambda fn=fn, x=x, t=t, want=want, st="stream" in name: _against(fn, x, None, t, want, st),
                est=(60, 15),
            )
            seconds[name] = c.seconds
        _anchor(ctx, x, t, seconds.get("triton", 0.0), n, d)
        # Against cpu-fp32 on a subset dense in planted rows: self, and import (the next rows as keys).
        rng = np.random.default_rng(d)
        rest = np.setdiff1d(rng.choice(n, min(n, 2 * prefix), replace=False), tri.ravel())
        rows = rng.permutation(np.concatenate([tri.ravel(), rest])[: 2 * prefix])
        xp, yp = x[rows[:prefix]], x[rows[prefix : 2 * prefix]]
        for mode, y in (("self", None), ("import", yp)):
            ref, s = timed(find_pairs, xp, t, y=y, backend="cpu-fp32")
            if ctx.args.fail_on_purpose and len(ref[1]):
                ref[1][0] = np.nextafter(ref[1][0], np.float32(1))
            ctx.info("match", f"cpu-fp32 {mode} {prefix:,} x {d} (planted rows)", f"{len(ref[0])} pairs", s)
            for name, fn in backends(ctx.cpu).items():
                ctx.run(
                    "match",
                    f"{name} {mode} {prefix:,} x {d} vs cpu-fp32",
                    lambda fn=fn, xp=xp, y=y, t=t, ref=ref, st="stream" in name: _against(
                        fn, xp, y, t, ref, st
                    ),
                    est=(30, 15),
                )


def _anchor(ctx: Ctx, x: np.ndarray, t: float, triton_s: float, n: int, d: int) -> None:
    """torch's blocked float16 `mm` + threshold over the upper triangle (no exact answer: the
    floor any screen pays), timed against the triton self run on the same rows."""

    def run() -> tuple[None, str]:
        import torch

        xs = torch.from_numpy(x).to("cuda").half()
        thr = 1 - t * t / 2  # cosine bound of unit rows
        rb, cb = 8192, 65536
        hits = torch.zeros((), dtype=torch.int64, device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i0 in range(0, n, rb):
            for j0 in range(i0, n, cb):
                c = xs[i0 : i0 + rb] @ xs[j0 : j0 + cb].T
                hits += (c >= thr).sum()
        torch.cuda.synchronize()
        s = time.perf_counter() - t0
        if triton_s > 0:
            ctx.ratio(
                "match",
                f"triton self {n:,} x {d} vs torch fp16 mm + threshold",
                s / triton_s,
                f"the anchor's rate ({s:.2f} s)",
                None,
                0.0,
            )
        return None, f"{s:.2f} s, {int(hits)} hits at cosine >= {thr:.4f} (diagonal blocks included)"

    ctx.run("match", f"anchor: torch fp16 mm + threshold {n:,} x {d}", run, est=(30, 0), needs_cuda=True)


def part_kernel(ctx: Ctx) -> None:
    """The kernel's overflow re-run (a buffer too small: run again with the room it asked for) and
    `TooManyPairsError`, with shifts that make every pair a candidate (known answer)."""
    import torch

    from clipdedup.kernels import pairwise as kmod

    dev = "cpu" if ctx.cpu else "cuda"
    blocks = (16, 16, 32) if ctx.cpu else (128, 128, 64)
    n, m = (40, 33) if ctx.cpu else (3000, 2500)
    q = torch.zeros((n, blocks[2]), dtype=torch.float16, device=dev)
    k = torch.zeros((m, blocks[2]), dtype=torch.float16, device=dev)
    hq, hk = torch.ones(n, device=dev), torch.ones(m, device=dev)
    name = "interpreter" if ctx.cpu else "compiled"

    def overflow() -> tuple[bool, str]:
        out = kmod.pairwise_within(q, k, hq, hk, self_mode=False, cap=7, blocks=blocks).cpu().numpy()
        tri = kmod.pairwise_within(q, q, hq, hq, self_mode=True, cap=5, blocks=blocks).cpu().numpy()
        got = {tuple(p) for p in out.tolist()}
        want = {(i, j) for i in range(n) for j in range(m)}
        got_t = {tuple(p) for p in tri.tolist()}
        want_t = {(i, j) for i in range(n) for j in range(i + 1, n)}
        ok = got == want and len(out) == n * m and got_t == want_t and len(tri) == len(want_t)
        return ok, f"cap 7 -> {len(out)} pairs (all {n} x {m}); self cap 5 -> {len(tri)} (upper triangle)"

    def too_many() -> tuple[bool, str]:
        try:
            kmod.pairwise_within(q, k, hq, hk, self_mode=False, cap=7, blocks=blocks, max_pairs=n * m - 1)
        except kmod.TooManyPairsError as e:
            return True, f"raised: {str(e)[:70]}..."
        return False, "no TooManyPairsError"

    ctx.run("kernel", f"overflow re-run, exact answer ({name})", overflow, est=(20, 20))
    ctx.run("kernel", f"TooManyPairsError past max_pairs ({name})", too_many, est=(5, 10))

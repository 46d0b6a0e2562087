"""Matching backends against the float64 reference: same pairs, same distances, awkward inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipdedup.match import MATCHERS, exact_distances, find_pairs, nearest_within, pairs_ref
from clipdedup.match.backends.cpu import pairs_cpu_bf16
from clipdedup.match.core import Tiles, scaled_problem
from clipdedup.match.screen.bounds import UBF16, Screen
from clipdedup.match.screen.project import (
    principal_projection,
    project,
    projected_candidates,
    projected_threshold,
)
from clipdedup.match.screen.torch_screen import RECIPES, AugmentedScreen, torch_screen
from helpers import (
    all_distances,
    bf16_edge_pairs,
    cpu_backends,
    planted,
    threshold_on_a_pair,
    usable_cpu_backends,
    use_backend,
)

# Every CPU backend, on every CPU: cpu-bf16 runs (slowly) where it is unavailable for speed alone;
# a backend that cannot run here skips with the registry's reason (the `backend` fixture).
CPU_BACKENDS = cpu_backends()


def ref(x, t, y=None):
    return find_pairs(x, t, y=y, backend="reference")


def assert_same(got, want):
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])  # distances from one function: bit for bit


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("n,d", [(0, 8), (1, 8), (2, 37), (63, 100), (65, 300), (130, 17)])
def test_self_matches_reference(backend, n, d):
    x = planted(n, d, seed=n * 1000 + d)
    t = threshold_on_a_pair(x) if n > 1 else 1.0
    assert_same(find_pairs(x, t, backend=backend), ref(x, t))


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("n,m,d", [(1, 65, 33), (63, 2, 100), (40, 70, 129), (0, 5, 4), (5, 0, 4)])
def test_rectangular_matches_reference(backend, n, m, d):
    rng = np.random.default_rng(n + m + d)
    y = rng.standard_normal((m, d)).astype(np.float32)
    x = rng.standard_normal((n, d)).astype(np.float32)
    if n and m:
        x[: min(n, m) // 2] = y[: min(n, m) // 2] + 0.01 * rng.standard_normal((min(n, m) // 2, d))
    t = threshold_on_a_pair(x, y, 0.03) if n and m else 1.0
    got = find_pairs(x, t, y=y, backend=backend)
    assert_same(got, ref(x, t, y))
    if n and m:
        assert len(got[0]) > 0


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
def test_identical_rows_no_pairs_every_pair(backend):
    x = np.tile(np.random.default_rng(1).standard_normal((1, 50)).astype(np.float32), (65, 1))
    got = find_pairs(x, 0.0, backend=backend)
    assert len(got[0]) == 65 * 64 // 2 and (got[1] == 0).all()
    y = planted(65, 50, seed=2, frac=0.0)
    assert len(find_pairs(y, 0.0, backend=backend)[0]) == 0
    big = float(all_distances(y).max()) * 1.0001
    assert_same(find_pairs(y, big, backend=backend), ref(y, big))
    assert len(find_pairs(y, big, backend=backend)[0]) == 65 * 64 // 2


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
def test_nan_and_inf_rows_take_part_in_no_pair(backend):
    x = planted(70, 40, seed=3, frac=0.5)
    x[[4, 10]] = np.nan
    x[20, 3] = np.inf
    t = threshold_on_a_pair(np.nan_to_num(x), q=0.02)
    got = find_pairs(x, t, backend=backend)
    assert_same(got, ref(x, t))
    assert not np.isin(got[0], [4, 10, 20]).any()
    y = planted(30, 40, seed=4)
    y[0] = np.nan
    assert_same(find_pairs(x, t, y=y, backend=backend), ref(x, t, y))


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("scale", [1e-20, 1e-3, 1e4, 1e18])
def test_far_from_unit_scale(backend, scale):
    x = planted(65, 64, seed=5, scale=scale)
    t = threshold_on_a_pair(x, q=0.1)
    assert_same(find_pairs(x, t, backend=backend), ref(x, t))


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
def test_mixed_norms_and_mean_offset(backend):
    """Rows of very different norms, all far from the origin (small differences, big norms)."""
    rng = np.random.default_rng(6)
    x = planted(90, 70, seed=6) * rng.uniform(0.01, 100, (90, 1)).astype(np.float32)
    x += 50
    t = threshold_on_a_pair(x, q=0.02)
    assert_same(find_pairs(x, t, backend=backend), ref(x, t))


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
def test_tiles_smaller_than_problem(backend):
    x = planted(150, 33, seed=7)
    t = threshold_on_a_pair(x, q=0.02)
    i, j, d = MATCHERS.get(backend).fn(x, None, t, block_rows=16, block_cols=32)
    want = ref(x, t)
    assert set(zip(i.tolist(), j.tolist())) == set(map(tuple, want[0].tolist()))


def test_bf16_margin_edge(monkeypatch):
    use_backend(monkeypatch, "cpu-bf16")
    rows, ts = bf16_edge_pairs(300, 6, seed=8)
    for (a, b), t in zip(rows, ts):
        filler = planted(40, 300, seed=9, frac=0.0) * 3
        x = np.vstack([filler[:20], a, filler[20:], b]).astype(np.float32)
        got = find_pairs(x, t, backend="cpu-bf16")
        assert (20, 41) in set(map(tuple, got[0].tolist()))
        assert_same(got, ref(x, t))


def test_bf16_projected_prescreen_and_fallback():
    x = planted(300, 300, seed=10)
    t = threshold_on_a_pair(x, q=0.01)
    want = ref(x, t)
    cand = projected_candidates(x, None, t, k=32, block_rows=64, block_cols=64)
    assert cand is not None
    assert set(map(tuple, want[0].tolist())) <= set(zip(cand[0].tolist(), cand[1].tolist()))
    i, j, d = pairs_cpu_bf16(x, None, t, project=True, project_dim=32, block_rows=64)
    assert set(zip(i.tolist(), j.tolist())) == set(map(tuple, want[0].tolist()))
    # Too many candidates: the pre-screen gives up and the full rows are screened.
    assert projected_candidates(x, None, t, k=32, max_candidates=10, block_rows=64, block_cols=64) is None
    i, j, d = pairs_cpu_bf16(x, None, t, project=True, project_dim=32, max_candidates=10, block_rows=64)
    assert set(zip(i.tolist(), j.tolist())) == set(map(tuple, want[0].tolist()))
    y = planted(50, 300, seed=11)
    t = threshold_on_a_pair(x, y, q=0.01)
    i, j, d = pairs_cpu_bf16(x, y, t, project=True, project_dim=32, block_rows=64)
    assert set(zip(i.tolist(), j.tolist())) == set(map(tuple, ref(x, t, y)[0].tolist()))


def test_projection_of_degenerate_data():
    rng = np.random.default_rng(19)
    same = np.tile(rng.standard_normal((1, 300)).astype(np.float32), (80, 1))
    low_rank = (rng.standard_normal((80, 3)) @ rng.standard_normal((3, 300))).astype(np.float32)
    for x, t in ((same, 0.0), (low_rank, threshold_on_a_pair(low_rank, q=0.05))):
        proj = principal_projection(x, 32)
        assert np.isfinite(proj.p).all() and proj.sigma < 1.001
        i, j, d = pairs_cpu_bf16(x, None, t, project=True, project_dim=32, block_rows=32)
        assert set(zip(i.tolist(), j.tolist())) == set(map(tuple, ref(x, t)[0].tolist()))


def test_projection_is_a_lower_bound():
    """Adversarial for the projection: differences living mostly outside the principal subspace."""
    rng = np.random.default_rng(12)
    x = planted(200, 256, seed=12)
    proj = principal_projection(x, 16)
    p = proj.p.astype(np.float64)
    diff = rng.standard_normal((200, 256))
    diff -= diff @ p.T @ p  # orthogonal to the subspace: projected distance ~ 0
    y = (x + 1e-3 * diff).astype(np.float32)
    px, py = project(x, proj), project(y, proj)
    d = exact_distances(x, y)
    dp = exact_distances(px, py)
    rx = float(np.linalg.norm(x.astype(np.float64), axis=1).max())
    ry = float(np.linalg.norm(y.astype(np.float64), axis=1).max())
    for k in range(200):
        assert dp[k] <= projected_threshold(float(d[k]), proj, rx, ry)


def adversarial_rows(n: int, d: int, seed: int, dtype) -> np.ndarray:
    """Positive entries each just below a rounding midpoint of `dtype`, so every operand rounds down
    by almost half an ulp and the products' errors all have one sign."""
    rng = np.random.default_rng(seed)
    v = rng.uniform(0.5, 1.0, (n, d))
    t = torch.from_numpy(v).to(dtype).double().numpy()  # rounded
    ulp = np.spacing(t.astype(np.float32)) * (2.0 ** (24 - (8 if dtype == torch.bfloat16 else 11)))
    return (np.floor(v / ulp) * ulp + 0.5 * ulp * (1 - 2.0**-6)).astype(np.float32)


def observed_vs_bound(x: np.ndarray, t: float, recipe_name: str):
    recipe = RECIPES[recipe_name]
    scr: Screen = recipe.screen(x.shape[1])
    sp = scaled_problem(x, None, t, scr, recipe.target_exp)
    xs = torch.from_numpy(x) * sp.scale
    aug = AugmentedScreen(torch.from_numpy(x), None, sp, recipe)
    out = torch.empty(len(x) * len(x), dtype=aug.dtype)
    c = aug.tile(aug.a_block(0, len(x)), 0, len(x), out).double().numpy()
    x64 = xs.double().numpy()
    exact = x64 @ x64.T + sp.alpha[:, None] + sp.beta[None, :]
    na = np.sqrt((x64 * x64).sum(1))
    bound = (
        scr.e * na[:, None] * na[None, :]
        + scr.h * (na[:, None] + na[None, :])
        + scr.f * (np.abs(sp.alpha)[:, None] + np.abs(sp.beta)[None, :])
        + scr.g
    )
    out_round = (UBF16 if recipe.dtype == "bfloat16" else 2.0**-24) * np.abs(c)  # the tile's own dtype
    return np.abs(c - exact), bound + out_round, exact


@pytest.mark.parametrize("recipe", ["bfloat16", "float32"])
def test_screening_error_within_bound(recipe):
    dtype = torch.bfloat16 if recipe == "bfloat16" else torch.float16
    x = adversarial_rows(24, 2000, seed=13, dtype=dtype)
    t = float(all_distances(x)[np.triu_indices(24, 1)].max())  # near-zero screened values
    err, bound, exact = observed_vs_bound(x, t, recipe)
    assert (err <= bound).all(), float((err / bound).max())
    if recipe == "bfloat16":
        # The adversarial rows push the error to a good part of the bound: the bound is not loose by
        # orders of magnitude, and the test would notice a wrong constant.
        assert float((err / bound).max()) > 0.3


def test_margin_covers_adversarial_pairs_at_threshold(monkeypatch):
    use_backend(monkeypatch, "cpu-bf16")
    x = adversarial_rows(40, 700, seed=14, dtype=torch.bfloat16)
    for q in (0.0, 0.3, 0.7):
        t = threshold_on_a_pair(x, q=q)
        assert_same(find_pairs(x, t, backend="cpu-bf16"), ref(x, t))
        i, j = torch_screen(x, None, t, RECIPES["bfloat16"])
        assert set(map(tuple, ref(x, t)[0].tolist())) <= set(zip(i.tolist(), j.tolist()))


def test_tiles_cover_upper_triangle_once():
    for n, b in [(1, 4), (10, 4), (17, 8), (64, 16)]:
        seen = np.zeros((n, n), int)
        tiles = Tiles(n, n, b, 3 * b, upper=True)
        for i0, i1, j0, j1 in tiles:
            seen[i0:i1, j0:j1] += 1
        assert tiles.count() == sum(1 for _ in tiles)
        assert (seen[np.triu_indices(n, 1)] == 1).all()


def test_reference_is_the_definition():
    x = planted(20, 9, seed=15)
    d = all_distances(x)
    t = float(np.sort(d[np.triu_indices(20, 1)])[7])
    i, j, dist = pairs_ref(x, None, t)
    want = [(a, b) for a in range(20) for b in range(a + 1, 20) if d[a, b] <= t]
    assert list(zip(i.tolist(), j.tolist())) == want
    assert len(want) == 8


def test_nearest_within_matches_brute_force():
    x = planted(60, 12, seed=16, frac=0.6)
    t = threshold_on_a_pair(x, q=0.2)
    pairs, dist = find_pairs(x, t, backend="cpu-fp32")
    for k in (1, 3, 100):
        idx, dd = nearest_within(pairs, dist, len(x), k)
        full = all_distances(x).astype(np.float32)
        for r in range(len(x)):
            cand = sorted((float(full[r, c]), c) for c in range(len(x)) if c != r and full[r, c] <= t)
            cand = cand[:k]
            want = [c for _, c in cand] + [-1] * (k - len(cand))
            assert idx[r].tolist() == want
            assert np.isinf(dd[r, len(cand) :]).all()
    y = planted(30, 12, seed=17)
    pairs, dist = find_pairs(x, 4.0, y=y, backend="cpu-fp32")
    idx, dd = nearest_within(pairs, dist, len(x), 2, symmetric=False)
    assert ((idx == -1) | (idx < len(y))).all()
    with pytest.raises(ValueError):
        nearest_within(pairs, dist, len(x), 0)


def test_bad_arguments():
    with pytest.raises(ValueError):
        find_pairs(np.zeros((3, 4)), -1.0)
    with pytest.raises(ValueError):
        find_pairs(np.zeros((3, 4)), float("nan"))
    with pytest.raises(ValueError):
        find_pairs(np.zeros((3, 4)), 1.0, y=np.zeros((3, 5)))


@pytest.mark.gpu
@pytest.mark.parametrize("n,d", [(1, 8), (63, 100), (300, 512)])
def test_torch_cuda_matches_reference(n, d):
    x = planted(n, d, seed=n + d)
    t = threshold_on_a_pair(x) if n > 1 else 1.0
    assert_same(find_pairs(x, t, backend="torch-cuda"), ref(x, t))
    y = planted(40, d, seed=d)
    assert_same(find_pairs(x, t, y=y, backend="torch-cuda"), ref(x, t, y))


def test_cli_top_k_in_json_summary(pics, tmp_path, tiny_model, capsys):
    import json
    import shutil

    from clipdedup.cli import dedup_cmd, import_cmd, run_cli

    def run(cmd, args):
        capsys.readouterr()
        assert run_cli(cmd, "test", args + ["--json", "-q"]) == 0
        return json.loads(capsys.readouterr().out)

    db = tmp_path / "db"
    s = run(dedup_cmd, ["-i", str(pics), "-d", str(db), "-m", tiny_model, "-th", "100", "--top-k", "2"])
    top = s["top_k"]
    assert top["k"] == 2 and len(top["nearest"]) == s["loaded"] > 2
    for name, near in top["nearest"].items():
        assert len(near) == 2 and near[0][1] <= near[1][1] and name not in {n for n, _ in near}
    s = run(dedup_cmd, ["-i", str(pics), "-d", str(db), "-m", tiny_model, "--skip-update", "-th", "100"])
    assert "top_k" not in s
    new = tmp_path / "new"
    new.mkdir()
    imgs = sorted(p for p in pics.rglob("*.jpg"))[:2]
    for p in imgs:
        shutil.copy(p, new / p.name)
    args = ["-bi", str(pics), "-bd", str(db), "-ii", str(new), "-id", str(tmp_path / "ndb"), "-m", tiny_model]
    s = run(import_cmd, args + ["-th", "100", "--top-k", "1"])
    near = s["top_k"]["nearest"]
    assert sorted(near) == sorted(p.name for p in imgs)
    assert all(len(v) == 1 and v[0][0].startswith("base:") for v in near.values())


def test_user_matmul_precision_is_ignored_and_restored(monkeypatch):
    x = planted(65, 300, seed=18)
    t = threshold_on_a_pair(x, q=0.02)
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        for b in usable_cpu_backends(monkeypatch):
            assert_same(find_pairs(x, t, backend=b), ref(x, t))
        i, j, d = pairs_cpu_bf16(x, None, t, project=True, project_dim=32)
        assert set(zip(i.tolist(), j.tolist())) == set(map(tuple, ref(x, t)[0].tolist()))
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(old)

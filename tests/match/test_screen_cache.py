"""The match cache's screen section (match/cache/screen.py): operands kept from a run and completed
with the new or changed rows equal, bit for bit, a fresh build with the same projection and bound;
matching on them gives the reference's pairs; doubts give None and a reason, never wrong operands."""

from __future__ import annotations

import io

import numpy as np
import pytest

from clipdedup.db.rowstore import store_of_matrix
from clipdedup.match import find_pairs
from clipdedup.match.cache.screen import project_changed, read_screen, section_size, write_section
from clipdedup.match.screen.store_screen import ScreenRows, finish_screen, new_screen_rows, screen_rows
from clipdedup.match.store import find_pairs_store
from helpers import planted, threshold_on_a_pair

K = 128


def section(sr: ScreenRows, dim: int) -> bytes:
    f = io.BytesIO()
    write_section(f, sr, dim)
    assert len(f.getvalue()) == section_size(sr, dim)
    return f.getvalue()


def reread(raw: bytes, old_of_new, dim: int, recipe: str = "bfloat16", k: int = K):
    return read_screen(io.BufferedReader(io.BytesIO(raw)), len(raw), np.asarray(old_of_new), dim, recipe, k)


def edit(x: np.ndarray, rng: np.random.Generator, new: int, changed: int, removed: int):
    """Rows after removing, changing and adding some (new ones no longer than the longest old row),
    with each row's old row or -1."""
    n = len(x)
    keep = np.sort(rng.choice(n, n - removed, replace=False))
    y, old = x[keep].copy(), keep.astype(np.int64)
    ch = rng.choice(len(y), changed, replace=False)
    y[ch] = y[rng.integers(0, len(y), changed)] + 0.01 * rng.standard_normal((changed, x.shape[1]))
    old[ch] = -1
    add = x[rng.integers(0, n, new)] * np.float32(0.98) + 0.005 * rng.standard_normal((new, x.shape[1]))
    at = np.sort(rng.choice(len(y) + new, new, replace=False))
    out, oo = np.empty((len(y) + new, x.shape[1]), np.float32), np.full(len(y) + new, -1, np.int64)
    rest = np.setdiff1d(np.arange(len(out)), at)
    out[at], out[rest], oo[rest] = add, y, old
    return out, oo


def bits(t):
    import torch

    return t.contiguous().view(torch.uint8).numpy()


@pytest.mark.parametrize("recipe", ["bfloat16", "float32"])
@pytest.mark.parametrize("n,d", [(1, 160), (300, 160), (700, 200), (90, 24)])
def test_kept_operands_equal_a_fresh_build(recipe: str, n: int, d: int) -> None:
    rng = np.random.default_rng(n + d)
    x = planted(n, d, seed=n) * rng.uniform(0.5, 2.0, (n, 1)).astype(np.float32)
    if n > 5:
        x[3, 7] = np.nan
    with store_of_matrix(x) as st:
        sr = screen_rows(st, recipe)
    raw = section(sr, d)
    y, old = edit(x, rng, new=min(n, 17), changed=n // 10, removed=n // 7)
    with store_of_matrix(y) as st2:
        got, why = reread(raw, old, d, recipe)
        assert got is not None, why
        got, why = project_changed(got, st2, np.flatnonzero(old < 0))
        assert got is not None, why
    # kept rows: the stored operands, moved to their new places; the others: projected in one batch
    # (the projection's float32 sums depend on the batch's shape; its error bound does not)
    want = new_screen_rows(len(y), recipe, sr.k, sr.proj, sr.rx)
    fin = np.isfinite(y).all(axis=1)
    kept, ch = np.flatnonzero(old >= 0), np.flatnonzero(old < 0)
    want.cols[kept] = sr.cols[old[kept]]
    want.na0[kept], want.finite[kept] = sr.na0[old[kept]], sr.finite[old[kept]]
    want.fill(ch, np.where(fin[ch, None], y[ch], 0).astype(np.float32), fin[ch])
    np.testing.assert_array_equal(bits(got.cols), bits(want.cols))
    np.testing.assert_array_equal(got.na0, want.na0)
    np.testing.assert_array_equal(got.finite, fin)
    assert got.scale == sr.scale and (got.proj is None) == (d <= K)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matching_on_kept_operands_is_exact(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = planted(900, 160, seed=seed, frac=0.3)
    t = threshold_on_a_pair(x, q=0.3)
    with store_of_matrix(x) as st:
        raw = section(screen_rows(st, "bfloat16"), 160)
    y, old = edit(x, rng, new=40, changed=30, removed=50)
    want = find_pairs(y, t, backend="reference")
    with store_of_matrix(y) as st2:
        sr, _ = reread(raw, old, 160)
        assert sr is not None
        changed = np.flatnonzero(old < 0)
        sr, _ = project_changed(sr, st2, changed)
        assert sr is not None
        pairs, d = find_pairs_store(st2, t, screen=finish_screen(sr, t), block=256)
        np.testing.assert_array_equal(pairs, want[0])
        np.testing.assert_array_equal(d.astype(np.float32), want[1])
        part, _ = find_pairs_store(st2, t, rows=changed, screen=finish_screen(sr, t), block=256)
        touch = np.isin(want[0], changed).any(axis=1)
        np.testing.assert_array_equal(part, want[0][touch])


def test_doubts_give_none_and_why() -> None:
    x = planted(200, 160, seed=4)
    with store_of_matrix(x) as st:
        sr = screen_rows(st, "bfloat16")
    raw = section(sr, 160)
    same = np.arange(200)
    assert reread(raw, same, 160)[0] is not None
    assert "another screen" in reread(raw, same, 160, recipe="float32")[1]
    assert "another screen" in reread(raw, same, 160, k=64)[1]
    assert "another dim" in reread(raw, same, 161)[1]
    for at in (len(raw) - 100, len(raw) // 2, 30):  # a flipped bit anywhere
        bad = bytearray(raw)
        bad[at] ^= 0x10
        got, why = reread(bytes(bad), same, 160)
        assert got is None and "damaged" in why, at
    got, why = reread(raw[:-9], same, 160)
    assert got is None and "damaged" in why
    assert "disagree" in reread(raw, np.array([0, 250]), 160)[1]
    longer = np.concatenate([x, 3 * x[:1]])  # a new row beyond the stored norm bound
    with store_of_matrix(longer) as st2:
        kept, _ = reread(raw, np.append(same, -1), 160)
        assert kept is not None
        got, why = project_changed(kept, st2, np.array([200]))
    assert got is None and "bound" in why


def test_the_documented_layout_sizes() -> None:
    from pathlib import Path

    from clipdedup.match.cache.matches import HEADER
    from clipdedup.match.cache.screen import SECTION_HEAD

    doc = (Path(__file__).resolve().parents[2] / "docs" / "db-format.md").read_text()
    assert f"| `[0, {HEADER.size})` | header: magic `CDMATCH" in doc
    assert f"| screen section head ({SECTION_HEAD.size} bytes) |" in doc

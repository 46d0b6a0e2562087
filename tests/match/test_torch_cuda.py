"""The `torch-cuda` backend's step logic on CPU (the float32 recipe stands in for float16) and its
float32-output matmul without `out_dtype` (torch < 2.8); the same on CUDA under `gpu`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipdedup.match import find_pairs
from clipdedup.match.backends.torch_cuda import device_bytes, pairs_torch_cuda
from clipdedup.match.backends.triton import plan_steps
from clipdedup.match.screen import torch_screen as ts
from helpers import planted, threshold_on_a_pair


def ref(x, t, y=None):
    return find_pairs(x, t, y=y, backend="reference")


def assert_same(got, want):
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])  # distances from one function: bit for bit


def sorted_result(i, j, d):
    order = np.lexsort((j, i))
    return np.stack([i[order], j[order]], 1), d[order].astype(np.float32)


@pytest.mark.parametrize("n", [0, 1, 63, 65])
@pytest.mark.parametrize("budget_rows", [8, 30, None])
def test_streamed_steps_equal_reference(n: int, budget_rows: int | None) -> None:
    x = planted(n, 24, seed=n + 1)
    y = planted(37, 24, seed=n + 2)
    if n > 10:
        y[:5] = x[3:8] + 0.01
    row, fixed = device_bytes(24, "float32")
    budget = None if budget_rows is None else fixed + 3 * row * budget_rows
    for other in (None, y):
        t = threshold_on_a_pair(x, other, q=0.05) if n > 1 else 1.0
        got = pairs_torch_cuda(
            x, other, t, device="cpu", recipe="float32", budget=budget, block_rows=16, block_cols=16
        )
        assert_same(sorted_result(*got), ref(x, t, other))
        if budget_rows == 3 and n > 10:
            assert (
                len(plan_steps(n, len(x if other is None else other), row, 3 * row * 3, other is None)[1]) > 4
            )


def test_all_identical_rows_streamed() -> None:
    x = np.tile(planted(1, 16, seed=3), (65, 1))
    row, fixed = device_bytes(16, "float32")
    i, j, d = pairs_torch_cuda(x, None, 0.0, device="cpu", recipe="float32", budget=fixed + 3 * row * 7)
    assert len(i) == 65 * 64 // 2 and (d == 0).all() and (i < j).all()


def test_mm_without_out_dtype_falls_back_to_float32_operands(monkeypatch: pytest.MonkeyPatch) -> None:
    real_mm = torch.mm
    calls: list[bool] = []

    def old_mm(a, b, **kw):
        calls.append("out_dtype" in kw)
        if "out_dtype" in kw:
            raise TypeError("mm() received an invalid combination of arguments - got (out_dtype=...)")
        return real_mm(a, b, **kw)

    monkeypatch.setattr(torch, "mm", old_mm)
    monkeypatch.setattr(ts, "_NO_OUT_DTYPE", [])
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(33, 40, generator=g) * 8).half()
    b = (torch.randn(17, 40, generator=g) * 8).half()
    c = ts.mm_float32_out(a, b)
    c2 = ts.mm_float32_out(a, b)
    assert c.dtype == torch.float32 and calls == [True, False, False]
    exact = a.double() @ b.double().T  # products of float16 values are exact in float32
    bound = 40 * 2**-23 * (a.double().abs() @ b.double().abs().T)
    assert ((c.double() - exact).abs() <= bound).all()
    torch.testing.assert_close(c, c2, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("budget_rows", [50, None])
def test_torch_cuda_streamed_matches_reference(budget_rows: int | None) -> None:
    x = planted(700, 256, seed=7)
    y = planted(300, 256, seed=8)
    row, fixed = device_bytes(256, "float16")
    budget = None if budget_rows is None else fixed + 3 * row * budget_rows
    for other in (None, y):
        t = threshold_on_a_pair(x, other, q=0.02)
        got = pairs_torch_cuda(x, other, t, budget=budget, block_rows=128, block_cols=128)
        assert_same(sorted_result(*got), ref(x, t, other))
        assert_same(find_pairs(x, t, y=other, backend="torch-cuda"), ref(x, t, other))

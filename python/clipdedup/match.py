"""Matching: every pair of rows closer than a euclidean threshold, exactly.

The answer is defined by `exact_distances`: sqrt(sum((float64(a_k) - float64(b_k))^2)) computed from
the float32 inputs. Fast backends screen tiles with a matmul (||a||^2 + ||b||^2 - 2 a.b) in float32 or
lower precision, keep every pair within the threshold plus a margin derived from the screening
precision's rounding-error bound, and re-check those candidates with `exact_distances`. So each
backend returns the reference's pairs, pair for pair, including pairs exactly at the threshold.
Memory is O(N*D + tile + pairs); no N x N matrix is ever built.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from clipdedup.registry import Registry

Matcher = Callable[..., tuple[np.ndarray, np.ndarray]]
MATCHERS: Registry[Matcher] = Registry("matching backend", env_var="CLIPDEDUP_BACKEND")

U32 = 2.0**-24  # unit roundoff of float32
U16 = 2.0**-11  # float16
UBF16 = 2.0**-8  # bfloat16
RECHECK_BYTES = 64 << 20


def exact_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The reference distance of matching rows: float64 sqrt(sum((a - b)^2)).

    Args:
        a, b: float32 (K, D) arrays.

    Returns:
        float64 (K,) distances. Every backend's re-check and the reference call this one function,
        so their values agree bit for bit.
    """
    d = np.subtract(a, b, dtype=np.float64)
    np.multiply(d, d, out=d)
    return np.sqrt(d.sum(axis=1))


def recheck(
    x: np.ndarray, y: np.ndarray, i: np.ndarray, j: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keeps the candidate pairs (i, j) whose exact distance is <= threshold."""
    if i.size == 0:
        return i, j, np.zeros(0, np.float64)
    chunk = max(1, RECHECK_BYTES // (8 * max(1, x.shape[1])))
    keep_i, keep_j, keep_d = [], [], []
    for s in range(0, i.size, chunk):
        ii, jj = i[s : s + chunk], j[s : s + chunk]
        d = exact_distances(x[ii], y[jj])
        m = d <= threshold
        keep_i.append(ii[m])
        keep_j.append(jj[m])
        keep_d.append(d[m])
    return np.concatenate(keep_i), np.concatenate(keep_j), np.concatenate(keep_d)


def dot_error_bound(dim: int, u_in: float, u_out: float = 0.0, u_acc: float = U32) -> float:
    """Bound on |computed a.b - a.b| / (||a|| ||b||) for a matmul with rounded operands.

    Rounding each operand to a type of unit roundoff u_in perturbs each product by at most
    (2 u_in + u_in^2) |a_k b_k|; accumulating D terms in a type of unit roundoff u_acc adds
    gamma_D = D u_acc / (1 - D u_acc) (any summation order); rounding the result to u_out adds u_out.
    Cauchy-Schwarz turns sum |a_k b_k| into ||a|| ||b||.
    """
    gamma = dim * u_acc / (1.0 - dim * u_acc)
    rounded = 2 * u_in + u_in * u_in
    return (rounded + gamma * (1 + u_in) ** 2) * (1 + u_out) + u_out


def screen_margin(e_dot: float, max_a: float, max_b: float, threshold: float) -> float:
    """delta such that testing  nb - 2 G~ <= (t^2 + delta) - na  in float32 never drops a true pair.

    G~ is the screened dot product (relative error e_dot), na/nb are float32 copies of the squared
    norms; the subtraction and comparison add a few float32 roundings of magnitude at most
    (||a|| + ||b||)^2 + t^2. See docs in README ("Exactness").
    """
    s = (max_a + max_b) ** 2
    delta = ((e_dot + 2 * U32) * s + U32 * threshold * threshold) / (1 - U32)
    return delta * 1.01 + 1e-30


@dataclass
class Tiles:
    """Row / column blocks of a (N x M) problem; for self-matching only tiles on or above the diagonal."""

    n: int
    m: int
    block_rows: int
    block_cols: int
    upper: bool

    def __iter__(self) -> Iterator[tuple[int, int, int, int]]:
        for i0 in range(0, self.n, self.block_rows):
            i1 = min(self.n, i0 + self.block_rows)
            for j0 in range(i0 if self.upper else 0, self.m, self.block_cols):
                yield i0, i1, j0, min(self.m, j0 + self.block_cols)

    def count(self) -> int:
        return sum(1 for _ in self)


def _sorted_result(i: np.ndarray, j: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((j, i))
    pairs = np.stack([i[order], j[order]], axis=1).astype(np.int64, copy=False)
    return pairs.reshape(-1, 2), d[order].astype(np.float32)


def _check_inputs(x: np.ndarray, y: np.ndarray | None, threshold: float) -> None:
    if x.ndim != 2 or (y is not None and (y.ndim != 2 or y.shape[1] != x.shape[1])):
        raise ValueError("x must be (N, D) and y (M, D) with the same D")
    if not (threshold >= 0) or math.isinf(threshold):
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold}")


def find_pairs(
    x: np.ndarray,
    threshold: float,
    *,
    y: np.ndarray | None = None,
    backend: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """All pairs of rows within `threshold` (euclidean), exactly as `pairs_ref` defines them.

    Args:
        x: (N, D) embeddings; converted to float32.
        threshold: distance bound, inclusive.
        y: optional (M, D) second set; then pairs are (row of x, row of y), else i < j within x.
        backend: a name from `MATCHERS` (see `clipdedup backends`); default: best available, or the
            `CLIPDEDUP_BACKEND` environment variable.
        progress: called with the number of tiles finished, for progress bars.

    Returns:
        (pairs, distances): int64 (P, 2) and float32 (P,), sorted by (i, j).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = None if y is None else np.ascontiguousarray(y, dtype=np.float32)
    _check_inputs(x, y, threshold)
    threshold = float(threshold)
    fn = MATCHERS.get(backend).fn
    other = x if y is None else y
    if x.shape[0] == 0 or other.shape[0] == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    # Rows with NaN/inf have no finite distance to anything: match the finite rows only.
    fx = np.isfinite(x).all(axis=1)
    fy = fx if y is None else np.isfinite(y).all(axis=1)
    if fx.all() and fy.all():
        i, j, d = fn(x, y, threshold, progress=progress)
    else:
        ix, iy = np.flatnonzero(fx), np.flatnonzero(fy)
        sub_y = None if y is None else np.ascontiguousarray(y[iy])
        i, j, d = fn(np.ascontiguousarray(x[ix]), sub_y, threshold, progress=progress)
        i, j = ix[i], iy[j]
    return _sorted_result(np.asarray(i), np.asarray(j), np.asarray(d))


@MATCHERS.register("reference", priority=-100, doc="float64, row by row; slow, always present")
def pairs_ref(
    x: np.ndarray, y: np.ndarray | None, threshold: float, *, progress=None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The definition of the answer: every pair's `exact_distances` compared with the threshold."""
    other = x if y is None else y
    chunk = max(1, RECHECK_BYTES // (8 * max(1, x.shape[1])))
    out_i, out_j, out_d = [], [], []
    for r in range(x.shape[0]):
        start = r + 1 if y is None else 0
        for s in range(start, other.shape[0], chunk):
            cols = np.arange(s, min(other.shape[0], s + chunk))
            d = exact_distances(np.broadcast_to(x[r], (cols.size, x.shape[1])), other[cols])
            m = d <= threshold
            out_i.append(np.full(int(m.sum()), r, np.int64))
            out_j.append(cols[m])
            out_d.append(d[m])
        if progress:
            progress(1)
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_d)


def screen_tiles(
    x: np.ndarray,
    y: np.ndarray | None,
    threshold: float,
    gram: Callable[[int, int, int, int], np.ndarray],
    e_dot: float,
    *,
    block_rows: int,
    block_cols: int,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs of all tiles: those passing  ||a||^2 + ||b||^2 - 2 G~ <= t^2 + margin.

    `gram(i0, i1, j0, j1)` returns the screened float32 dot products of that tile.
    """
    other = x if y is None else y
    na = np.einsum("ij,ij->i", x, x, dtype=np.float64)
    nb = na if y is None else np.einsum("ij,ij->i", y, y, dtype=np.float64)
    norm_a, norm_b = np.sqrt(na), np.sqrt(nb)
    na32, nb32 = na.astype(np.float32), nb.astype(np.float32)
    t2 = threshold * threshold
    cand_i, cand_j = [], []
    for i0, i1, j0, j1 in Tiles(x.shape[0], other.shape[0], block_rows, block_cols, y is None):
        delta = screen_margin(e_dot, norm_a[i0:i1].max(), norm_b[j0:j1].max(), threshold)
        g = gram(i0, i1, j0, j1)  # [BM, BN] float32
        # nb - 2G <= (t^2 + delta) - na, evaluated in float32 (the margin covers its roundings).
        lhs = nb32[None, j0:j1] - 2.0 * g
        rhs = np.float32(t2 + delta) - na32[i0:i1, None]
        ii, jj = np.nonzero(lhs <= rhs)
        ii += i0
        jj += j0
        if y is None and j0 < i1:
            keep = jj > ii
            ii, jj = ii[keep], jj[keep]
        cand_i.append(ii.astype(np.int64))
        cand_j.append(jj.astype(np.int64))
        if progress:
            progress(1)
    if not cand_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(cand_i), np.concatenate(cand_j)


def _torch_threads_ok() -> str | None:
    try:
        import torch  # noqa: F401
    except ImportError:
        return "torch is not installed"
    return None


@MATCHERS.register("cpu-fp32", priority=10, doc="float32 BLAS screening + exact re-check")
def pairs_cpu_fp32(x, y, threshold, *, progress=None, block_rows=2048, block_cols=8192):
    other = x if y is None else y

    def gram(i0, i1, j0, j1):
        return x[i0:i1] @ other[j0:j1].T

    e_dot = dot_error_bound(x.shape[1], u_in=0.0)
    i, j = screen_tiles(
        x, y, threshold, gram, e_dot, block_rows=block_rows, block_cols=block_cols, progress=progress
    )
    return recheck(x, other, i, j, threshold)


def _bf16_why_not() -> str | None:
    why = _torch_threads_ok()
    if why:
        return why
    import torch

    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        if probe is not None and not probe():
            return "this CPU has no fast bfloat16 matmul (oneDNN reports no bf16 support)"
    except Exception:
        pass
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = f.read()
    except OSError:
        return "cannot read CPU flags"
    if "avx512_bf16" not in flags and "amx_bf16" not in flags:
        return "this CPU has no avx512_bf16/amx_bf16 (bf16 matmul would be slower than float32)"
    return None


@MATCHERS.register("cpu-bf16", priority=20, why_not=_bf16_why_not, doc="bfloat16 screening + exact re-check")
def pairs_cpu_bf16(x, y, threshold, *, progress=None, block_rows=2048, block_cols=8192):
    import torch

    other = x if y is None else y
    tx = torch.from_numpy(x).to(torch.bfloat16)
    ty = tx if y is None else torch.from_numpy(other).to(torch.bfloat16)

    def gram(i0, i1, j0, j1):
        with torch.inference_mode():
            return torch.mm(tx[i0:i1], ty[j0:j1].T).float().numpy()

    # Operands rounded to bf16, fp32 accumulation, result rounded to bf16.
    e_dot = dot_error_bound(x.shape[1], u_in=UBF16, u_out=UBF16)
    i, j = screen_tiles(
        x, y, threshold, gram, e_dot, block_rows=block_rows, block_cols=block_cols, progress=progress
    )
    return recheck(x, other, i, j, threshold)

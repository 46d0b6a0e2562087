"""The rows bench_match (and bench_scale) match: two workloads of N unit rows with planted near copies.

- `planted`: isotropic Gaussian rows (every direction alike), 5% of them replaced by noisy copies
  of others at distances 0.01..0.09. Unrelated rows sit near distance sqrt(2): the easy case for a
  screen, and the one earlier numbers in docs/benchmarks.md were measured on.
- `clip_like`: rows shaped like CLIP image embeddings: a shared mean direction, a power-law
  spectrum around it (the k-th principal variance ~ 1/k), about 200 clusters, the mean's strength
  set so that the median cosine of two random rows is about 0.45; the same 5% of planted copies.
  Unrelated rows are much closer than in `planted`, and most of the variance lives in a few
  directions, which is what the principal-subspace pre-screen and any low-precision screen meet
  on real collections.
"""

from __future__ import annotations

import numpy as np

D = 1280
WORKLOADS = ("isotropic", "clip-like")
CLUSTERS = 200
MEDIAN_COS = 0.45


def plant_copies(x: np.ndarray, rng: np.random.Generator, frac: float) -> np.ndarray:
    """Replaces `frac` of the unit rows of x by noisy copies of others (distance 0.01..0.09), in place."""
    n, d = x.shape
    k = int(n * frac)
    src, dst = rng.choice(n, k, replace=False), rng.choice(n, k, replace=False)
    noise = rng.standard_normal((k, d), dtype=np.float32)
    noise *= rng.uniform(0.01, 0.09, (k, 1)).astype(np.float32) / np.linalg.norm(noise, axis=1, keepdims=True)
    x[dst] = x[src] + noise
    x[dst] /= np.linalg.norm(x[dst], axis=1, keepdims=True)
    return x


def planted(n: int, d: int = D, frac: float = 0.05, seed: int = 0) -> np.ndarray:
    """Unit rows; `frac` of them replaced by noisy copies of others (distance 0.01..0.09)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return plant_copies(x, rng, frac)


def clip_like(n: int, d: int = D, frac: float = 0.05, seed: int = 0, clusters: int = CLUSTERS) -> np.ndarray:
    """float32 (n, d) unit rows: mean direction + power-law spectrum + clusters (module docstring)."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0].astype(np.float32)  # random principal axes
    scale = (1.0 / np.sqrt(np.arange(1, d + 1))).astype(np.float32)  # sqrt of variances ~ 1/k

    def spectral(m: int) -> np.ndarray:
        return (rng.standard_normal((m, d), dtype=np.float32) * scale) @ basis

    centres = spectral(clusters)
    label = rng.integers(0, clusters, n)
    x = np.empty((n, d), np.float32)
    for s in range(0, n, 8192):  # a cluster's centre plus a spread as large again around it
        x[s : s + 8192] = centres[label[s : s + 8192]] + spectral(min(8192, n - s))
    mean = rng.standard_normal(d).astype(np.float32)
    mean /= np.linalg.norm(mean)
    x += _mean_strength(x[: min(n, 2000)], mean, rng) * mean
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return plant_copies(x, rng, frac)


def _mean_strength(sample: np.ndarray, mean: np.ndarray, rng: np.random.Generator) -> np.float32:
    """The multiple of `mean` that gives the sample's random pairs a median cosine of MEDIAN_COS."""
    if len(sample) < 2:
        return np.float32(1.0)
    a, b = rng.integers(0, len(sample), (2, 4000))
    a, b = a[a != b], b[a != b]
    lo, hi = 0.0, 100.0
    for _ in range(40):  # the median cosine grows with the strength: bisect
        s = (lo + hi) / 2
        y = sample + np.float32(s) * mean
        y = y / np.linalg.norm(y, axis=1, keepdims=True)
        lo, hi = (s, hi) if np.median(np.einsum("ij,ij->i", y[a], y[b])) < MEDIAN_COS else (lo, s)
    return np.float32((lo + hi) / 2)


def workload(name: str, n: int, d: int = D, seed: int = 0) -> np.ndarray:
    """The rows of workload `name` (one of WORKLOADS)."""
    return planted(n, d, seed=seed) if name == "isotropic" else clip_like(n, d, seed=seed)


def median_cosine(x: np.ndarray, pairs: int = 20000, seed: int = 1) -> float:
    """The median cosine of random pairs of distinct rows (for the table: what the workload is like)."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, len(x), (2, pairs))
    a, b = a[a != b], b[a != b]
    return float(np.median(np.einsum("ij,ij->i", x[a], x[b])))

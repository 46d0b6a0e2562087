"""Helpers shared by several test modules."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from clipdedup.cli import run_cli
from clipdedup.match import exact_distances
from clipdedup.trash import journal as jm


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def tree_hashes(root: Path) -> dict[str, str]:
    """rel path -> sha256 of every file under root; a trash dir's journal and lock dir left out."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            rel = p.relative_to(root).as_posix()
            if not rel.startswith(jm.META_DIR + "/"):
                out[rel] = sha(p)
    return out


def run_cli_json(cmd, args: list[str], capsys) -> dict:
    """Runs a click command in-process with --json -q; returns the parsed summary (exit code 0)."""
    capsys.readouterr()
    code = run_cli(cmd, "test", args + ["--json", "-q"])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


def open_clip_transform(spec):
    """open_clip's own eval transform for a PrepSpec: the reference of our preprocessing."""
    import open_clip

    return open_clip.image_transform(
        spec.size,
        is_train=False,
        mean=spec.mean,
        std=spec.std,
        resize_mode=spec.resize_mode,
        interpolation=spec.interpolation,
        fill_color=spec.fill,
    )


# Matching: planted rows and thresholds at a pair's exact distance (tests/match/).


def planted(n: int, d: int, seed: int, frac: float = 0.2, scale: float = 1.0) -> np.ndarray:
    """Random rows, a fraction of them near-copies of others (noise 0.5%..5% of the norm)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    k = int(n * frac)
    if k and n > 1:
        src, dst = rng.integers(0, n, k), rng.integers(0, n, k)
        noise = rng.standard_normal((k, d)).astype(np.float32)
        noise *= rng.uniform(0.005, 0.05, (k, 1)) * np.sqrt(d) / np.linalg.norm(noise, axis=1, keepdims=True)
        x[dst] = x[src] + noise
    return (x * scale).astype(np.float32)


def all_distances(x, y=None):
    other = x if y is None else y
    i, j = np.meshgrid(np.arange(len(x)), np.arange(len(other)), indexing="ij")
    return exact_distances(x[i.ravel()], other[j.ravel()]).reshape(len(x), len(other))


def threshold_on_a_pair(x, y=None, q=0.05):
    """A threshold equal to one pair's exact reference distance (a pair right at the threshold)."""
    d = all_distances(x, y)
    if y is None:
        d = d[np.triu_indices(len(x), 1)]
    return float(np.quantile(d.ravel(), q, method="lower"))


# Mounts and full disks (tests/trash/, tests/util/).


@contextlib.contextmanager
def mounted_tmpfs(where: Path, options: str = "size=64m") -> Iterator[Path]:
    """A tmpfs mounted at `where` (created) for the block; skips the test where mounting is not
    allowed. A tmpfs is another file system (moves become copies) and a small one fills up."""
    import pytest

    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode(errors='replace').strip()[:200]}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill_up(d: Path) -> None:
    """Fills the file system of `d` to the last byte (a file `d/filler`)."""
    fd = os.open(d / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for size in (1 << 20, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size) == size:
                    pass
    finally:
        os.close(fd)


# Trees of real images for whole runs (tests/test_faults.py, tests/trash/, tests/db/).


def distinct_images(testdata: Path, d: Path, per_source: int) -> list[Path]:
    """`per_source` different crops of each real base image, as JPEGs (all distinct files)."""
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for src in sorted((testdata / "base_images").glob("*.jpg")):
        im = Image.open(src).convert("RGB")
        w, h = im.size
        for k in range(per_source):
            box = (8 * k, 6 * k, w - 5 * k, h - 7 * k)
            p = d / f"{src.stem}_{k}.jpg"
            im.crop(box).resize((320, 240)).save(p, quality=90)
            out.append(p)
    return out


def dup_tree(testdata: Path, img: Path, copies: int) -> None:
    """Groups of byte-identical copies spread over subdirs, so a run has many moves to make."""
    srcs = distinct_images(testdata, img.parent / "src", 2)
    for k in range(copies):
        sub = img / f"dir{k % 3}" / f"copy{k}"
        sub.mkdir(parents=True)
        for s in srcs:
            shutil.copyfile(s, sub / s.name)


def bf16_edge_pairs(d: int, count: int, seed: int):
    """Pairs whose naive bf16 screen (norms minus twice the bf16 Gram, no margin) says "outside the
    threshold" while their exact distance is inside: t is set to the exact distance."""
    import torch

    rng = np.random.default_rng(seed)
    rows, ts = [], []
    while len(rows) < count:
        a = rng.standard_normal(d).astype(np.float32)
        b = (a + 0.02 * rng.standard_normal(d)).astype(np.float32)
        t = float(exact_distances(a[None], b[None])[0])
        ab = torch.from_numpy(np.stack([a, b])).bfloat16()
        g = (ab @ ab.T).double().numpy()
        na, nb = float(a.astype(np.float64) @ a), float(b.astype(np.float64) @ b)
        if na + nb - 2 * g[0, 1] > t * t:
            rows.append((a, b))
            ts.append(t)
    return rows, ts


# Matching backends whose only fault on a CPU without their instructions is speed: a bfloat16
# matmul there is oneDNN's float32 arithmetic on bfloat16 operands, rounded as the screen's bound
# assumes, and cpu-int16 without AVX2 takes the native screen's portable loop (exact integers), so
# small cases still test each one's own logic on every CPU.
SLOW_ONLY = frozenset({"cpu-bf16", "cpu-int16"})


def cpu_backends() -> list[str]:
    """The CPU matching backends (`cpu-*`), best first, available here or not."""
    from clipdedup.match import MATCHERS

    return [n for n in MATCHERS.names() if n.startswith("cpu-")]


def use_backend(monkeypatch, name: str) -> str:
    """`name`, usable for the rest of the calling test: an available backend as it is, one in
    SLOW_ONLY made available (the registry's reason is about speed, not correctness), any other
    unavailable one skips the test with the registry's reason."""
    import pytest

    from clipdedup.match import MATCHERS
    from clipdedup.registry import always

    entry = MATCHERS.entries[name]
    why = entry.unavailable_reason()
    if why is not None:
        if name not in SLOW_ONLY:
            pytest.skip(f"matching backend {name!r} is not available here: {why}")
        monkeypatch.setattr(entry, "why_not", always)
    return name


def usable_cpu_backends(monkeypatch) -> list[str]:
    """The CPU backends that can run in the calling test: the available ones and SLOW_ONLY's."""
    from clipdedup.match import MATCHERS

    ok = [n for n in cpu_backends() if n in SLOW_ONLY or MATCHERS.entries[n].unavailable_reason() is None]
    return [use_backend(monkeypatch, n) for n in ok]


def best_cpu_backend() -> str:
    """The CPU matching backend the registry picks here (the first available `cpu-*` by priority)."""
    from clipdedup.match import MATCHERS

    return next(n for n in cpu_backends() if MATCHERS.entries[n].unavailable_reason() is None)

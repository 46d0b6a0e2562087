"""Reruns: a first run, a rerun after no change and a rerun after 1% new files, each timed from
process start to exit, for `builtin:dct` and a CLIP-shaped model.

Two collections per encoder:

- "images": N real image files made from the repository's test images (random crops, scales,
  tints and JPEG qualities of them, 1 in 20 a re-encode of another: a few true duplicates), run
  end to end: scan, decode + encode, DB, match, act (no trash dir: nothing moves). The CLIP-shaped
  model is the tests' tiny random-weight open_clip model (tests/conftest.py make_tiny_model).
- "fabricated": N rows written straight into the `.npy` mirror (1-byte image files) and run with
  `--skip-update`: builtin:dct-shaped rows (unit screening parts, near copies) or CLIP-shaped
  planted rows (D = 1280, as bench_scale), so that large N cost no decoding.

Per collection: (1) the first run (writes the DB, the snapshot and the match cache); (2) the same
command again, nothing changed; (3) 1% new files (at least one), the same command; (4) the match
cache moved away, a dry run: a full match of the same rows, whose answer (3) must equal and whose
match stage is the denominator of (3)'s ratio. (2)'s answer must equal (1)'s.

Targets (issue 24): (2) at most 1.0 s on 2,000 files and at most 10 s on 300k rows; (3)'s match
stage at most 5% of (4)'s.

    python bench/bench_rerun.py [--quick] [--json PATH] [--sizes 2000] [--rows 300000] [--data DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_scale import pairs_digest  # noqa: E402
from common import REPO, Row, table, testdata_dir, write_json  # noqa: E402

CLI = [sys.executable, "-c", "from clipdedup.cli import dedup_main; dedup_main()"]
DCT = "builtin:dct"
CLIP_THRESHOLD = {"images": 0.05, "fabricated": 0.1}  # the tiny model's rows are not unit scale


def make_images(dest: Path, n: int, seed: int, start: int = 0) -> None:
    """n image files under dest/g<k>/ made from the test images (module docstring)."""
    from PIL import Image, ImageEnhance

    srcs = [p for p in sorted(testdata_dir().rglob("*")) if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    rng = np.random.default_rng(seed)
    made: list[Path] = []
    for i in range(start, start + n):
        sub = dest / f"g{i // 500:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        out = sub / f"i{i:06d}.jpg"
        if made and rng.random() < 0.05:  # a true duplicate: another quality of one made before
            Image.open(made[int(rng.integers(len(made)))]).save(out, quality=int(rng.integers(60, 95)))
            made.append(out)
            continue
        while True:
            try:
                im = Image.open(srcs[int(rng.integers(len(srcs)))]).convert("RGB")
                break
            except OSError:  # the test set holds a corrupt file on purpose
                continue
        w, h = im.size
        fw, fh = rng.uniform(0.3, 0.8, 2)
        x0, y0 = int(rng.uniform(0, 1 - fw) * w), int(rng.uniform(0, 1 - fh) * h)
        im = im.crop((x0, y0, x0 + max(16, int(fw * w)), y0 + max(16, int(fh * h))))
        im = im.resize((int(rng.integers(96, 320)), int(rng.integers(96, 320))))
        im = ImageEnhance.Color(im).enhance(float(rng.uniform(0.3, 1.7)))
        im.save(out, quality=int(rng.integers(60, 95)))
        made.append(out)


def fabricate(root: Path, n: int, encoder: str, start: int = 0) -> tuple[str, str]:
    """n rows of `encoder`'s shape in a DB mirror with 1-byte images, numbered from `start`."""
    from clipdedup import db as dbmod

    img, dbd = root / "img", root / "db"
    if encoder == DCT:
        from clipdedup.ingest.encode.dct import CHECK_DIM, LAYOUT, SCREEN_DIM

        d = SCREEN_DIM + CHECK_DIM
        meta = dbmod.DBMeta(DCT, d, preprocess={"layout": LAYOUT})
    else:
        d, meta = 1280, dbmod.DBMeta("fabricated/random-rows", 1280)
    if start == 0:
        dbmod.write_meta(dbd, meta)
    header = dbmod.npy_bytes(np.zeros(d, np.float32))[: -4 * d]
    mtime = 1_600_000_000_000_000_000
    for s in range(start, start + n, 4096):
        x = _rows(min(4096, start + n - s), d, encoder, seed=s)
        for k in range(len(x)):
            i = s + k
            rel = f"{i // 1000:05d}/{i:08d}.jpg"
            for top in (img, dbd):
                os.makedirs(top / rel.split("/")[0], exist_ok=True)
            p = img / rel
            p.write_bytes(b"\xff")
            os.utime(p, ns=(mtime, mtime))
            q = dbmod.npy_path(dbd, rel)
            with open(q, "wb") as f:
                f.write(header + x[k].tobytes())
            os.utime(q, ns=(mtime, mtime))
    return str(img), str(dbd)


def _rows(n: int, d: int, encoder: str, seed: int) -> np.ndarray:
    if encoder != DCT:
        from bench_match import planted

        return planted(n, d, seed=seed)
    from clipdedup.ingest.encode.dct import SCREEN_DIM

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    for i in range(1, n, 20):  # near copies: candidates, some of them confirmed
        x[i] = x[i - 1] + rng.uniform(0.01, 0.3) * rng.standard_normal(d)
    x[:, :SCREEN_DIM] /= np.linalg.norm(x[:, :SCREEN_DIM], axis=1, keepdims=True)
    return x


def measure(root: Path, kind: str, encoder: str, n: int, model: str, log=print) -> list[Row]:
    """Steps (1)-(4) of the module docstring on one collection; one Row per step."""
    from clipdedup.match.cache.matches import cache_path

    d = root / f"{kind}-{'dct' if encoder == DCT else 'clip'}-{n}"
    shutil.rmtree(d, ignore_errors=True)
    th = [] if encoder == DCT else ["-th", str(CLIP_THRESHOLD[kind])]
    if kind == "images":
        img, db = str(d / "img"), str(d / "db")
        make_images(Path(img), n, seed=n)
        cmd = [*CLI, "-i", img, "-d", db, "-m", model, "-q", "--json", *th]
    else:
        img, db = fabricate(d, n, encoder)
        cmd = [*CLI, "-i", img, "-d", db, "--skip-update", "-q", "--json", *th]
    label = f"{kind}, {'dct' if encoder == DCT else 'CLIP-shaped'}"
    settle = lambda: time.sleep(2.1)  # noqa: E731  files within the snapshot's racy window are read again
    settle()
    first, t_first, c_first = _child(cmd)
    settle()
    same, t_same, c_same = _child(cmd)
    new = max(1, n // 100)
    if kind == "images":
        make_images(Path(img) / "new", new, seed=n + 1, start=n)
    else:
        add = d / "add"
        fabricate(add, new, encoder, start=n)
        for sub in ("img", "db"):
            for part in os.listdir(add / sub):
                if part != "clipdedup-db.json":
                    os.replace(add / sub / part, Path(img if sub == "img" else db) / f"new-{part}")
    settle()
    after, t_after, c_after = _child(cmd)
    os.replace(cache_path(db), cache_path(db) + ".away")
    full, t_full, _ = _child([*cmd, "--skip-update", "-n"] if kind == "images" else [*cmd, "-n"])
    os.replace(cache_path(db) + ".away", cache_path(db))
    ratio = after["seconds"]["match"] / max(full["seconds"]["match"], 1e-9)
    log(
        f"   {label} n={n}: first {t_first:.2f}s (cpu {c_first:.2f}s), "
        f"no change {t_same:.2f}s (cpu {c_same:.2f}s), "
        f"+{new} new {t_after:.2f}s (cpu {c_after:.2f}s) "
        f"(match {after['seconds']['match']:.3f}s = {100 * ratio:.1f}% of a full match's "
        f"{full['seconds']['match']:.2f}s)"
    )
    ok_same = pairs_digest(same) == pairs_digest(first)
    ok_after = pairs_digest(after) == pairs_digest(full)
    secs = {k: round(v, 3) for k, v in same["seconds"].items()}
    return [
        Row(
            "rerun",
            f"{label}: first run",
            n,
            t_first,
            n / t_first,
            "files/s",
            True,
            extra={"pairs": first["pairs"], "cpu_s": c_first},
        ),
        Row(
            "rerun",
            f"{label}: no-change rerun",
            n,
            t_same,
            n / t_same,
            "files/s",
            ok_same,
            extra={"seconds": secs, "cpu_s": c_same},
        ),
        Row(
            "rerun",
            f"{label}: rerun after 1% new",
            n + new,
            t_after,
            (n + new) / t_after,
            "files/s",
            ok_after,
            extra={
                "match_s": after["seconds"]["match"],
                "full_match_s": full["seconds"]["match"],
                "ratio": ratio,
                "cpu_s": c_after,
            },
        ),
    ]


def _child(cmd: list[str]) -> tuple[dict, float, float]:
    """Runs cmd; returns (its JSON stdout, wall seconds, CPU seconds (user + system) of that child):
    on a shared machine the CPU time is the steadier of the two."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "python"), HERE]))
    t = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL, env=env)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t
        out.seek(0)
        text = out.read().decode()
    if os.waitstatus_to_exitcode(status) not in (0, 1):
        raise RuntimeError(f"{' '.join(cmd[:4])} ...: exit {os.waitstatus_to_exitcode(status)}")
    return json.loads(text), wall, usage.ru_utime + usage.ru_stime


def tiny_model(root: Path) -> str:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_tiny_model

    return "local-dir:" + str(make_tiny_model(root / "tiny_model"))


def run(
    quick: bool = True,
    sizes: list[int] | None = None,
    rows: list[int] | None = None,
    data: str | None = None,
    encoders: tuple[str, ...] = ("dct", "clip"),
) -> list[Row]:
    sizes = sizes or ([50] if quick else [2000])
    rows = rows or ([1000] if quick else [300_000])
    root = Path(data) if data else Path(tempfile.mkdtemp(prefix="bench-rerun-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        model = tiny_model(root)
        out: list[Row] = []
        for encoder in [e for e, name in ((DCT, "dct"), (model, "clip")) if name in encoders]:
            for n in sizes:
                out += measure(root, "images", encoder, n, model if encoder != DCT else DCT)
            for n in rows:
                out += measure(root, "fabricated", encoder if encoder == DCT else "clip", n, "")
        return out
    finally:
        if not data:
            shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--sizes", default=None, help="image files per images collection, comma-separated")
    ap.add_argument("--rows", default=None, help="rows per fabricated collection, comma-separated")
    ap.add_argument("--data", default=None, help="keep the collections here (default: a temp dir)")
    ap.add_argument("--encoders", default="dct,clip", help="dct, clip or both (comma-separated)")
    a = ap.parse_args()
    parse = lambda s: [int(v) for v in s.split(",")] if s else None  # noqa: E731
    rows = run(a.quick, parse(a.sizes), parse(a.rows), a.data, tuple(a.encoders.split(",")))
    print(table(rows))
    if a.json:
        write_json(rows, a.json)


if __name__ == "__main__":
    main()

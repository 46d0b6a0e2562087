"""builtin:dct quality: pair precision and recall against ground truth, beside imagededup's PHash.

Two sets:
- testdata: ../shared/testdata/imagededup with its strict groups (flips and rotations are not
  duplicates; byte-identical copies always are).
- generated: real photos (the test data's distinct images, scikit-image's sample photos and
  matplotlib's, where installed) each turned into a group of duplicates: resize 50% and 25%, JPEG
  quality 35..60, PNG, WebP, 2% and 5% border crops, +-10% brightness and contrast, small text in a
  corner. Hard negatives beside each group: its horizontal flip and its central 50% crop.

builtin:dct runs through the real pipeline (`update_db` dry run, `find_pairs`) at its default
threshold; PHash is imagededup's (`pip install imagededup`, default max_distance_threshold=10).
`--sweep` prints precision/recall over thresholds on the tuning half of the generated set (the even
sources), which is where the default was chosen; the odd half is the held-out check.

    python bench/bench_dct_quality.py [--quick] [--json out.json] [--sweep]
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Row, main, testdata_dir  # noqa: E402

TESTDATA = testdata_dir()
SET_DIR = Path("/tmp/clipdedup-bench-dct-set")
SET_VERSION = 1
DUPLICATES = (
    "resize50 resize25 jpeg35 jpeg60 png webp crop2 crop5 bright+10 bright-10 contrast+10 contrast-10 text"
).split()
NOT_DUPLICATES = ["hflip", "center50"]


def real_sources() -> list[Path]:
    """Distinct real images: the test data's, then scikit-image's and matplotlib's sample photos."""
    src = sorted((TESTDATA / "base_images").glob("*.jpg"))
    src += [TESTDATA / "formats_images" / n for n in ("Iggy.1024.ppm", "baboon.pgm", "giphy.gif")]
    try:
        import skimage

        d = Path(skimage.__file__).parent / "data"
        # Photos only: no synthetic or symmetric test patterns (their flips are identical), and one
        # image of the motorcycle stereo pair (the two views are near-duplicates of each other).
        names = "astronaut brick camera cell chelsea coffee coins grass gravel hubble_deep_field ihc moon"
        names += " motorcycle_left page retina rocket text"
        src += [next(d.glob(f"{n}.*")) for n in names.split()]
    except ImportError:
        print("scikit-image not installed: generated set from the test data only", file=sys.stderr)
    try:
        import matplotlib

        p = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        if p.exists():
            src.append(p)
    except ImportError:
        pass
    return [p for p in src if p.exists()]


def _text(im: Image.Image, rng: random.Random, corner: tuple[float, float]) -> Image.Image:
    im = im.copy()
    d = ImageDraw.Draw(im)
    size = max(8, im.height // 25)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    xy = (im.width * corner[0], im.height * corner[1])
    d.text(xy, f"(c) photo {rng.randint(10, 99)}", fill=(255, 255, 255), font=font)
    return im


def _crop(im: Image.Image, frac: float) -> Image.Image:
    dx, dy = round(im.width * frac), round(im.height * frac)
    return im.crop((dx, dy, im.width - dx, im.height - dy))


# Transform strengths: "main" is the set the default threshold was tuned on (its even sources);
# "alt" uses other strengths inside the same ranges, as a check the tuning did not fit them.
PARAMS = {
    "main": {"scales": (2, 4), "q": (35, 60), "crop": (0.02, 0.05), "bc": 0.10, "corner": (0.7, 0.92)},
    "alt": {"scales": (3, 2), "q": (40, 50), "crop": (0.03, 0.04), "bc": 0.08, "corner": (0.03, 0.03)},
}


def _variant(im: Image.Image, name: str, rng: random.Random, p: dict) -> tuple[Image.Image, str, dict]:
    """(image, file suffix, save options) of one transform."""
    w, h = im.size
    q90 = {"quality": 90}
    s1, s2 = p["scales"]
    up, down = 1 + p["bc"], 1 - p["bc"]
    return {
        "resize50": lambda: (im.resize((w // s1, h // s1), Image.Resampling.LANCZOS), ".jpg", q90),
        "resize25": lambda: (im.resize((w // s2, h // s2), Image.Resampling.BICUBIC), ".jpg", q90),
        "jpeg35": lambda: (im, ".jpg", {"quality": p["q"][0]}),
        "jpeg60": lambda: (im, ".jpg", {"quality": rng.randint(*p["q"])}),
        "png": lambda: (im, ".png", {}),
        "webp": lambda: (im, ".webp", {"quality": 80}),
        "crop2": lambda: (_crop(im, p["crop"][0]), ".jpg", q90),
        "crop5": lambda: (_crop(im, p["crop"][1]), ".jpg", q90),
        "bright+10": lambda: (ImageEnhance.Brightness(im).enhance(up), ".jpg", q90),
        "bright-10": lambda: (ImageEnhance.Brightness(im).enhance(down), ".jpg", q90),
        "contrast+10": lambda: (ImageEnhance.Contrast(im).enhance(up), ".jpg", q90),
        "contrast-10": lambda: (ImageEnhance.Contrast(im).enhance(down), ".jpg", q90),
        "text": lambda: (_text(im, rng, p["corner"]), ".jpg", q90),
        "hflip": lambda: (ImageOps.mirror(im), ".jpg", q90),
        "center50": lambda: (im.crop((w // 4, h // 4, w - w // 4, h - h // 4)), ".jpg", q90),
    }[name]()


def set_dir(quick: bool, params: str) -> Path:
    return SET_DIR.with_name(f"{SET_DIR.name}-{params}" + ("-quick" if quick else ""))


def build_set(quick: bool = False, params: str = "main") -> tuple[Path, dict]:
    """Writes the generated set (once; reused while its manifest matches).

    Returns:
        (root, manifest): manifest {"groups": [[rel, ...], ...], "negatives": [rel, ...]}.
    """
    root = set_dir(quick, params)
    sources = real_sources()[: 8 if quick else None]
    key = {"version": SET_VERSION, "params": PARAMS[params], "sources": [str(p) for p in sources]}
    mf = root / "manifest.json"
    if mf.exists():
        m = json.loads(mf.read_text())
        if m.get("key") == key:
            return root, m
        shutil.rmtree(root)
    root.mkdir(parents=True)
    groups, negatives = [], []
    for k, src in enumerate(sources):
        rng = random.Random(k)
        with Image.open(src) as im:
            im = im.convert("RGB")
        if max(im.size) > 1024:
            im.thumbnail((1024, 1024), Image.Resampling.LANCZOS)
        base = f"s{k:02d}"
        group = [f"{base}/orig.jpg"]
        (root / base).mkdir()
        im.save(root / group[0], quality=92)
        for name in DUPLICATES + NOT_DUPLICATES:
            v, suffix, opts = _variant(im, name, rng, PARAMS[params])
            rel = f"{base}/{name}{suffix}"
            v.save(root / rel, **opts)
            (group if name in DUPLICATES else negatives).append(rel)
        groups.append(group)
    m = {"key": key, "groups": groups, "negatives": negatives}
    mf.write_text(json.dumps(m, indent=1))
    return root, m


def testdata_truth() -> tuple[list[str], set[tuple[str, str]]]:
    """(readable files, true pairs) of the dev set: strict groups plus byte-identical copies."""
    gt = json.loads((TESTDATA / "ground_truth.json").read_text())
    bad = {b["path"] for b in gt["bad_files"]}
    files = [f for f in gt["images"] if f not in bad]
    truth = {tuple(sorted((a, b))) for g in gt["duplicate_groups_strict"] for a in g for b in g if a < b}
    data = {f: (TESTDATA / f).read_bytes() for f in files}
    truth |= {(a, b) for a in files for b in files if a < b and data[a] == data[b]}
    return files, truth  # type: ignore[return-value]


def set_truth(m: dict, keep=lambda k: True) -> tuple[list[str], set[tuple[str, str]]]:
    files, truth = [], set()
    for k, g in enumerate(m["groups"]):
        if keep(k):
            files += g
            truth |= {(a, b) for a in g for b in g if a < b}
    files += [n for n in m["negatives"] if keep(int(n[1:3]))]
    return files, truth


def score(pairs: set[tuple[str, str]], truth: set[tuple[str, str]]) -> tuple[float, float]:
    tp = len(pairs & truth)
    return (tp / len(pairs) if pairs else 1.0), (tp / len(truth) if truth else 1.0)


def dct_distances(root: Path, files: list[str]) -> tuple[np.ndarray, float]:
    """Pairwise distances of builtin:dct embeddings from the real update path (dry run)."""
    from clipdedup.ingest.update import update_db

    t = time.perf_counter()
    s = update_db(root, root / ".no-db", "builtin:dct", dry_run=True, log=lambda line: None)
    dt = time.perf_counter() - t
    x = np.stack([s.in_memory[f] for f in files]).astype(np.float64)
    d = np.sqrt(np.maximum(((x[:, None] - x[None]) ** 2).sum(-1), 0))
    return d, dt


def pairs_below(files: list[str], d: np.ndarray, thr: float) -> set[tuple[str, str]]:
    i, j = np.nonzero(np.triu(d <= thr, 1))
    return {tuple(sorted((files[a], files[b]))) for a, b in zip(i, j)}  # type: ignore[misc]


def dct_pairs(root: Path, files: list[str]) -> tuple[set[tuple[str, str]], float, float]:
    """(pairs at the default threshold via `find_pairs`, seconds, threshold)."""
    import clipdedup
    from clipdedup.ingest.update import update_db

    thr = clipdedup.default_threshold("builtin:dct")
    t = time.perf_counter()
    s = update_db(root, root / ".no-db", "builtin:dct", dry_run=True, log=lambda line: None)
    x = np.stack([s.in_memory[f] for f in files])
    pairs, _ = clipdedup.find_pairs(x, thr)
    dt = time.perf_counter() - t
    return {tuple(sorted((files[a], files[b]))) for a, b in np.asarray(pairs)}, dt, thr  # type: ignore[misc]


def phash_pairs(root: Path, files: list[str]) -> tuple[set[tuple[str, str]], float]:
    import logging

    from imagededup.methods import PHash

    logging.disable(logging.INFO)  # imagededup logs every search at INFO on the root logger
    ph = PHash(verbose=False)
    t = time.perf_counter()
    enc = {f: ph.encode_image(image_file=str(root / f)) for f in files}
    enc = {f: h for f, h in enc.items() if h}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "num_enc_workers has no effect"
        dup = ph.find_duplicates(encoding_map=enc, max_distance_threshold=10)
    dt = time.perf_counter() - t
    return {tuple(sorted((a, b))) for a, bs in dup.items() for b in bs}, dt  # type: ignore[misc]


def _rows(label: str, root: Path, files: list[str], truth: set) -> list[Row]:
    rows = []
    pairs, dt, thr = dct_pairs(root, files)
    p, r = score(pairs, truth)
    rows.append(
        Row(
            "dct-q",
            f"builtin:dct th={thr:g} on {label}",
            len(files),
            dt,
            len(files) / dt,
            "img/s",
            extra={"precision": p, "recall": r, "pairs": len(pairs), "true_pairs": len(truth)},
        )
    )
    try:
        ppairs, pdt = phash_pairs(root, files)
        pp, pr = score(ppairs, truth)
        rows.append(
            Row(
                "dct-q",
                f"imagededup PHash d<=10 on {label}",
                len(files),
                pdt,
                len(files) / pdt,
                "img/s",
                extra={"precision": pp, "recall": pr, "pairs": len(ppairs), "true_pairs": len(truth)},
            )
        )
    except ImportError:
        print("imagededup not installed: no PHash rows (pip install imagededup)", file=sys.stderr)
    return rows


def sweep(root: Path, m: dict) -> None:
    files, truth = set_truth(m, keep=lambda k: k % 2 == 0)
    d, _ = dct_distances(root, files)
    print(f"tuning half: {len(files)} files, {len(truth)} true pairs")
    for thr in np.arange(0.20, 0.66, 0.02):
        p, r = score(pairs_below(files, d, thr), truth)
        print(f"  th={thr:.2f}  precision {p:.4f}  recall {r:.4f}")


def run(quick: bool) -> list[Row]:
    rows = []
    if TESTDATA.is_dir():
        files, truth = testdata_truth()
        dct_pairs(TESTDATA, files)  # warm-up: imports, so the first row's time is the encoder's
        rows += _rows("testdata (strict)", TESTDATA, files, truth)
    root, m = build_set(quick)
    files, truth = set_truth(m)
    rows += _rows(f"generated ({len(m['groups'])} sources)", root, files, truth)
    if not quick:
        files, truth = set_truth(m, keep=lambda k: k % 2 == 1)
        rows += _rows("generated, odd sources", root, files, truth)
        root, m = build_set(quick, "alt")
        files, truth = set_truth(m)
        rows += _rows("generated, alt strengths", root, files, truth)
    print(quality_table(rows))
    return rows


def quality_table(rows: list[Row]) -> str:
    head = f"{'method':<52} {'files':>6} {'precision':>10} {'recall':>8} {'pairs':>7} {'true':>6}"
    out = [head, "-" * len(head)]
    for r in rows:
        e = r.extra
        p, rc = e["precision"], e["recall"]
        out.append(f"{r.impl[:52]:<52} {r.n:>6} {p:>10.4f} {rc:>8.4f} {e['pairs']:>7} {e['true_pairs']:>6}")
    return "\n".join(out)


if __name__ == "__main__":
    if "--sweep" in sys.argv:
        sweep(*build_set())
    else:
        main(run, __doc__.splitlines()[0])

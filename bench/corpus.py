"""A tuning corpus of real images for model-free matching: sources from Debian packages, planted
duplicates and hard negatives, split into a tuning half and a hold-out half by series.

Sources: raster images (PNG/JPEG, shorter side >= 128 px) from the Debian packages in PACKAGES,
fetched with `apt-get download` and unpacked with `dpkg-deb -x` (nothing is installed), at most
`cap` per package, picked by a seeded shuffle. Transparent images are flattened onto mid grey;
larger images are shrunk to 768 px on the longer side. The packages reserved for an independent
evaluation (RESERVED) are refused.

Sources are checked against each other before they count as distinct, with a plain pixel measure
(`CopyIndex`): 32 x 32 RGB thumbnails, each scaled to zero mean and unit spread (blind to brightness
and contrast), whose RMS difference is below NEAR with aspect ratios within a factor e^0.3, are one
picture; so are two nearly flat images of about one colour. NEAR = 0.4 is about the 85th percentile
of that distance between a planted duplicate and its source: a pair of "distinct" sources closer
than that is as alike as the duplicates a matcher must find at recall 0.95 (the same icon at several
sizes, a game's low-resolution copy of its splash screen, consecutive animation frames, one photo
under mild filters), and no threshold could separate it. The first of such a group is kept. This
measure is a pixel comparison like builtin:dct's check (clipdedup.match.verify.verifier), so the corpus says
nothing about pairs closer than NEAR; docs/benchmarks.md reports how many sources it dropped.

Per source, `DUPS_PER_SOURCE` duplicate kinds are drawn from DUPLICATE_KINDS (recompression,
resize down to 25%, crops up to 5% per side, +-10% brightness or contrast, small overlaid text,
format changes, screenshot-like rescale + recompress). Every third source also gets the hard
negatives NEGATIVE_KINDS (mirror image, central 50% crop), unless that negative is flat or is one
picture with any source or earlier negative by the same measure (a symmetric sprite's mirror image,
a stamp shipped mirrored as its own file, the flat centres of two dark wallpapers). Sources whose
names differ only in digits in one directory form a series ("planet/gas7", "planet/gas8"):
distinct shots of one subject, kept in one half, their pairs counted as hard negatives.

Everything is seeded: the same packages give the same corpus, byte for byte, on every run.
The corpus lives outside the repository (CLIPDEDUP_BENCH_CACHE, default
~/.cache/clipdedup-bench) and is rebuilt only when its key (version, packages, parameters) changes.

    python bench/corpus.py [--root DIR]     # fetch, build, print a summary
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

VERSION = 3
SEED = 13
RESERVED = {
    "mate-backgrounds",
    "lomiri-wallpapers",
    "lomiri-wallpapers-16.04",
    "lomiri-wallpapers-20.04",
    "ukui-wallpapers",
    "plasma-workspace-wallpapers",
    "gnome-backgrounds",
    "wesnoth-1.16-data",
    "stellarium-data",
}
# Debian package -> the most sources taken from it: photos and paintings (desktop-base, krita's
# brushes and patterns), game art (planets, ships, portraits, scenery, textures), screenshots of
# dialogs (gimp-help-en) and clip-art stamps.
PACKAGES = {
    "desktop-base": 100,
    "endless-sky-data": 450,
    "extremetuxracer-data": 250,
    "flare-game": 300,
    "freeorion-data": 450,
    "gimp-help-en": 450,
    "hedgewars-data": 350,
    "krita-data": 200,
    "naev-data": 450,
    "neverball-data": 200,
    "tuxpaint-stamps-default": 450,
}
MIN_SIDE = 128
MAX_SIDE = 768
NEAR = 0.4  # normalised thumbnails closer than this (RMS, in standard deviations) are one picture
FLAT = 4.0  # grey levels: an image with less spread than this is flat (same colour: within 2 FLAT)
ASPECT = 0.3  # |log| of the aspect ratios' quotient within which two pictures can be one
DUPS_PER_SOURCE = 3
NEGATIVE_EVERY = 3
DUPLICATE_KINDS = ("jpeg", "resize", "crop", "bright", "contrast", "text", "format", "screenshot")
NEGATIVE_KINDS = ("hflip", "center50")
RASTER = (".png", ".jpg", ".jpeg")


def cache_root() -> Path:
    return Path(os.environ.get("CLIPDEDUP_BENCH_CACHE", Path.home() / ".cache" / "clipdedup-bench"))


def fetch(pkg: str, root: Path) -> Path:
    """`apt-get download` + `dpkg-deb -x` of one package into root/pkgs/<pkg> (once)."""
    if pkg in RESERVED:
        raise SystemExit(f"{pkg}: reserved for an independent evaluation; not used for tuning")
    out = root / "pkgs" / pkg
    if (out / ".done").exists():
        return out
    debs = root / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    if not list(debs.glob(f"{pkg}_*.deb")):
        subprocess.run(["apt-get", "download", pkg], cwd=debs, check=True, capture_output=True)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    subprocess.run(["dpkg-deb", "-x", str(next(debs.glob(f"{pkg}_*.deb"))), str(out)], check=True)
    (out / ".done").write_text("")
    return out


def candidates(pkg_dir: Path, cap: int, seed: int) -> list[Path]:
    """Up to `cap` raster images of one package with shorter side >= MIN_SIDE, seeded order."""
    files = sorted(p for p in pkg_dir.rglob("*") if p.suffix.lower() in RASTER and p.is_file())
    random.Random(seed).shuffle(files)
    out = []
    for p in files:
        try:
            with Image.open(p) as im:
                if min(im.size) >= MIN_SIDE:
                    out.append(p)
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
        if len(out) >= cap:
            break
    return out


def flatten(path: Path) -> Image.Image:
    """RGB image, transparency composited onto mid grey, longer side <= MAX_SIDE."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (128, 128, 128, 255))
            im = Image.alpha_composite(bg, rgba)
        im = im.convert("RGB")
    if max(im.size) > MAX_SIDE:
        im.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    return im


def thumb(im: Image.Image) -> tuple[np.ndarray, float]:
    """(32*32*3,) float64 RGB thumbnail (aspect not kept) scaled to zero mean and unit standard
    deviation over all its values, which makes it blind to brightness and contrast changes; and
    that standard deviation in grey levels (a flat image has ~0)."""
    x = np.asarray(im.convert("RGB").resize((32, 32), Image.Resampling.BOX), np.float64).ravel()
    sd = float(x.std())
    return (x - x.mean()) / max(sd, 1e-6), sd


class CopyIndex:
    """The pixel measure of "the same picture" used to keep the corpus honest: RMS difference of two
    normalised thumbnails below NEAR (in standard deviations) with |log| of the aspect ratios'
    quotient below ASPECT, or both nearly flat (sd below FLAT grey levels) with mean colours
    within 2 FLAT."""

    def __init__(self, capacity: int) -> None:
        self.t = np.zeros((capacity, 32 * 32 * 3))
        self.aspect = np.zeros(capacity)
        self.flat = np.zeros((capacity, 3))  # mean colour of a flat image, NaN otherwise
        self.n = 0

    def near(self, th: tuple[np.ndarray, float], aspect: float, mean: np.ndarray) -> bool:
        t, sd = th
        n = self.n
        if sd < FLAT:
            return bool(np.any(np.abs(self.flat[:n] - mean).max(axis=1) < 2 * FLAT))
        d2 = 2.0 - 2.0 * (self.t[:n] @ t) / len(t)  # mean squared difference of unit-spread rows
        return bool(np.any((d2 < NEAR**2) & (np.abs(np.log(self.aspect[:n] / aspect)) < ASPECT)))

    def add(self, th: tuple[np.ndarray, float], aspect: float, mean: np.ndarray) -> None:
        self.t[self.n], self.aspect[self.n] = th[0], aspect
        self.flat[self.n] = mean if th[1] < FLAT else np.nan
        self.n += 1


def series_key(rel: str) -> str:
    """Names that differ only in digits (and separators) in one directory: one series."""
    d, name = os.path.split(rel)
    stem = re.sub(r"[\d_\-. ]+", "", os.path.splitext(name)[0].lower())
    return f"{d}/{stem}"


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _jpeg(im: Image.Image, q: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=q)
    return buf.getvalue()


def duplicate(im: Image.Image, kind: str, rng: random.Random) -> tuple[bytes, str]:
    """(encoded bytes, suffix) of one planted duplicate of `im`."""
    w, h = im.size
    if kind == "jpeg":
        return _jpeg(im, rng.randint(30, 70)), ".jpg"
    if kind == "resize":
        f = rng.uniform(0.25, 0.6)
        filt = rng.choice([Image.Resampling.LANCZOS, Image.Resampling.BICUBIC, Image.Resampling.BILINEAR])
        return _jpeg(im.resize((max(8, round(w * f)), max(8, round(h * f))), filt), 88), ".jpg"
    if kind == "crop":
        # Up to 5% of the width and of the height cut away, split at random between the two sides.
        fx, fy = rng.uniform(0.01, 0.05), rng.uniform(0.01, 0.05)
        lx, ty = rng.uniform(0, fx), rng.uniform(0, fy)
        box = (round(w * lx), round(h * ty), w - round(w * (fx - lx)), h - round(h * (fy - ty)))
        return _jpeg(im.crop(box), 90), ".jpg"
    if kind in ("bright", "contrast"):
        f = 1 + rng.choice([-1, 1]) * rng.uniform(0.05, 0.10)
        enh = ImageEnhance.Brightness(im) if kind == "bright" else ImageEnhance.Contrast(im)
        return _jpeg(enh.enhance(f), 90), ".jpg"
    if kind == "text":
        out = im.copy()
        d = ImageDraw.Draw(out)
        size = max(8, h // 25)
        xy = (w * rng.uniform(0.02, 0.6), h * rng.choice([rng.uniform(0.02, 0.08), rng.uniform(0.88, 0.93)]))
        d.text(
            xy, f"(c) {rng.randint(1990, 2030)} photo", fill=rng.choice(["white", "black"]), font=_font(size)
        )
        return _jpeg(out, 90), ".jpg"
    if kind == "format":
        fmt = rng.choice(["PNG", "WEBP", "GIF", "BMP"])
        buf = io.BytesIO()
        im.save(buf, fmt, **({"quality": 80} if fmt == "WEBP" else {}))
        return buf.getvalue(), "." + fmt.lower()
    if kind == "screenshot":
        f = rng.uniform(0.5, 0.95)
        small = im.resize((max(8, round(w * f)), max(8, round(h * f))), Image.Resampling.BILINEAR)
        return _jpeg(small, rng.randint(70, 90)), ".jpg"
    raise ValueError(kind)


def negative(im: Image.Image, kind: str) -> Image.Image:
    w, h = im.size
    if kind == "hflip":
        return ImageOps.mirror(im)
    if kind == "center50":
        return im.crop((w // 4, h // 4, w - w // 4, h - h // 4))
    raise ValueError(kind)


@dataclass
class Source:
    sid: str  # "s0042"
    pkg: str
    rel: str  # path inside the package
    series: str
    split: str = ""
    negatives: list[str] = field(default_factory=list)  # hard negative kinds to make


Thumbs = tuple[tuple[np.ndarray, float], tuple[np.ndarray, float], tuple[np.ndarray, float]]


def _load(arg: tuple[int, str, str]) -> tuple[int, bytes | None, Thumbs | None, float, np.ndarray]:
    """A candidate's pixel digest and the thumbnails of itself, its mirror image and centre crop."""
    k, pkg_dir, rel = arg
    try:
        im = flatten(Path(pkg_dir) / rel)
    except (OSError, ValueError, Image.DecompressionBombError):
        return k, None, None, 0.0, np.zeros(3)
    ths = (thumb(im), thumb(negative(im, "hflip")), thumb(negative(im, "center50")))
    mean = np.asarray(im.resize((32, 32), Image.Resampling.BOX), np.float64).reshape(-1, 3).mean(0)
    return k, hashlib.sha256(im.tobytes()).digest(), ths, im.width / im.height, mean


def pick_sources(root: Path) -> tuple[list[Source], int]:
    """Every package's candidates, copies dropped (the first kept), and which hard negatives each
    kept source may have. Returns (sources, dropped)."""
    todo = []
    for pkg, cap in PACKAGES.items():
        d = fetch(pkg, root)
        seed = int(hashlib.sha256(f"{SEED}:{pkg}".encode()).hexdigest()[:8], 16)
        todo += [(pkg, str(d), str(p.relative_to(d))) for p in candidates(d, cap, seed)]
    memo = (
        root / "thumbs.pkl"
    )  # the slow part (same for every VERSION), kept while the candidates are the same
    loaded = None
    if memo.exists():
        with open(memo, "rb") as f:
            was, loaded = pickle.load(f)
        loaded = loaded if was == todo else None
    if loaded is None:
        with ProcessPoolExecutor(2) as ex:
            loaded = sorted(ex.map(_load, [(k, d, rel) for k, (_, d, rel) in enumerate(todo)], chunksize=16))
        with open(memo, "wb") as f:
            pickle.dump((todo, loaded), f)
    index = CopyIndex(3 * len(loaded))  # sources and their negatives
    kept: list[tuple[int, Thumbs, float, np.ndarray]] = []
    seen: set[bytes] = set()
    for k, digest, ths, ar, mean in loaded:
        if digest is None or ths is None or digest in seen or index.near(ths[0], ar, mean):
            continue
        seen.add(digest)
        index.add(ths[0], ar, mean)
        kept.append((k, ths, ar, mean))
    # A hard negative must be distinct from every source and every other negative: a mirrored
    # sprite shipped as its own file, or the flat centres of two dark wallpapers, are not negatives.
    out = []
    for n, (k, ths, ar, mean) in enumerate(kept):
        pkg, _, rel = todo[k]
        negs = []
        if n % NEGATIVE_EVERY == 0:
            for kind, th, a in (("hflip", ths[1], ar), ("center50", ths[2], ar)):
                if th[1] >= FLAT and not index.near(th, a, mean):
                    index.add(th, a, mean)
                    negs.append(kind)
        out.append(Source(f"s{n:04d}", pkg, rel, f"{pkg}:{series_key(rel)}", negatives=negs))
    return out, len(todo) - len(kept)


def split(sources: list[Source]) -> None:
    """Tuning / hold-out halves by series (a series never straddles the halves), seeded."""
    keys = sorted({s.series for s in sources})
    random.Random(SEED).shuffle(keys)
    half = {k: ("tune" if i % 2 == 0 else "holdout") for i, k in enumerate(keys)}
    for s in sources:
        s.split = half[s.series]


def _write(arg: tuple[str, str, str, str, list[str]]) -> dict:
    """Writes one source's files; returns its manifest entry."""
    sid, pkg_dir, rel, out_dir, neg_kinds = arg
    rng = random.Random(f"{SEED}:{sid}")
    im = flatten(Path(pkg_dir) / rel)
    out = Path(out_dir) / sid
    out.mkdir(parents=True, exist_ok=True)
    files = {"orig": f"{sid}/orig.jpg"}
    (out / "orig.jpg").write_bytes(_jpeg(im, 95))
    for kind in rng.sample(DUPLICATE_KINDS, DUPS_PER_SOURCE):
        data, suffix = duplicate(im, kind, rng)
        files[kind] = f"{sid}/{kind}{suffix}"
        (out / f"{kind}{suffix}").write_bytes(data)
    negatives = {}
    for kind in neg_kinds:
        negatives[kind] = f"{sid}/neg-{kind}.jpg"
        (out / f"neg-{kind}.jpg").write_bytes(_jpeg(negative(im, kind), 90))
    return {"duplicates": files, "negatives": negatives}


def _key() -> dict:
    return {
        "version": VERSION,
        "seed": SEED,
        "packages": PACKAGES,
        "sizes": [MIN_SIDE, MAX_SIDE],
        "near": [NEAR, FLAT, ASPECT],
        "dups": [DUPS_PER_SOURCE, list(DUPLICATE_KINDS)],
        "negatives": [NEGATIVE_EVERY, list(NEGATIVE_KINDS)],
    }


def cached(root: Path | None = None) -> tuple[Path, dict] | None:
    """The corpus if it is built and current, without building it."""
    mf = (root or cache_root()) / "corpus" / "manifest.json"
    if mf.exists():
        m = json.loads(mf.read_text())
        if m.get("key") == _key():
            return mf.parent, m
    return None


def build(root: Path | None = None) -> tuple[Path, dict]:
    """Builds the corpus once (reused while its key matches). Returns (image root, manifest).

    The manifest: {"key": ..., "sources": [{"sid", "pkg", "rel", "series", "split",
    "duplicates": {kind: file}, "negatives": {kind: file}}, ...], "dropped_near_copies": int}.
    Files are relative to the image root; "duplicates" includes the original ("orig").
    """
    root = root or cache_root()
    have = cached(root)
    if have is not None:
        return have
    img_root, key = root / "corpus", _key()
    sources, dropped = pick_sources(root)
    split(sources)
    shutil.rmtree(img_root, ignore_errors=True)
    img_root.mkdir(parents=True)
    args = [(s.sid, str(root / "pkgs" / s.pkg), s.rel, str(img_root), s.negatives) for s in sources]
    with ProcessPoolExecutor(2) as ex:
        entries = list(ex.map(_write, args, chunksize=8))
    m = {
        "key": key,
        "dropped_near_copies": dropped,
        "sources": [{**asdict(s), **e} for s, e in zip(sources, entries)],
    }
    (img_root / "manifest.json").write_text(json.dumps(m, indent=0))
    return img_root, m


def summary(m: dict) -> str:
    src = m["sources"]
    lines = [f"{len(src)} distinct sources ({m['dropped_near_copies']} near-copies dropped)"]
    for half in ("tune", "holdout"):
        part = [s for s in src if s["split"] == half]
        files = sum(len(s["duplicates"]) + len(s["negatives"]) for s in part)
        series = {s["series"] for s in part}
        lines.append(f"  {half}: {len(part)} sources, {files} files, {len(series)} series")
    by_pkg: dict[str, int] = {}
    for s in src:
        by_pkg[s["pkg"]] = by_pkg.get(s["pkg"], 0) + 1
    lines.append("  " + ", ".join(f"{p} {n}" for p, n in sorted(by_pkg.items())))
    return "\n".join(lines)


if __name__ == "__main__":
    r = Path(sys.argv[sys.argv.index("--root") + 1]) if "--root" in sys.argv else None
    print(summary(build(r)[1]))

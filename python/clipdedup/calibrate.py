"""Threshold help: how far apart are near-duplicates, and how far apart are distinct images, for the
model a DB was built with?

Two distributions are measured:
  - nearest-neighbour distances of (a sample of) the DB's rows: for a collection that is mostly free
    of duplicates, this is how close *distinct* images come;
  - distances between sampled images and synthetic near-duplicates of them (JPEG re-encode, resize,
    small crop), encoded by the DB's model: how far *duplicates* drift.
The suggested threshold is the largest distance at which the estimated precision still reaches the
target, where precision(t) = P(t) / (P(t) + N(t)), P and N the fractions of synthetic pairs and of
nearest neighbours within t (equal weight on both). Rows whose nearest neighbour has the very same
embedding (byte-identical copies share one, see clipdedup.ingest.prepass) are left out of N; every other
nearest neighbour is counted as a distinct image, so near-duplicates already in the DB make the
estimate pessimistic, never optimistic.
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from clipdedup.errors import UserError
from clipdedup.match.nearest import nn_distances

QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
IDENTICAL = 1e-6  # a nearest neighbour this close holds the same embedding: an exact copy


def _jpeg(im: Image.Image, quality: int = 70) -> Image.Image:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as out:
        return out.convert("RGB")


def _resize(im: Image.Image, f: float = 0.5) -> Image.Image:
    return im.resize((max(1, round(im.width * f)), max(1, round(im.height * f))), Image.Resampling.BICUBIC)


def _crop(im: Image.Image, keep: float = 0.9) -> Image.Image:
    w, h = round(im.width * keep), round(im.height * keep)
    x0, y0 = (im.width - w) // 3, (im.height - h) // 3  # off-centre: not a pure zoom
    return im.crop((x0, y0, x0 + max(1, w), y0 + max(1, h)))


def _crop_centre(im: Image.Image, keep: float = 0.96) -> Image.Image:
    dx, dy = round(im.width * (1 - keep) / 2), round(im.height * (1 - keep) / 2)
    return im.crop((dx, dy, im.width - dx, im.height - dy))


def _brighter(im: Image.Image, f: float = 1.1) -> Image.Image:
    from PIL import ImageEnhance

    return ImageEnhance.Brightness(im.convert("RGB")).enhance(f)


TRANSFORMS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "jpeg-q70": _jpeg,
    "resize-50%": _resize,
    "crop-96%": _crop_centre,
    "bright+10%": _brighter,
    "crop-90%": _crop,
}


def targeted_variants(model_id: str | None) -> tuple[str, ...]:
    """The TRANSFORMS a model is meant to catch (its `EncoderFactory.calibration_targets`; all by
    default).

    builtin:dct targets re-encoding, resizing, small centred crops and brightness; an off-centre
    90% crop moves a low-frequency descriptor further than a distinct image, so it is reported but
    does not pull the suggestion.
    """
    from clipdedup.ingest.encode.base import encoder_factory

    targets = encoder_factory(model_id).calibration_targets if model_id else None
    return tuple(targets) if targets else tuple(TRANSFORMS)


def precision_curve_ref(pos: np.ndarray, neg: np.ndarray, t: float) -> tuple[float, float]:
    """(precision, recall) at threshold t: P = share of pos <= t, N = share of neg <= t, P / (P + N)."""
    p = float(np.mean(pos <= t)) if len(pos) else 0.0
    n = float(np.mean(neg <= t)) if len(neg) else 0.0
    return (p / (p + n) if p + n > 0 else 1.0), p


def suggest_threshold_ref(pos: np.ndarray, neg: np.ndarray, precision: float) -> float | None:
    """Reference: the largest observed distance t with recall > 0 and precision(t) >= `precision`."""
    best = None
    for t in sorted(set(pos.tolist()) | set(neg.tolist())):
        if not np.isfinite(t):  # +inf marks a pair that no threshold makes a duplicate
            continue
        p, r = precision_curve_ref(pos, neg, t)
        if r > 0 and p >= precision:
            best = t
    return best


def suggest_threshold(pos: np.ndarray, neg: np.ndarray, precision: float) -> float | None:
    """Vectorised `suggest_threshold_ref` (sort + searchsorted instead of one pass per candidate)."""
    pos, neg = np.sort(np.asarray(pos, np.float64)), np.sort(np.asarray(neg, np.float64))
    cand = np.unique(np.concatenate([pos, neg]))
    cand = cand[np.isfinite(cand)]  # +inf marks a pair that no threshold makes a duplicate
    if len(pos) == 0 or len(cand) == 0:
        return None
    p = np.searchsorted(pos, cand, side="right") / len(pos)
    n = np.searchsorted(neg, cand, side="right") / len(neg) if len(neg) else np.zeros_like(p)
    with np.errstate(invalid="ignore", divide="ignore"):
        prec = np.where(p + n > 0, p / (p + n), 1.0)
    ok = (p > 0) & (prec >= precision)
    return float(cand[ok][-1]) if ok.any() else None


@dataclass
class Calibration:
    model_id: str
    n_db: int
    dim: int
    precision: float
    default_threshold: float
    nn: np.ndarray  # (S,) float64 nearest-neighbour distances of sampled DB rows
    synthetic: dict[str, np.ndarray] = field(default_factory=dict)  # transform -> (K,) distances
    images: int = 0  # images the synthetic pairs were made from
    skipped: list[tuple[str, str]] = field(default_factory=list)
    suggested: float | None = None
    targets: tuple[str, ...] = tuple(TRANSFORMS)  # the transforms the model is meant to catch
    # Models with a verifier (builtin:dct): distances are on the screening part, and a pair counts
    # only when its check score reaches min_score (None: no verifier).
    min_score: float | None = None
    nn_scores: np.ndarray | None = None  # (S,) check score of each row and its nearest neighbour
    synthetic_scores: dict[str, np.ndarray] = field(default_factory=dict)

    def negatives(self) -> np.ndarray:
        """Nearest-neighbour distances that are not exact copies; +inf where verification would turn
        the pair down (it can never become a duplicate, whatever the threshold)."""
        keep = self.nn > IDENTICAL
        d = self.nn.copy()
        if self.min_score is not None and self.nn_scores is not None:
            d[self.nn_scores < self.min_score] = np.inf
        return d[keep]

    def variant(self, name: str) -> np.ndarray:
        """One transform's distances, +inf where verification would turn the pair down."""
        d = self.synthetic[name].copy()
        if self.min_score is not None and name in self.synthetic_scores:
            d[self.synthetic_scores[name] < self.min_score] = np.inf
        return d

    def positives(self, targeted: bool = True) -> np.ndarray:
        names = [n for n in self.synthetic if n in self.targets or not targeted]
        return np.concatenate([self.variant(n) for n in names]) if names else np.zeros(0)

    def recall(self, t: float) -> dict[str, float]:
        """Share of each transform's pairs found at threshold t (and confirmed, with a verifier)."""
        return {n: float(np.mean(self.variant(n) <= t)) if len(v) else 0.0 for n, v in self.synthetic.items()}


def synthetic_distances(
    enc, paths: list[str], *, batch_size: int = 16
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int, list[tuple[str, str]]]:
    """Distances between each image and its TRANSFORMS variants, all encoded by `enc`.

    The original goes through the normal decoder (as the DB update does); the variants are made from
    the full-resolution decode. For a model with a verifier the distance is the screening part's and
    the check score of each pair is returned too.

    Returns:
        ({transform: (K,) float64 distances}, {transform: (K,) check scores, or empty without a
        verifier}, images used, [(path, reason)] for unreadable images).
    """
    from clipdedup.ingest.decode.base import DecodeError, decode_pil
    from clipdedup.ingest.encode.base import verifier_for
    from clipdedup.match import exact_distances

    verifier = verifier_for(enc.model_id)
    out: dict[str, list[float]] = {name: [] for name in TRANSFORMS}
    sco: dict[str, list[float]] = {name: [] for name in TRANSFORMS}
    skipped, used = [], 0
    for s in range(0, len(paths), batch_size):
        items: list[Any] = []  # prepared model inputs
        tags: list[tuple[str, int, int]] = []
        for p in paths[s : s + batch_size]:
            try:
                first = enc.prepare(decode_pil(p, enc.input_size))
                full = decode_pil(p, 0)
                variants = [(name, enc.prepare(fn(full))) for name, fn in TRANSFORMS.items()]
            except (DecodeError, OSError, ValueError) as e:
                skipped.append((p, str(e).splitlines()[0] if str(e) else type(e).__name__))
                continue
            used += 1
            base = len(items)
            items.append(first)
            for name, item in variants:
                tags.append((name, base, len(items)))
                items.append(item)
        if not items:
            continue
        x = np.asarray(enc.encode_batch(items), np.float32)
        xs, xc = verifier.split(x) if verifier is not None else (x, None)
        for name, a, b in tags:
            out[name].append(float(exact_distances(xs[a : a + 1], xs[b : b + 1])[0]))
            if verifier is not None and xc is not None:
                sco[name].append(float(verifier.scores(xc, xc, np.array([[a, b]]))[0]))
    scores = {k: np.asarray(v) for k, v in sco.items()} if verifier is not None else {}
    return {k: np.asarray(v) for k, v in out.items()}, scores, used, skipped


def calibrate(
    db_dir: str,
    image_dir: str | None = None,
    model_id: str | None = None,
    *,
    precision: float = 0.99,
    samples: int = 64,
    nn_samples: int = 2000,
    device: str | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> Calibration:
    """Measures both distributions and suggests a threshold (see the module docstring).

    Raises:
        UserError: no DB, fewer than two embeddings, a -m that is not the DB's model, no images.
    """
    from clipdedup.db import load_db, read_meta
    from clipdedup.ingest.encode.base import (
        canonical_model_id,
        check_layout,
        default_threshold,
        load_encoder,
        verifier_for,
    )
    from clipdedup.scan import scan_tree

    say = progress or (lambda line: None)
    if not 0 < precision < 1:
        raise UserError(f"precision {precision}: must be between 0 and 1")
    meta = read_meta(db_dir) if os.path.isdir(db_dir) else None
    paths, x = load_db(db_dir)
    if len(paths) < 2:
        raise UserError(f"{db_dir}: {len(paths)} embeddings; calibration needs at least 2")
    if meta is not None and model_id is not None and canonical_model_id(model_id) != meta.model_id:
        raise UserError(f"{db_dir}: DB holds {meta.describe()}, not {canonical_model_id(model_id)}; drop -m")
    if meta is not None:
        check_layout(db_dir, meta, fix="re-encode it (update --force-update) before calibrating")
    model = meta.model_id if meta is not None else model_id
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(paths), size=min(nn_samples, len(paths)), replace=False))
    say(f"nearest neighbours of {len(rows)} of {len(paths)} DB rows")
    verifier = verifier_for(model)
    xs, xc = verifier.split(x) if verifier is not None else (x, None)
    nn, nn_idx = nn_distances(xs, rows, with_index=True)
    c = Calibration(
        model_id=model or "unknown",
        n_db=len(paths),
        dim=x.shape[1],
        precision=precision,
        default_threshold=default_threshold(model) if model else float("nan"),
        nn=nn,
        targets=targeted_variants(model),
    )
    if verifier is not None and xc is not None:
        c.min_score = verifier.min_score
        c.nn_scores = verifier.scores(xc, xc, np.stack([rows, nn_idx], axis=1))
    if image_dir is None:
        return c
    if model is None:
        raise UserError(f"{db_dir}: the DB records no model; pass -m with the model it was built with")
    if not os.path.isdir(image_dir):
        raise UserError(f"{image_dir}: image directory does not exist")
    entries = scan_tree(image_dir).entries
    if not entries:
        raise UserError(f"{image_dir}: no images found")
    pick = random.Random(seed).sample(entries, min(samples, len(entries)))
    enc = load_encoder(model, device=device)
    if meta is not None and enc.dim != meta.dim:
        raise UserError(f"model {model} gives dim {enc.dim}, the DB holds dim {meta.dim}")
    say(f"encoding {len(pick)} images and {len(pick) * len(TRANSFORMS)} synthetic near-duplicates")
    picked = [os.path.join(image_dir, e.rel) for e in sorted(pick, key=lambda e: e.rel)]
    c.synthetic, c.synthetic_scores, c.images, c.skipped = synthetic_distances(enc, picked)
    c.suggested = suggest_threshold(c.positives(), c.negatives(), precision)
    return c


def _quantiles(v: np.ndarray) -> str:
    if len(v) == 0:
        return "(none)"
    return " ".join(f"{q:8.4f}" for q in np.quantile(v, QUANTILES))


def _verdict_lines(c: Calibration) -> list[str]:
    lines = []
    same = int(np.sum(c.nn <= IDENTICAL))
    for label, t in (("default", c.default_threshold), ("suggested", c.suggested)):
        if t is None or not np.isfinite(t):
            continue
        prec, rec = precision_curve_ref(c.positives(), c.negatives(), t)
        close = int(np.sum(c.nn <= t))
        lines.append(
            f"at the {label} threshold {t:.4f}: est. precision {prec:.3f}, recall on targeted synthetic "
            f"{rec:.3f}, {close} of {len(c.nn)} sampled DB rows ({close / len(c.nn):.1%}) have a neighbour "
            f"within it ({same} of them exact copies)"
        )
        per = ", ".join(
            f"{n} {r:.2f}" + ("" if n in c.targets else " (not targeted)") for n, r in c.recall(t).items()
        )
        lines.append(f"  recall per variant: {per}")
    return lines


def format_text(c: Calibration) -> str:
    head = " ".join(f"{'min' if q == 0 else 'max' if q == 1 else f'{q:.0%}':>8}" for q in QUANTILES)
    lines = [
        f"model {c.model_id}, DB of {c.n_db} embeddings (dim {c.dim}); its default threshold "
        f"{c.default_threshold:g}",
        f"{'distance quantiles':<32} {head}",
        f"{f'nearest neighbour ({len(c.nn)} rows)':<32} {_quantiles(c.nn)}",
    ]
    raw_neg = c.nn[c.nn > IDENTICAL]
    if len(raw_neg) < len(c.nn):
        lines.append(f"{f'  of which not exact copies ({len(raw_neg)})':<32} {_quantiles(raw_neg)}")
    for name, v in c.synthetic.items():
        mark = "" if name in c.targets else " *"
        lines.append(f"{f'synthetic {name}{mark} ({len(v)})':<32} {_quantiles(v)}")
    if c.min_score is not None:
        turned = int(np.sum(~np.isfinite(c.negatives())))
        lines.append(
            f"distances are the screening part's; a pair counts when its check score is >= {c.min_score:g} "
            f"({turned} of {len(raw_neg)} nearest neighbours are turned down by it)"
        )
    if any(n not in c.targets for n in c.synthetic):
        lines.append("* not a variant this model targets: reported, left out of the suggestion")
    for path, reason in c.skipped:
        lines.append(f"skipped {path}: {reason}")
    if not c.synthetic:
        lines.append("no -i IMAGES given: synthetic near-duplicates (and a suggestion) need sample images")
        return "\n".join(lines)
    lines += _verdict_lines(c)
    if c.suggested is None:
        lines.append(f"no threshold reaches precision {c.precision:g} on these samples")
    else:
        lines.append(f"suggested threshold for precision >= {c.precision:g}: -th {c.suggested:.4f}")
    lines.append(
        "(precision weighs a targeted synthetic near-duplicate and a DB nearest neighbour equally and counts "
        "every nearest neighbour but exact copies as a distinct image; near-duplicates already in the DB "
        "make it pessimistic)"
    )
    return "\n".join(lines)


def to_dict(c: Calibration) -> dict:
    q = {f"{v:g}": None for v in QUANTILES}
    return {
        "model": c.model_id,
        "db_rows": c.n_db,
        "dim": c.dim,
        "default_threshold": c.default_threshold,
        "precision_target": c.precision,
        "suggested_threshold": c.suggested,
        "images": c.images,
        "quantiles": list(q),
        "nearest_neighbour": np.quantile(c.nn, QUANTILES).tolist() if len(c.nn) else [],
        "exact_copies": int(len(c.nn) - len(c.negatives())),
        "synthetic": {
            k: np.quantile(v, QUANTILES).tolist() if len(v) else [] for k, v in c.synthetic.items()
        },
        "targeted": list(c.targets),
        "min_score": c.min_score,
        "recall_at_default": c.recall(c.default_threshold) if c.synthetic else {},
        "recall_at_suggested": c.recall(c.suggested) if c.synthetic and c.suggested is not None else {},
        "skipped": [{"path": p, "reason": r} for p, r in c.skipped],
    }

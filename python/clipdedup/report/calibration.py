"""Text and JSON of a threshold calibration (`clip-image-deduper calibrate`): distance quantiles,
recall per synthetic variant (marking the variants the model does not target), the estimated
precision at the default and the suggested threshold."""

from __future__ import annotations

import numpy as np

from clipdedup.calibrate import IDENTICAL, QUANTILES, Calibration, precision_curve_ref


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
